"""Hostile Kafka input, as an outsider writes it with kafka-python to the real broker (issue 10
B, C, I): tombstones, binary and non-UTF-8 values, a key without a value, huge headers, a 1 MB
value, NaN, events stamped in 2099 or ahead of their record's timestamp. The trainer
dead-letters each with its reason and goes on learning the good events exactly; event time
stays sane. Also: the trainer fails fast with one line when Kafka or Redis is unreachable, and
producers never auto-create topics."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from ctrloop.core.events import MAX_LINE_BYTES, Click, Conversion, Impression, to_dict
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import (
    CONSUMER_DEFAULTS,
    PRODUCER_DEFAULTS,
    create_topics,
    make_consumer,
    make_producer,
)
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.sim import WorldConfig, parsed_events
from ctrloop.trainer.settings import TrainerSettings
from ctrloop.trainer.streaming import StreamingTrainer

pytestmark = pytest.mark.integration

WINDOW = 10.0
N_IMPRESSIONS = 3000
Y2099 = 4_070_908_800.0


def _events(n: int = N_IMPRESSIONS) -> list[dict[str, Any]]:
    kinds = {Impression: "impression", Click: "click", Conversion: "conversion"}
    return [{"kind": kinds[type(ev)], **to_dict(ev)}
            for ev in parsed_events(WorldConfig(seed=11, impressions_per_second=200.0), n)]


def _expected(events: list[dict[str, Any]]) -> tuple[int, int]:
    imp_ts = {e["impression_id"]: e["ts"] for e in events if e["kind"] == "impression"}
    clicked = {e["impression_id"] for e in events if e["kind"] == "click"
               and 0 <= e["ts"] - imp_ts[e["impression_id"]] <= WINDOW}
    return len(clicked), sum(zlib.crc32(i.encode()) for i in imp_ts) & 0xFFFFFFFFFFFFFFFF


def _settings(broker: KafkaBroker, prefix: str, tmp: Path) -> TrainerSettings:
    return TrainerSettings(
        kafka_bootstrap=broker.bootstrap, redis_url="redis://unused", registry_namespace=prefix,
        group_id=f"{prefix}trainer", topic_impressions=f"{prefix}impressions",
        topic_clicks=f"{prefix}clicks", topic_conversions=f"{prefix}conversions",
        topic_dead_letter=f"{prefix}dead-letter", checkpoint_dir=tmp / "ckpt",
        click_window=WINDOW, allowed_lateness=2.0, warmup=False, idle_advance_s=0.5,
        checkpoint_interval_s=1.0, min_publish_interval_s=0.0,
        # Once everything is read, event time follows the wall clock (never the most advanced
        # partition's ts): the last windows close WINDOW + lateness seconds later.
        stop_when_idle_s=WINDOW + 2.0 + 4.0)


def _send_good(producer: Any, s: TrainerSettings, events: list[dict[str, Any]]) -> None:
    for e in events:
        body = {k: v for k, v in e.items() if k != "kind"}
        producer.send(s.topic_of[e["kind"]], key=e["impression_id"].encode(),
                      value=orjson.dumps(body))


def _dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = make_consumer(bootstrap, None, consumer_timeout_ms=3000)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        consumer.seek_to_beginning()
        return [orjson.loads(r.value) for r in consumer]
    finally:
        consumer.close()


def _run(trainer: StreamingTrainer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(trainer.run()), daemon=True)
    thread.start()
    thread.join(180)
    if thread.is_alive():
        trainer.request_stop()
        thread.join(30)
        pytest.fail("the trainer did not stop within 180 s")
    return out


def test_hostile_records_are_dead_lettered_with_reasons_and_learning_goes_on(
        kafka_broker: KafkaBroker, topic_prefix: str, tmp_path: Path) -> None:
    s = _settings(kafka_broker, topic_prefix, tmp_path)
    create_topics(kafka_broker.bootstrap, [*s.topic_of.values(), s.topic_dead_letter])
    events = _events()
    half = len(events) // 2
    now = time.time()
    huge_headers = [(f"h{i}", b"x" * 10_000) for i in range(100)]  # ~1 MB of headers
    # (topic, key, value, headers, record timestamp ms, reason substring)
    hostile: list[tuple[str, bytes | None, bytes | None, Any, int | None, str]] = [
        (s.topic_clicks, b"x", None, None, None, "tombstone"),
        (s.topic_impressions, None, b"", None, None, "not valid JSON"),  # empty, no key
        (s.topic_clicks, b"bin", bytes(range(256)), None, None, "not"),
        (s.topic_clicks, b"u8", b'{"impression_id": "\xff\xfe", "ts": 1767225600.0}', None,
         None, "not UTF-8"),
        (s.topic_clicks, b"nan", b'{"impression_id": "n", "ts": NaN}', None, None, "NaN"),
        (s.topic_clicks, b"hdr", None, huge_headers, None, "tombstone"),
        (s.topic_impressions, b"big", b'{"pad": "' + b"x" * 1_000_000 + b'"}', None, None,
         f"at most {MAX_LINE_BYTES} allowed"),
        # Event-time poisoning: ahead of the wall clock (the record timestamp forged too), and
        # an hour ahead of its (day-old) record though behind the wall clock.
        (s.topic_clicks, b"f1", orjson.dumps({"impression_id": "nobody", "ts": Y2099}), None,
         None, "ahead of the receiving clock"),
        (s.topic_impressions, b"f2", orjson.dumps({
            "impression_id": "far", "ts": Y2099, "user_id": "u", "ad_id": "a",
            "advertiser_id": "v"}), None, int(Y2099 * 1000) - 1000, "ahead of the receiving"),
        (s.topic_clicks, b"f3", orjson.dumps({"impression_id": "old", "ts": now - 86400 + 3600}),
         None, int((now - 86400) * 1000), "ahead of the receiving clock"),
    ]
    producer = make_producer(kafka_broker.bootstrap, max_request_size=8 * 1024 * 1024)
    where: dict[tuple[str, int], str] = {}
    try:
        # The poisoned events go first: before the fix they moved event time to 2099, after
        # which every good impression was late and every click discarded.
        for topic, key, value, _headers, ts_ms, reason in hostile[7:]:
            md = producer.send(topic, key=key, value=value, timestamp_ms=ts_ms).get(30)
            where[(topic, md.offset)] = reason
        _send_good(producer, s, events[:half])
        for topic, key, value, headers, ts_ms, reason in hostile[:7]:
            md = producer.send(topic, key=key, value=value, headers=headers,
                               timestamp_ms=ts_ms).get(30)
            where[(topic, md.offset)] = reason
        _send_good(producer, s, events[half:])
        producer.flush()
    finally:
        producer.close()

    trainer = StreamingTrainer(s, registry=InMemoryRegistry())
    summary = _run(trainer)
    positives, digest = _expected(events)
    assert summary["pipeline"]["learned"] == N_IMPRESSIONS
    assert summary["pipeline"]["learned_positives"] == positives, summary["join"]
    assert summary["pipeline"]["learned_digest"] == digest
    # Issue 10 F: some runs counted a few late impressions (a partition taken for caught up on
    # a stale highwater); none may be late.
    assert summary["join"]["late_impressions"] == 0, summary["join"]
    assert summary["join"]["late_clicks"] == 0, summary["join"]
    assert summary["dead_lettered"] == len(hostile)
    assert trainer.pipeline is not None
    last_ts = max(e["ts"] for e in events)
    assert trainer.pipeline.tracker.clock <= last_ts + 600  # event time never saw 2099

    dead = _dead_letters(kafka_broker.bootstrap, s.topic_dead_letter)
    got = {(d["topic"], d["offset"]): d for d in dead}
    assert len(dead) == len(got) == len(hostile)  # one dead letter per bad record
    assert set(got) == set(where)
    for at, reason in where.items():
        assert reason in got[at]["reason"], (at, got[at])
    tomb = got[next(k for k, r in where.items() if r == "tombstone")]
    assert tomb["payload"] == "" and tomb["value_bytes"] is None
    binary = got[next(k for k, r in where.items() if r == "not")]
    assert binary["payload"].endswith("\\xfe\\xff") and binary["value_bytes"] == 256
    big = got[next(k for k, r in where.items() if r.startswith("at most"))]
    assert big["truncated"] and len(big["payload"]) <= 4096


def test_poisoned_clock_in_a_running_trainer_then_normal_traffic(
        kafka_broker: KafkaBroker, topic_prefix: str, tmp_path: Path) -> None:
    """The issue's reproduction against a running trainer: a 2099 click and impression, then
    ordinary traffic: both are dead-lettered with the reason and the clock stays sane."""
    s = _settings(kafka_broker, topic_prefix, tmp_path)
    create_topics(kafka_broker.bootstrap, [*s.topic_of.values(), s.topic_dead_letter])
    # The simulator's trailing conversions run hours ahead of the stream: a trainer that moved
    # its clock to the most advanced partition once all looked caught up (by a stale highwater)
    # judged later impressions late (issue 10 F). They stay in.
    events = _events(1500)
    producer = make_producer(kafka_broker.bootstrap)
    _send_good(producer, s, events[:50])  # a running trainer: it has inferred its spec
    producer.flush()
    # Event time must not follow the wall clock while this test waits between sends (the good
    # events are from 2026-01-01).
    # It stops after the last event, not when idle (this test's pauses would count as idle).
    trainer = StreamingTrainer(s.model_copy(update={
        "idle_advance_s": 600.0, "stop_when_idle_s": None, "max_events": len(events) + 2}),
        registry=InMemoryRegistry())
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(trainer.run()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while trainer.pipeline is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert trainer.pipeline is not None
        producer.send(s.topic_clicks, orjson.dumps({"impression_id": "nobody", "ts": Y2099}))
        producer.send(s.topic_impressions, orjson.dumps({
            "impression_id": "future", "ts": Y2099, "user_id": "u", "ad_id": "a",
            "advertiser_id": "v"}))
        producer.flush()
        time.sleep(1.0)
        _send_good(producer, s, events[50:])
        producer.flush()
    finally:
        producer.close()
        thread.join(180)
    assert not thread.is_alive()
    # Every click within its window became a positive, none late (issue 10 F: the clock jumped
    # > 120 s in some runs, 0-16 of 17 positives, with no 2099 event reaching the tracker).
    positives, _ = _expected(events)
    assert out["join"]["positives"] == positives, out["join"]
    assert out["join"]["late_impressions"] == 0 and out["join"]["late_clicks"] == 0, out["join"]
    assert out["dead_lettered"] == 2
    dead = _dead_letters(kafka_broker.bootstrap, s.topic_dead_letter)
    assert len(dead) == 2
    assert all("ahead of the receiving clock" in d["reason"] for d in dead)
    assert trainer.pipeline is not None
    assert trainer.pipeline.tracker.clock < Y2099 - 1e9


def test_helpers_ask_brokers_not_to_auto_create_topics() -> None:
    assert PRODUCER_DEFAULTS["allow_auto_create_topics"] is False
    assert CONSUMER_DEFAULTS["allow_auto_create_topics"] is False


@pytest.mark.xfail(strict=True, reason="Tansu 0.6.0 ignores allow_auto_topic_creation in "
                   "MetadataRequest and creates the topic (4 partitions); Apache Kafka honours it")
def test_a_producer_does_not_create_a_missing_topic(kafka_broker: KafkaBroker,
                                                    topic_prefix: str) -> None:
    missing = f"{topic_prefix}never-created"
    producer = make_producer(kafka_broker.bootstrap, max_block_ms=3000)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send(missing, b"{}").get(10)
    finally:
        producer.close(timeout=5)
    consumer = make_consumer(kafka_broker.bootstrap, None)
    try:
        consumer.partitions_for_topic(missing)  # a metadata request for it, as consumers make
        assert missing not in consumer.topics()
    finally:
        consumer.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _train(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ctrloop.cli", "train", "--checkpoint-dir",
         str(tmp_path / "ckpt"), *args], capture_output=True, text=True, timeout=90)
    return proc, time.monotonic() - start


def _one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("ctrloop: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "ERROR" not in proc.stderr, proc.stderr[-3000:]  # no kafka-python retry chatter
    return lines[0]


def test_train_without_kafka_fails_fast_with_one_line(redis_server: RedisServer,
                                                      tmp_path: Path) -> None:
    port = _closed_port()
    proc, took = _train(tmp_path, "--kafka-bootstrap", f"127.0.0.1:{port}",
                        "--redis-url", redis_server.url)
    line = _one_error_line(proc)
    assert f"127.0.0.1:{port}" in line and "CTRLOOP_KAFKA_BOOTSTRAP" in line
    assert took < 45  # ~8 s of trying plus interpreter start-up on a busy machine


def test_train_without_redis_fails_fast_with_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    proc, took = _train(tmp_path, "--kafka-bootstrap", f"127.0.0.1:{_closed_port()}",
                        "--redis-url", f"redis://127.0.0.1:{port}/0")
    line = _one_error_line(proc)
    assert "Redis" in line and "CTRLOOP_REDIS_URL" in line
    assert took < 45
