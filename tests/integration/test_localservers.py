"""Round trips through the real broker and redis-server that `ctrloop.dev.localservers` starts."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from benchmarks.kafka_client import raw_consume_rate
from ctrloop.dev.localservers import KafkaBroker, RedisServer, find_binary, free_port
from ctrloop.io import kafka as kafkaio

pytestmark = pytest.mark.integration


def _poll_until(consumer: KafkaConsumer, n: int, timeout_s: float = 20.0) -> list[ConsumerRecord]:
    """Poll until `n` records arrived (group join included), ordered by (partition, offset)."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    assert len(records) == n, f"got {len(records)} of {n} records in {timeout_s} s"
    return sorted(records, key=lambda r: (r.partition, r.offset))


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_group_commit_and_resume(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    topic, group = f"{topic_prefix}impressions", f"{topic_prefix}trainer"
    assert kafkaio.create_topics(kafka_broker.bootstrap, [topic]) == [topic]
    producer = kafkaio.make_producer(kafka_broker.bootstrap)
    for i in range(10):
        producer.send(topic, json.dumps({"i": i}).encode(), key=f"imp-{i}".encode())
    producer.flush()

    tp = TopicPartition(topic, 0)
    first = kafkaio.make_consumer(kafka_broker.bootstrap, group, [topic])
    try:
        records = _poll_until(first, 10)
        assert [json.loads(r.value)["i"] for r in records] == list(range(10))
        assert records[3].key == b"imp-3"
        # highwater comes from the fetch response and is exact (end_offsets() is not, on Tansu).
        assert first.highwater(tp) == 10
        # Only the first 6 are "safely processed": the restarted member must start at 6.
        first.commit({tp: OffsetAndMetadata(6, "", -1)})
        assert first.committed(tp) == 6
    finally:
        first.close(autocommit=False)

    for i in range(10, 13):
        producer.send(topic, json.dumps({"i": i}).encode(), key=f"imp-{i}".encode())
    producer.close()

    second = kafkaio.make_consumer(kafka_broker.bootstrap, group, [topic])
    try:
        records = _poll_until(second, 7)
        assert [r.offset for r in records] == list(range(6, 13))
        assert [json.loads(r.value)["i"] for r in records] == list(range(6, 13))
        assert second.poll(timeout_ms=300) == {}  # nothing before the committed offset
    finally:
        second.close(autocommit=False)


def test_create_topics_is_idempotent(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    names = [f"{topic_prefix}clicks", f"{topic_prefix}conversions"]
    assert kafkaio.create_topics(kafka_broker.bootstrap, names, partitions=2) == names
    assert kafkaio.create_topics(kafka_broker.bootstrap, names, partitions=2) == []
    consumer = kafkaio.make_consumer(kafka_broker.bootstrap, None)
    try:
        assert consumer.partitions_for_topic(names[0]) == {0, 1}
    finally:
        consumer.close()


def test_assign_seek_pause_resume(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    # What the per-partition event-time alignment needs, without a group join.
    topic = f"{topic_prefix}events"
    kafkaio.create_topics(kafka_broker.bootstrap, [topic], partitions=2)
    producer = kafkaio.make_producer(kafka_broker.bootstrap)
    for i in range(20):
        producer.send(topic, b"%d" % i, partition=i % 2)
    producer.close()

    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = kafkaio.make_consumer(kafka_broker.bootstrap, None)
    try:
        consumer.assign([tp0, tp1])
        consumer.pause(tp1)
        records = _poll_until(consumer, 10)
        assert {r.partition for r in records} == {0}
        assert consumer.highwater(tp0) == 10
        consumer.seek(tp0, 7)
        consumer.resume(tp1)
        records = _poll_until(consumer, 13)
        assert [r.offset for r in records if r.partition == 0] == [7, 8, 9]
        assert [r.offset for r in records if r.partition == 1] == list(range(10))
    finally:
        consumer.close()


def test_raw_consume_rate(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    topic = f"{topic_prefix}rate"
    kafkaio.create_topics(kafka_broker.bootstrap, [topic])
    producer = kafkaio.make_producer(kafka_broker.bootstrap)
    for i in range(3000):
        producer.send(topic, json.dumps({"i": i, "pad": "x" * 250}).encode())
    producer.close()
    # Small fetches so the 3000 records span several polls and the rate is measurable.
    rate = raw_consume_rate(
        kafka_broker.bootstrap,
        [topic],
        3000,
        decode_json=True,
        max_poll_records=200,
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    assert rate > 0


def test_redis_set_get_and_pubsub(redis_server: RedisServer, topic_prefix: str) -> None:
    publisher = redis_server.client()
    listener = redis_server.client()
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        blob = os.urandom(1 << 20)
        publisher.set(f"{topic_prefix}model", blob)
        assert publisher.get(f"{topic_prefix}model") == blob

        channel = f"{topic_prefix}model-updates"
        pubsub.subscribe(channel)
        pubsub.get_message(timeout=1.0)  # the subscribe confirmation
        assert publisher.publish(channel, b"v17") == 1
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.5)
        assert message is not None
        assert message["data"] == b"v17"
    finally:
        pubsub.close()
        listener.close()
        publisher.close()


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path)
    redis = RedisServer(tmp_path, data_dir=tmp_path / "redis-data")
    with broker, redis:
        pids = [broker.pid, redis.pid]
        ports = [broker.port, redis.port]
        assert all(pid is not None and not _pid_gone(pid) for pid in pids)
        client = redis.client()
        client.set("k", "v")
        client.close()
    for pid, port in zip(pids, ports, strict=True):
        assert pid is not None and _pid_gone(pid)
        assert _port_closed(port)
    assert not broker.is_running() and not redis.is_running()
    broker.stop()  # idempotent
    assert broker.log_path is not None and "listening on" in broker.log_path.read_text()
    assert (tmp_path / "redis-data" / "appendonly.aof").exists()

    # A restart on the same data dir gets the keys back.
    with RedisServer(tmp_path, data_dir=tmp_path / "redis-data") as again:
        client = again.client()
        assert client.get("k") == b"v"
        client.close()


def test_find_binary_and_free_port() -> None:
    assert find_binary("tansu").name == "tansu"
    assert find_binary("redis-server").name == "redis-server"
    with pytest.raises(ValueError, match="unknown server binary"):
        find_binary("zookeeper")
    assert 0 < free_port() < 65536


@pytest.mark.parametrize("data_dir", [None, "redis-data"])
def test_servers_start_from_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           data_dir: str | None) -> None:
    # `ctrloop stack`'s default --workdir is relative. redis-server runs with cwd=log_dir and
    # used to get a relative --dir too, resolved again from inside log_dir: "Can't chdir".
    monkeypatch.chdir(tmp_path)
    redis = RedisServer("runs/logs", data_dir=data_dir)
    with KafkaBroker("runs/logs") as broker, redis:
        client = redis.client()
        assert client.ping()
        dirs = client.config_get("dir")["dir"]
        client.close()
        assert broker.log_path is not None and broker.log_path.is_absolute()
    expected = tmp_path / (data_dir or "runs/logs")
    assert Path(dirs) == expected and expected.is_dir()
    assert redis.log_path == tmp_path / "runs" / "logs" / redis.log_path.name
