"""Thin kafka-python helpers shared by the trainer and the scoring service.

Settings here are tuned against the Tansu broker that `ctrloop.dev.localservers` starts, on a
2-core machine; every helper takes `**overrides` for anything else.

What works against Tansu 0.6.0 with kafka-python 3.0.12 (checked by hand and in
tests/integration/test_localservers.py):

- Topics: `KafkaAdminClient.create_topics` with the dict form (`{name: {"num_partitions": n,
  "replication_factor": 1}}`; a list of `NewTopic` is deprecated in 3.x), `wait_for_metadata`,
  `delete_topics`, `list_topics`, `describe_topics`. Creating an existing topic answers
  TopicAlreadyExists (error 36) per topic. A metadata request that allows auto-creation (kafka-
  python's default) creates an unknown topic with *4* partitions, so the helpers here ask for
  `allow_auto_create_topics=False`: on Apache Kafka a send to a missing topic then blocks for
  `max_block_ms` and fails, and topics come only from `create_topics` (the trainer, `ctrloop
  stack`, the topics job) with the partition count the trainer expects. Tansu 0.6.0 ignores the
  flag and creates the topic anyway (tests/integration/test_hostile_kafka.py, a strict xfail that
  says when that changes): against Tansu, create topics before anything produces.
- Producer: idempotence (kafka-python's default) is really enforced: the broker hands out
  producer ids, drops a duplicate sequence (the future resolves with `offset == -1`) and rejects
  a gap with OutOfOrderSequenceNumber. Producer state lives in memory, like everything else,
  and is lost when the broker restarts. Transactions: init/begin/commit/abort all "succeed", but
  the semantics are not Kafka's (no control records; an aborted record was hidden from
  read_uncommitted consumers too, and in one run a read_committed consumer saw nothing at all)
  — do not use transactions or `isolation_level="read_committed"`.
- Consumer groups: join, sync, heartbeat, rebalance across members, LeaveGroup on close,
  `commit()`, `commit_async()` (callback fires) and `committed()` work; a restarted member
  resumes from the committed offset. Commit metadata strings are not stored
  (`committed(tp, metadata=True)` returns `metadata=None`). Commits also work without joining
  (`assign()` + a group id).
- Joining a group costs about half the session timeout, rounded up to whole seconds: the broker
  holds the second JoinGroup that long (6 s → ~3.1 s, 3 s → ~2.0 s, 2 s → ~1.1 s, kafka-python's
  default 45 s → ~23 s). A second member joining an active group took ~5 s; after one member
  closed, the other had its partitions ~7 s later; after one was SIGKILLed, ~8 s later.
- `seek()`, `seek_to_beginning()`, `pause()` / `resume()` / `paused()`, `position()` and
  `highwater()` work. `highwater(tp)` is None until the first fetch from that partition returns,
  then it is exact (it comes from the fetch response).
- Broken: ListOffsets(latest) answers the *base offset of the last record batch + 1*, so
  `end_offsets()` and `seek_to_end()` are short by (size of the last batch - 1) whenever the
  producer batched; use `highwater()` after a fetch for lag and "caught up" checks.
  `offsets_for_times()` ignores record timestamps (it answers offset 0 with the append time,
  and offset 0 even for a time past the end) — do event-time alignment on the records' own
  timestamps, not with it. `beginning_offsets()` answers 0, which is right for a fresh broker.
- kafka-python 3.0.7-3.0.12 bug (not Tansu's): records fetched for a partition that is then
  paused are parked, and on resume they are put back only if the fetcher's "next records" slot
  is `None`; a fully drained slot is falsy but not `None`, so the parked records stay parked
  and the partition is never fetched again (it silently stops; seeks do not help). Call
  `release_parked_records()` before each poll.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import TopicAlreadyExistsError, for_code

from ctrloop.core.errors import DependencyError

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno

PRODUCER_DEFAULTS: Mapping[str, Any] = {
    # Batching is what makes a Python producer fast: per-record overhead dominates, so wait up
    # to 5 ms to fill large batches. Bigger batches or longer lingering measured no faster.
    "linger_ms": 5,
    "batch_size": 256 * 1024,
    "acks": "all",
    # Idempotence (on by default in kafka-python 3) keeps retries from duplicating records or
    # reordering a key's records, and Tansu enforces it; it needs acks=all and <= 5 in flight.
    "enable_idempotence": True,
    "retries": 10,
    "max_in_flight_requests_per_connection": 5,
    "delivery_timeout_ms": 120_000,
    "max_request_size": 4 * 1024 * 1024,
    # After a broker restart (memory storage) the service's producer re-created `clicks` with
    # the broker's default 4 partitions before the topics job ran; only create_topics creates.
    "allow_auto_create_topics": False,
}

CONSUMER_DEFAULTS: Mapping[str, Any] = {
    # Offsets are committed by the caller after its state is safe (snapshot + dedup), never
    # in the background.
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    # Tansu holds a JoinGroup for ~half the session timeout: 6 s gives ~3 s joins, while still
    # surviving a few seconds of a busy trainer (heartbeats run on kafka-python's IO thread).
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 2000,
    # Fetch sizes: measured max_poll_records 500/2000/5000 x max_partition_fetch_bytes
    # 256 KiB/1/4/16 MiB (interleaved runs, 200k records): the differences (<15%) were within
    # run-to-run noise; 2000 / 4 MiB was best or tied, records per consumer-CPU-second included.
    "max_poll_records": 2000,
    "max_partition_fetch_bytes": 4 * 1024 * 1024,
    "fetch_max_bytes": 32 * 1024 * 1024,
    "allow_auto_create_topics": False,  # as for producers: only create_topics creates topics
}


def create_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int = 1,
    *,
    timeout_s: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    An existing topic is fine (it is left as it is; a different partition count is logged as
    a warning, because keyed topics that must co-partition would silently diverge). Returns
    once every topic is visible in metadata with a leader, so producing right after is safe.
    With no broker at `bootstrap` it raises kafka-python's KafkaTimeoutError (a KafkaError)
    after about `timeout_s`, not kafka-python's default 30 s.
    """
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="ctrloop-admin",
        request_timeout_ms=int(timeout_s * 1000),
        bootstrap_timeout_ms=int(timeout_s * 1000),
    )
    try:
        response = admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in wanted},
            timeout_ms=int(timeout_s * 1000),
            raise_errors=False,
        )
        created: list[str] = []
        existing: list[str] = []
        for result in response["topics"]:
            code = result["error_code"]
            if code == 0:
                created.append(result["name"])
            elif code == _TOPIC_ALREADY_EXISTS:
                existing.append(result["name"])
            else:
                error = for_code(code)
                raise error(f"creating topic {result['name']!r}: {result.get('error_message')}")
        admin.wait_for_topics(wanted, timeout_ms=int(timeout_s * 1000))
        if existing:
            for topic in admin.describe_topics(existing):
                n = len(topic["partitions"])
                if n != partitions:
                    log.warning(
                        "topic %s already exists with %d partitions (wanted %d)",
                        topic["name"],
                        n,
                        partitions,
                    )
        return created
    finally:
        admin.close()


class TopicsMissing(DependencyError):
    """Topics a producer must write to do not exist; ctrloop never lets a producer create one."""


def missing_topics(bootstrap: str, names: Iterable[str], *, timeout_s: float = 10.0
                   ) -> list[str]:
    """Which of `names` the cluster does not have, asked with a metadata request for *all*
    topics: a request naming a missing topic creates it on Tansu 0.6.0, which ignores
    `allow_auto_create_topics` (tests/integration/test_hostile_kafka.py), so that is not asked.
    Raises a KafkaError when no broker answers within about `timeout_s`."""
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ctrloop-admin",
                             request_timeout_ms=int(timeout_s * 1000),
                             bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    return [name for name in wanted if name not in existing]


def make_producer(bootstrap: str, *, require_topics: Iterable[str] = (),
                  **overrides: Any) -> KafkaProducer:
    """A KafkaProducer with `PRODUCER_DEFAULTS`; keys and values are bytes unless overridden.

    With `require_topics`, first checks that they exist and raises TopicsMissing naming them
    otherwise: a producer's first send to a missing topic would create it on a broker that
    auto-creates (after a broker restart the service's producer made `clicks` with 4 partitions
    before the topics job ran, so keyed topics no longer co-partitioned).

    Measured here with `python -m ctrloop.io.kafka` (2 cores shared with the broker and with
    other work, 313-byte JSON values, keyed, one partition, 200k records): median ~35k msg/s,
    21–42k across runs; the pure-Python producer is the bottleneck, not the broker. With
    kafka-python's defaults (linger 0, batch 16 KiB) ~14k msg/s; batch 64 KiB ~20k; batch
    1 MiB, linger 20 ms, acks=1 or idempotence off: no clear change.
    """
    config: dict[str, Any] = {"bootstrap_servers": bootstrap, "client_id": "ctrloop-producer"}
    config.update(PRODUCER_DEFAULTS)
    config.update(overrides)
    missing = missing_topics(bootstrap, require_topics,
                             timeout_s=config.get("bootstrap_timeout_ms", 10_000) / 1000)
    if missing:
        raise TopicsMissing(
            f"topic(s) {', '.join(missing)} do not exist on Kafka at {bootstrap}: create them "
            "first (`ctrloop stack` and the compose `topics` job do; or kafka-topics.sh "
            "--create); ctrloop never lets a producer create a topic")
    return KafkaProducer(**config)


def make_consumer(
    bootstrap: str,
    group_id: str | None,
    topics: Iterable[str] = (),
    **overrides: Any,
) -> KafkaConsumer:
    """A KafkaConsumer with `CONSUMER_DEFAULTS`, subscribed to `topics` if any are given.

    With no topics the caller `assign()`s partitions itself (commits still work with a group
    id). Joining the group happens in the first `poll()` calls and takes ~3 s against Tansu
    with the default 6 s session timeout.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group_id,
        "client_id": "ctrloop-consumer",
    }
    config.update(CONSUMER_DEFAULTS)
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    topic_list = list(topics)
    if topic_list:
        consumer.subscribe(topic_list)
    return consumer


def release_parked_records(consumer: KafkaConsumer) -> None:
    """Let kafka-python put back records it parked for a partition that was paused.

    Call before every `poll()` of a consumer that pauses and resumes partitions. The trainer
    pauses partitions that run ahead in event time; with kafka-python 3.0.12 a resumed
    partition stopped returning records mid-topic in about half the backlog runs
    (tests/integration/test_kafka_pause.py reproduces it every time without this). Emptying
    the drained "next records" slot lets the fetcher's own restore path run. It touches
    private attributes: if a kafka-python release renames them this does nothing, and that
    test tells.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    slot = getattr(fetcher, "_next_partition_records", None)
    if slot is not None and not slot and getattr(fetcher, "_paused_partition_records", None):
        fetcher._next_partition_records = None  # type: ignore[union-attr]
