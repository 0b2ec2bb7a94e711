"""`ctrloop train` against a real Kafka-protocol broker and redis-server, killed with SIGKILL
mid-stream: after a restart every impression is learned exactly once, duplicates in the input
are dropped and counted, malformed messages reach the dead-letter topic, and model versions
only go up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import orjson
import pytest

from ctrloop.core.events import Click, Conversion, Impression, to_dict
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import create_topics, make_consumer, make_producer
from ctrloop.io.registry import RedisRegistry
from ctrloop.sim import WorldConfig, parsed_events

pytestmark = pytest.mark.integration

WINDOW = 10.0
N_IMPRESSIONS = 12_000
MALFORMED = [b"{not json", b'{"ts": 1767225600.0}', b'{"impression_id": "x", "ts": "soon"}',
             b"[1, 2, 3]", b'{"impression_id": "y", "ts": 1e300}']


def _events() -> list[dict]:
    cfg = WorldConfig(seed=7, impressions_per_second=200.0)
    kinds = {Impression: "impression", Click: "click", Conversion: "conversion"}
    return [{"kind": kinds[type(ev)], **to_dict(ev)} for ev in parsed_events(cfg, N_IMPRESSIONS)]


def _expected(events: list[dict]) -> tuple[int, int]:
    imp_ts = {e["impression_id"]: e["ts"] for e in events if e["kind"] == "impression"}
    clicked = {e["impression_id"] for e in events if e["kind"] == "click"
               and 0 <= e["ts"] - imp_ts[e["impression_id"]] <= WINDOW}
    digest = sum(zlib.crc32(i.encode()) for i in imp_ts) & 0xFFFFFFFFFFFFFFFF
    return len(clicked), digest


def _produce(bootstrap: str, prefix: str, events: list[dict], extra: bool = False) -> None:
    producer = make_producer(bootstrap)
    for e in events:
        body = {k: v for k, v in e.items() if k != "kind"}
        producer.send(f"{prefix}{e['kind']}s", key=e["impression_id"].encode(),
                      value=orjson.dumps(body))
    if extra:
        for raw in MALFORMED:
            producer.send(f"{prefix}clicks", key=b"bad", value=raw)
        dupes = [e for e in events if e["kind"] == "impression"][:50]
        for e in dupes:  # a producer retry: the same impression twice
            body = {k: v for k, v in e.items() if k != "kind"}
            producer.send(f"{prefix}impressions", key=e["impression_id"].encode(),
                          value=orjson.dumps(body))
    producer.flush()
    producer.close()


def _trainer(env: dict[str, str], summary: Path, log: Path,
             stop_idle: float | None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "ctrloop.cli", "train", "--summary-out", str(summary)]
    if stop_idle is not None:
        args += ["--stop-when-idle-s", str(stop_idle)]
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_kill_9_mid_stream_loses_nothing_and_learns_nothing_twice(
    kafka_broker: KafkaBroker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> None:
    events = _events()
    positives, digest = _expected(events)
    topics = [f"{topic_prefix}{t}" for t in ("impressions", "clicks", "conversions")]
    dlq = f"{topic_prefix}dead-letter"
    create_topics(kafka_broker.bootstrap, [*topics, dlq])
    env = dict(os.environ,
               CTRLOOP_KAFKA_BOOTSTRAP=kafka_broker.bootstrap, CTRLOOP_REDIS_URL=redis_server.url,
               CTRLOOP_REGISTRY_NAMESPACE=topic_prefix, CTRLOOP_GROUP_ID=f"{topic_prefix}trainer",
               CTRLOOP_TOPIC_IMPRESSIONS=topics[0], CTRLOOP_TOPIC_CLICKS=topics[1],
               CTRLOOP_TOPIC_CONVERSIONS=topics[2], CTRLOOP_TOPIC_DEAD_LETTER=dlq,
               CTRLOOP_CHECKPOINT_DIR=str(tmp_path / "ckpt"), CTRLOOP_CHECKPOINT_INTERVAL_S="0.5",
               CTRLOOP_CLICK_WINDOW=str(WINDOW), CTRLOOP_ALLOWED_LATENESS="2",
               CTRLOOP_WARMUP="false", CTRLOOP_IDLE_ADVANCE_S="0.5",
               CTRLOOP_MIN_PUBLISH_INTERVAL_S="0.2", CTRLOOP_LOG_INTERVAL_S="1")
    log = tmp_path / "trainer.log"
    summary_path = tmp_path / "summary.json"
    half = len(events) // 2
    _produce(kafka_broker.bootstrap, topic_prefix, events[:half], extra=True)

    # The first trainer must not move event time on by the wall clock while it waits to be
    # killed: the second half's events continue the same event time and would arrive "late".
    first = _trainer({**env, "CTRLOOP_IDLE_ADVANCE_S": "600"}, summary_path, log, stop_idle=None)
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    deadline = time.monotonic() + 90
    while not ckpt.exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert ckpt.exists(), log.read_text()[-3000:]
    time.sleep(1.0)  # let it learn past its last checkpoint, then pull the plug
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert not summary_path.exists()
    registry = RedisRegistry.from_url(redis_server.url, topic_prefix)
    before = registry.current()

    _produce(kafka_broker.bootstrap, topic_prefix, events[half:])
    second = _trainer(env, summary_path, log, stop_idle=15.0)
    assert second.wait(180) == 0, log.read_text()[-3000:]
    summary = orjson.loads(summary_path.read_bytes())
    assert "restored checkpoint" in log.read_text()

    assert summary["pipeline"]["learned"] == N_IMPRESSIONS
    # Exact: an empty assignment while the group rebalanced after the kill used to count as
    # "caught up", letting event time run on the wall clock and close windows early.
    assert summary["pipeline"]["learned_positives"] == positives, summary["join"]
    assert summary["pipeline"]["learned_digest"] == digest
    assert summary["join"]["duplicate_impressions"] == 50
    assert summary["pending"] == 0
    after = registry.current()
    assert after is not None
    assert before is None or after.version > before.version
    assert after.meta["samples_seen"] == N_IMPRESSIONS

    consumer = make_consumer(kafka_broker.bootstrap, None, [], consumer_timeout_ms=5000)
    from kafka import TopicPartition

    consumer.assign([TopicPartition(dlq, 0)])
    consumer.seek_to_beginning()
    dead = [orjson.loads(r.value) for r in consumer]
    consumer.close()
    # At-least-once: a message dead-lettered after the last checkpoint is read and
    # dead-lettered again by the restarted trainer.
    assert len(dead) >= len(MALFORMED)
    assert {d["payload"] for d in dead} == {m.decode() for m in MALFORMED}
    assert all(d["reason"] for d in dead)
