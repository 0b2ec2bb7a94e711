"""Pausing and resuming partitions on the real broker: a resumed partition keeps delivering.

The streaming trainer pauses partitions that run ahead in event time. kafka-python 3.0.12
parks records already fetched for a partition that gets paused, and puts them back on resume
only if its "next records" slot is `None` — a drained slot is falsy but not `None`, so the
partition stops for good (ctrloop/io/kafka.py, `release_parked_records`). The scenario below
builds exactly that state: records of A in the slot when A is paused, B read to its end (the
slot drained), then A resumed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, TopicPartition

from ctrloop.dev.localservers import KafkaBroker
from ctrloop.io import kafka as kafkaio

pytestmark = pytest.mark.integration

N = 2000


def _produce(bootstrap: str, topics: list[str]) -> None:
    producer = kafkaio.make_producer(bootstrap)
    for topic in topics:
        for i in range(N):
            producer.send(topic, f"{topic}:{i}".encode())
    producer.flush()
    producer.close()


def _poll(consumer: KafkaConsumer, seen: dict[TopicPartition, int], fix: bool) -> None:
    if fix:
        kafkaio.release_parked_records(consumer)
    for tp, records in consumer.poll(timeout_ms=100, max_records=50).items():
        seen[tp] = seen.get(tp, 0) + len(records)


def _until(consumer: KafkaConsumer, seen: dict[TopicPartition, int], fix: bool,
           done: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        _poll(consumer, seen, fix)
    return True


def _pause_drain_other_resume(bootstrap: str, prefix: str, fix: bool) -> dict[str, int]:
    a, b = f"{prefix}ahead", f"{prefix}behind"
    kafkaio.create_topics(bootstrap, [a, b])
    _produce(bootstrap, [a, b])
    tpa, tpb = TopicPartition(a, 0), TopicPartition(b, 0)
    consumer = kafkaio.make_consumer(bootstrap, None)
    consumer.assign([tpa, tpb])
    seen: dict[TopicPartition, int] = {}
    try:
        # Some of A read, the rest of the fetched batch still waiting in the slot.
        assert _until(consumer, seen, fix, lambda: 0 < seen.get(tpa, 0) < N)
        consumer.pause(tpa)
        assert _until(consumer, seen, fix, lambda: seen.get(tpb, 0) == N)
        paused_at = seen[tpa]
        consumer.resume(tpa)
        # Without the workaround A never moves again; 3 s is many polls on a local broker.
        _until(consumer, seen, fix, lambda: seen.get(tpa, 0) == N, 15.0 if fix else 3.0)
        return {"a_when_paused": paused_at, "a": seen.get(tpa, 0), "b": seen.get(tpb, 0)}
    finally:
        consumer.close()


def test_a_resumed_partition_is_read_to_its_end(kafka_broker: KafkaBroker,
                                                 topic_prefix: str) -> None:
    got = _pause_drain_other_resume(kafka_broker.bootstrap, topic_prefix, fix=True)
    assert got["a_when_paused"] < N  # the scenario really paused A mid-topic
    assert got == {"a_when_paused": got["a_when_paused"], "a": N, "b": N}


def test_without_the_workaround_kafka_python_stalls(kafka_broker: KafkaBroker,
                                                    topic_prefix: str) -> None:
    """The upstream bug the workaround exists for. When this fails, kafka-python fixed it and
    `release_parked_records` can go (keep the test above)."""
    got = _pause_drain_other_resume(kafka_broker.bootstrap, topic_prefix, fix=False)
    assert got["b"] == N
    assert got["a"] < N, "kafka-python no longer loses parked records: drop the workaround"
