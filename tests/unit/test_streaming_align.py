"""StreamingTrainer._align_partitions decides which partitions stop holding event time back
(idle) and when the whole stream is: that gates event time following the wall clock and
--stop-when-idle-s, so it must never say yes before the consumer owns any partition (a group
still rebalancing after a crashed member), for a partition whose highwater is stale (issue 10
F), or for a busy partition."""

from __future__ import annotations

from typing import Any

import orjson
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError

from ctrloop.core.joining import WatermarkTracker
from ctrloop.trainer.settings import TrainerSettings
from ctrloop.trainer.streaming import StreamingTrainer


class _Consumer:
    """`highwater`: of the last fetch parsed; `end`: what ListOffsets answers now."""

    def __init__(self, assigned: set[TopicPartition], highwater: dict[TopicPartition, int],
                 end: dict[TopicPartition, int]) -> None:
        self.assigned, self.hw, self.end = assigned, highwater, end
        self._paused: set[TopicPartition] = set()
        self.end_calls = 0

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.hw.get(tp)

    def end_offsets(self, tps: list[TopicPartition],
                    timeout_ms: int | None = None) -> dict[TopicPartition, int]:
        self.end_calls += 1
        return {tp: self.end.get(tp, 0) for tp in tps}

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    def pause(self, *tps: TopicPartition) -> None:
        self._paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self._paused.difference_update(tps)


class _Encoder:
    """Rows are not looked at here: the trainer encodes a poll's impressions together."""

    def encode_rows(self, imps: list[Any]) -> list[None]:
        return [None] * len(imps)


class _Pipeline:
    def __init__(self) -> None:
        self.tracker = WatermarkTracker(2.0)
        self.encoder = _Encoder()


QUIET = 2.0  # idle_advance_s


def _trainer(consumer: Any, offsets: dict[TopicPartition, int]) -> StreamingTrainer:
    t = StreamingTrainer.__new__(StreamingTrainer)
    t.s = TrainerSettings(idle_advance_s=QUIET)
    t.consumer = consumer
    t.offsets = dict(offsets)
    t.pipeline = _Pipeline()  # type: ignore[assignment]
    t._last_record = {}
    return t


A, B = TopicPartition("imps", 0), TopicPartition("clicks", 0)
T0 = 1000.0  # wall clock (monotonic) of the first align


def _idle(t: StreamingTrainer) -> set[TopicPartition]:
    return set(t.pipeline.tracker._idle)  # type: ignore[union-attr]


def test_no_assignment_is_not_caught_up() -> None:
    t = _trainer(_Consumer(set(), {}, {}), {A: 10, B: 4})
    assert t._align_partitions(T0) is False


def test_restored_partition_waits_for_its_first_fetch() -> None:
    t = _trainer(_Consumer({A, B}, {}, {A: 10, B: 4}), {A: 10, B: 4})
    assert t._align_partitions(T0) is False
    assert t._align_partitions(T0 + 60) is False


def test_caught_up_when_every_partition_is_read_to_its_end_and_quiet() -> None:
    consumer = _Consumer({A, B}, {A: 10, B: 4}, {A: 10, B: 4})
    t = _trainer(consumer, {A: 10, B: 3})
    tracker = t.pipeline.tracker  # type: ignore[union-attr]
    tracker.observe(A, 100.0)
    tracker.observe(B, 90.0)
    assert t._align_partitions(T0) is False
    assert t._align_partitions(T0 + QUIET) is False  # B is not read to its end
    assert _idle(t) == {A}
    t.offsets[B] = 4
    assert t._align_partitions(T0 + QUIET) is True
    assert _idle(t) == {A, B}


def test_a_busy_partition_holds_event_time_even_at_its_end() -> None:
    # Read to its end but it delivered a moment ago: its next events come at its own ts. Were
    # it idle, a partition whose events run ahead (conversions) would set the clock for all.
    consumer = _Consumer({A, B}, {A: 10, B: 4}, {A: 10, B: 4})
    t = _trainer(consumer, {A: 10, B: 4})
    tracker = t.pipeline.tracker  # type: ignore[union-attr]
    tracker.observe(A, 100.0)
    tracker.observe(B, 5000.0)
    t._align_partitions(T0)
    t._last_record[A] = T0 + 1.5  # A delivered records at T0 + 1.5
    assert t._align_partitions(T0 + QUIET) is False
    assert _idle(t) == {B} and tracker.clock == 100.0
    assert t._align_partitions(T0 + 1.5 + QUIET) is True
    assert tracker.clock == 100.0  # all idle: the clock stays, it does not jump to 5000


def test_stale_highwater_is_not_caught_up() -> None:
    # Issue 10 F: the highwater is that of the last fetch *parsed*; kafka-python parses a
    # partition's response only when a poll reaches it (it may wait behind another partition's
    # backlog), and a live producer goes on writing. Offset == highwater proved nothing: the
    # fresh end offset does.
    consumer = _Consumer({A, B}, {A: 10, B: 4}, {A: 10, B: 9})
    t = _trainer(consumer, {A: 10, B: 4})
    tracker = t.pipeline.tracker  # type: ignore[union-attr]
    tracker.observe(A, 100.0)
    tracker.observe(B, 50.0)
    t._align_partitions(T0)
    assert t._align_partitions(T0 + QUIET) is False
    assert _idle(t) == {A}
    assert tracker.clock == 50.0  # B's unread records keep their windows open


def test_end_offsets_unavailable_means_nothing_is_idle() -> None:
    class _Failing(_Consumer):
        def end_offsets(self, tps: list[TopicPartition],
                        timeout_ms: int | None = None) -> dict[TopicPartition, int]:
            raise KafkaTimeoutError("no answer")

    t = _trainer(_Failing({A}, {A: 10}, {A: 10}), {A: 10})
    t.pipeline.tracker.observe(A, 100.0)  # type: ignore[union-attr]
    t._align_partitions(T0)
    assert t._align_partitions(T0 + QUIET) is False
    assert _idle(t) == set()


def test_only_quiet_caught_up_partitions_cost_a_list_offsets_request() -> None:
    consumer = _Consumer({A}, {A: 10}, {A: 10})
    t = _trainer(consumer, {A: 10})
    t.pipeline.tracker.observe(A, 100.0)  # type: ignore[union-attr]
    t._align_partitions(T0)
    assert consumer.end_calls == 0  # busy (just seen)
    t._align_partitions(T0 + QUIET)
    assert consumer.end_calls == 1


def test_empty_partition_never_read_is_caught_up() -> None:
    t = _trainer(_Consumer({A}, {}, {A: 0}), {})
    assert t._align_partitions(T0) is True


def test_empty_partition_that_got_records_is_not() -> None:
    t = _trainer(_Consumer({A}, {}, {A: 3}), {})
    assert t._align_partitions(T0) is False


def test_partition_far_ahead_is_paused_then_resumed() -> None:
    consumer = _Consumer({A, B}, {A: 10, B: 10}, {A: 10, B: 10})
    t = _trainer(consumer, {A: 5, B: 5})
    tracker = t.pipeline.tracker  # type: ignore[union-attr]
    tracker.observe(A, 1000.0)
    tracker.observe(B, 1000.0 + 600.0)
    t._align_partitions(T0)
    assert consumer.paused() == {B}
    tracker.observe(A, 1000.0 + 600.0)
    t._align_partitions(T0)
    assert consumer.paused() == set()


class _Record:
    def __init__(self, offset: int, body: dict[str, Any]) -> None:
        self.offset, self.value, self.key, self.timestamp = offset, orjson.dumps(body), None, -1


class _RecordingPipeline(_Pipeline):
    """Processes only what the tracker sees; notes the clock each event was judged by."""

    def __init__(self) -> None:
        super().__init__()
        self.judged: list[tuple[TopicPartition, float, float]] = []

    def process(self, event: Any, source: TopicPartition, row: Any = None) -> None:
        self.tracker.observe(source, event.ts)
        self.judged.append((source, event.ts, self.tracker.clock))


def test_records_of_a_partition_marked_idle_are_not_judged_by_others_in_the_same_poll() -> None:
    # Issue 10 F, as the instrumented kill -9 run showed it: impressions marked idle at the
    # last align (offset == the highwater of a fetch parsed earlier), then one poll returned
    # trailing clicks (ts far ahead) *before* the impressions that were waiting in the fetch
    # buffer: the clock followed the clicks and 104 impressions were late.
    t = _trainer(_Consumer({A, B}, {}, {}), {})
    t.kinds = {"imps": "impression", "clicks": "click"}
    pipeline = _RecordingPipeline()
    t.pipeline = pipeline  # type: ignore[assignment]
    ts0 = 1_767_225_600.0
    pipeline.tracker.observe(A, ts0)
    pipeline.tracker.observe(B, ts0)
    pipeline.tracker.set_idle(A, True)
    clicks = [_Record(i, {"impression_id": f"c{i}", "ts": ts0 + 50 + i}) for i in range(3)]
    imps = [_Record(i, {"impression_id": f"i{i}", "ts": ts0 + 1 + i, "user_id": "u",
                        "ad_id": "a", "advertiser_id": "v"}) for i in range(3)]
    assert t._consume({B: clicks, A: imps}, T0) == 6  # type: ignore[dict-item]
    judged = [(ts, clock) for tp, ts, clock in pipeline.judged if tp == A]
    assert len(judged) == 3 and all(clock <= ts for ts, clock in judged), judged
    assert t.offsets == {A: 3, B: 3} and t._last_record == {A: T0, B: T0}
