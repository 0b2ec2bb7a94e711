"""StreamingTrainer._align_partitions decides when the stream is "caught up": that gates
event time following the wall clock and --stop-when-idle-s, so it must never say yes before the
consumer owns any partition (a group still rebalancing after a crashed member)."""

from __future__ import annotations

from typing import Any

from kafka import TopicPartition

from ctrloop.joining import WatermarkTracker
from trainer.streaming import StreamingTrainer


class _Consumer:
    def __init__(self, assigned: set[TopicPartition], highwater: dict[TopicPartition, int],
                 end: dict[TopicPartition, int]) -> None:
        self.assigned, self.hw, self.end = assigned, highwater, end
        self._paused: set[TopicPartition] = set()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.hw.get(tp)

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.end.get(tp, 0) for tp in tps}

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)


class _Pipeline:
    def __init__(self) -> None:
        self.tracker = WatermarkTracker(2.0)


def _trainer(consumer: Any, offsets: dict[TopicPartition, int]) -> StreamingTrainer:
    t = StreamingTrainer.__new__(StreamingTrainer)
    t.consumer = consumer
    t.offsets = dict(offsets)
    t.pipeline = _Pipeline()  # type: ignore[assignment]
    t._initial_end = {}
    return t


A, B = TopicPartition("imps", 0), TopicPartition("clicks", 0)


def test_no_assignment_is_not_caught_up() -> None:
    t = _trainer(_Consumer(set(), {}, {}), {A: 10, B: 4})
    assert t._align_partitions() is False


def test_restored_partition_waits_for_its_first_fetch() -> None:
    t = _trainer(_Consumer({A, B}, {}, {A: 10, B: 4}), {A: 10, B: 4})
    assert t._align_partitions() is False


def test_caught_up_when_every_assigned_partition_reached_its_highwater() -> None:
    consumer = _Consumer({A, B}, {A: 10, B: 4}, {})
    t = _trainer(consumer, {A: 10, B: 3})
    assert t._align_partitions() is False
    t.offsets[B] = 4
    assert t._align_partitions() is True


def test_empty_partition_never_read_is_caught_up() -> None:
    t = _trainer(_Consumer({A}, {}, {A: 0}), {})
    assert t._align_partitions() is True


def test_partition_far_ahead_is_paused_then_resumed() -> None:
    consumer = _Consumer({A, B}, {A: 10, B: 10}, {})
    t = _trainer(consumer, {A: 5, B: 5})
    tracker = t.pipeline.tracker  # type: ignore[union-attr]
    tracker.observe(A, 1000.0)
    tracker.observe(B, 1000.0 + 600.0)
    t._align_partitions()
    assert consumer.paused() == {B}
    tracker.observe(A, 1000.0 + 600.0)
    t._align_partitions()
    assert consumer.paused() == set()
