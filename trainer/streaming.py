"""`ctrloop train`: the pipeline fed from Kafka, publishing to the Redis registry.

Delivery guarantee: **exactly-once effect on the model** for every event in the topics.
- Offsets advance only through checkpoints. A checkpoint holds the model and optimizer, the
  joiner's pending impressions, the samples released but not yet learned, the event-time clock
  and the next offset of every partition — written atomically (trainer/checkpoint.py), then the
  offsets are committed to Kafka.
- After a crash (kill -9) the trainer restores the checkpoint and seeks every partition to the
  checkpoint's offsets, so events after it are replayed onto exactly the state that had not seen
  them; what the dead process learned after the checkpoint is learned again, once.
- Duplicates *in the input* (a producer retry, a replayed HTTP batch) are dropped by the joiner by
  impression_id and counted (`duplicate_impressions`, `duplicate_clicks`).
- Snapshots published after the last checkpoint are re-published later under new, higher
  versions: versions never repeat or go backwards.
- A malformed message goes to the dead-letter topic with its reason; the DLQ producer is flushed
  before each checkpoint, so a rejected message is never lost either. "Malformed" is anything a
  producer can write: a tombstone (no value), binary or non-UTF-8 bytes, a value over
  MAX_LINE_BYTES, whatever the headers. The dead letter shows the payload safely (bytes that are
  not UTF-8 escaped as \\xNN, at most DLQ_PAYLOAD_BYTES of it) and the trainer goes on.
- Event-time policy (docs/reliability.md): an event whose ts is more than max_event_ahead_s
  (CTRLOOP_MAX_EVENT_AHEAD_S) ahead of its Kafka record's timestamp *or* of the trainer's wall
  clock is dead-lettered: one click stamped 2099 would otherwise move event time to 2099 for good
  (checkpointed), and every later click would be late. Both clocks, because a backlog's records
  carry old timestamps (the wall clock alone would pass a ts an hour ahead of a day-old record)
  and a producer can forge the record timestamp (the record clock alone would pass that).
  Replay from a file has no receiving clock and checks neither. Behind that, the watermark
  tracker does not let one partition's frontier jump more than that bound on a single record
  (ctrloop.core.joining.WatermarkTracker, `max_jump`).

Event time: the clock is the minimum over partitions of the newest ts each delivered, minus the
allowed lateness for negatives (ctrloop.core.joining.WatermarkTracker). A partition that runs more
than `align_slack` seconds ahead is paused until the others catch up, which keeps the joiner's
state small when the trainer reads a backlog.

A partition stops holding event time back ("idle") only when all three hold (_align_partitions):
- it delivered nothing for `idle_advance_s` of wall time (or never delivered anything): a busy
  partition holds the clock at its newest ts even when read to its end, so a topic whose event
  times run ahead of the others (conversions stamped hours ahead, a producer's fast clock)
  cannot drag the clock over everyone else's events;
- it is read up to the highwater of its last fetch, and
- a ListOffsets request made *now* finds nothing beyond what was read. The highwater alone is
  stale: kafka-python sets it when it parses a partition's fetch response, and a response can
  wait, parsed later, behind another partition's big one (a backlog after a restart), while the
  producer keeps writing. A partition taken for idle on it let the others move event time past
  its unread records, whose windows then closed early (issue 10 F: clicks lost across kill -9).
Every partition holds event time again as soon as a poll returns records (the idle marks were
confirmed before that fetch), and is confirmed anew after them. So a record can only be judged
late against records that were *produced before it* and run ahead of it by more than the
window plus the allowed lateness — a property of the stream, not of how fast or how often the
trainer read it, restarts included. When every partition is idle, event time follows the wall
clock so that windows close and snapshots go out on a quiet stream too (never the most advanced
partition's ts, for the reason above).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from ctrloop.core.batch import decode_batch
from ctrloop.core.errors import DependencyError, InvalidEvent
from ctrloop.core.events import Event, Impression, check_not_ahead
from ctrloop.core.features import FeatureSpec
from ctrloop.io.kafka import (
    create_topics,
    make_consumer,
    make_producer,
    release_parked_records,
)
from ctrloop.io.registry import ModelRegistry, RedisRegistry
from ctrloop.trainer.checkpoint import load_checkpoint, save_checkpoint
from ctrloop.trainer.gc_tuning import quiet_gc
from ctrloop.trainer.pipeline import Pipeline
from ctrloop.trainer.settings import TrainerSettings

log = logging.getLogger("ctrloop.trainer")

INFER_IMPRESSIONS = 2000
ALIGN_SLACK_S = 60.0
DLQ_PAYLOAD_BYTES = 4096
# Bound on reaching Kafka and Redis at start: a trainer pointed at nothing says so in seconds.
CONNECT_TIMEOUT_S = 8.0


class RegistryPublisher:
    """Pushes snapshots to the registry, at most once per `min_interval_s` of wall time."""

    def __init__(self, registry: ModelRegistry, min_interval_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 extra_meta: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = registry
        self._extra_meta = extra_meta
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last = -float("inf")
        self.published = 0
        self.last_seconds = 0.0

    def __call__(self, pipeline: Pipeline, event_clock: float) -> str | None:
        now = self._clock()
        if now - self._last < self.min_interval_s:
            return None
        t0 = time.perf_counter()
        version = self.registry.next_version()
        learner = pipeline.learner
        report = learner.metrics.report().as_dict()
        meta = {"event_time": event_clock, "samples_seen": learner.samples_seen,
                "positives_seen": learner.positives_seen, "metrics": report}
        if self._extra_meta is not None:
            meta["trainer"] = self._extra_meta()
        bundle = pipeline.bundle(version, meta)
        main, main_meta = bundle.pop(pipeline.ctr.name)
        # Heads (pCVR) first: a reader that sees pCTR version v finds head version v too.
        for name, (blob, record_meta) in bundle.items():
            self.registry.head(name).publish(version, blob, record_meta)
        self.registry.publish(version, main, main_meta)
        self._last = now
        self.published += 1
        self.last_seconds = time.perf_counter() - t0
        return str(version)


def _tp_key(tp: TopicPartition) -> str:
    return f"{tp.topic}:{tp.partition}"


def _tp_from_key(key: str) -> TopicPartition:
    topic, _, partition = key.rpartition(":")
    return TopicPartition(topic, int(partition))


@dataclass
class _Counters:
    consumed: int = 0
    dead_lettered: int = 0
    checkpoints: int = 0
    commit_failures: int = 0


class _SeekToCheckpoint(ConsumerRebalanceListener):
    def __init__(self, trainer: StreamingTrainer) -> None:
        self.trainer = trainer

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        for tp in assigned:
            offset = self.trainer.offsets.get(tp)
            if offset is not None:
                self.trainer.consumer.seek(tp, offset)


class StreamingTrainer:
    def __init__(self, settings: TrainerSettings, registry: ModelRegistry | None = None) -> None:
        self.s = settings
        self._check_redis = registry is None
        self.registry = registry or RedisRegistry.from_url(
            settings.redis_url, settings.registry_namespace, settings.registry_keep)
        self.kinds = {settings.topic_impressions: "impression", settings.topic_clicks: "click",
                      settings.topic_conversions: "conversion"}
        self.offsets: dict[TopicPartition, int] = {}
        self.counters = _Counters()
        self.pipeline: Pipeline | None = None
        self.publisher = RegistryPublisher(self.registry, settings.min_publish_interval_s,
                                           extra_meta=self._publish_meta)
        self._stop = False
        # Wall time (monotonic) each partition last delivered a record, or was first seen.
        self._last_record: dict[TopicPartition, float] = {}
        self._buffered: list[tuple[Any, TopicPartition]] = []  # held until a spec is inferred
        # When (time.monotonic) a poll last returned records: what a throughput measurement
        # ends at (the trainer then waits for the stream to be confirmed quiet).
        self.last_record_at: float | None = None
        self.consumer: KafkaConsumer
        self.dlq: KafkaProducer

    def _publish_meta(self) -> dict[str, Any]:
        """Trainer counters that travel with each snapshot (the service exports them)."""
        return {"consumed": self.counters.consumed,
                "dead_lettered": self.counters.dead_lettered,
                "checkpoints": self.counters.checkpoints}

    # --- setup ---------------------------------------------------------------------------

    def _restore_or_none(self) -> None:
        state = load_checkpoint(self.s.checkpoint_dir)
        if state is None:
            return
        spec = FeatureSpec.from_dict(state["spec"])
        self.pipeline = self._new_pipeline(spec)
        self.pipeline.restore(state["pipeline"], _tp_from_key)
        self.offsets = {_tp_from_key(k): int(v) for k, v in state["offsets"].items()}
        log.info("restored checkpoint: %d samples learned, model version %s, %d partitions",
                 self.pipeline.stats.learned, self.pipeline.model_version, len(self.offsets))

    def _new_pipeline(self, spec: FeatureSpec) -> Pipeline:
        # Live input only: a partition's frontier may not jump further than events may run
        # ahead of their receiver (replay keeps the plain tracker, byte-identical).
        config = dataclasses.replace(self.s.pipeline_config(),
                                     watermark_max_jump=self.s.max_event_ahead_s)
        return Pipeline(spec, config, publisher=self.publisher, seed=self.s.seed)

    def _spec_from_settings(self) -> FeatureSpec | None:
        if self.s.feature_spec is not None:
            return FeatureSpec.load(self.s.feature_spec)
        return None

    # --- main loop -----------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def _connect(self) -> None:
        """Reach Redis and Kafka (creating the topics) within CONNECT_TIMEOUT_S each, or raise
        DependencyError saying what to start or set (kafka-python alone retries for 30 s, logging
        every attempt, then raises its own timeout)."""
        s = self.s
        if self._check_redis:
            client = redis.Redis.from_url(s.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S,
                                          socket_timeout=CONNECT_TIMEOUT_S)
            try:
                client.ping()
            except redis.RedisError as e:
                raise DependencyError(
                    f"cannot reach Redis at {s.redis_url} ({type(e).__name__}: {e}); start "
                    "redis-server (`ctrloop stack` runs Kafka, Redis and the trainer together) "
                    "or set CTRLOOP_REDIS_URL / --redis-url") from None
            finally:
                client.close()
        # kafka-python logs each refused connection at ERROR; one line from us says it all.
        kafka_log = logging.getLogger("kafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)
        try:
            create_topics(s.kafka_bootstrap, [*self.kinds, s.topic_dead_letter],
                          timeout_s=CONNECT_TIMEOUT_S)
        except KafkaError as e:
            raise DependencyError(
                f"cannot reach Kafka at {s.kafka_bootstrap} within {CONNECT_TIMEOUT_S:.0f} s "
                f"({type(e).__name__}); start a broker (`ctrloop stack` runs one with Redis and "
                "the trainer) or set CTRLOOP_KAFKA_BOOTSTRAP / --kafka-bootstrap") from None
        finally:
            kafka_log.setLevel(level)

    def run(self) -> dict[str, Any]:
        with quiet_gc():
            return self._run()

    def _run(self) -> dict[str, Any]:
        s = self.s
        torch.set_num_threads(1)
        self._connect()
        self._restore_or_none()
        if self.pipeline is None:
            spec = self._spec_from_settings()
            if spec is not None:
                self.pipeline = self._new_pipeline(spec)
        self.dlq = make_producer(s.kafka_bootstrap)
        self.consumer = make_consumer(s.kafka_bootstrap, s.group_id)
        self.consumer.subscribe(list(self.kinds), listener=_SeekToCheckpoint(self))
        last_event_wall = time.monotonic()
        last_ckpt = last_log = time.monotonic()
        started = time.monotonic()
        idle_since: float | None = None
        try:
            while not self._stop:
                release_parked_records(self.consumer)
                polled = self.consumer.poll(timeout_ms=200, max_records=5000)
                now = time.monotonic()
                got = self._consume(polled, now)
                self.counters.consumed += got
                if self.pipeline is None and self._buffered:
                    self._maybe_infer(self._buffered, force=got == 0)
                    if self.pipeline is not None:
                        self._buffered = []
                if got:
                    last_event_wall = self.last_record_at = now
                    idle_since = None
                if self.pipeline is not None:
                    caught_up = self._align_partitions(now)
                    if caught_up and now - last_event_wall >= s.idle_advance_s:
                        # A quiet stream: let event time follow the wall clock.
                        self.pipeline.advance_idle(self.pipeline.tracker.clock
                                                   + (now - last_event_wall))
                        last_event_wall = now
                    if caught_up and got == 0:
                        idle_since = idle_since or now
                if now - last_ckpt >= s.checkpoint_interval_s:
                    self.checkpoint()
                    last_ckpt = now
                if now - last_log >= s.log_interval_s:
                    self._log(now - started)
                    last_log = now
                if s.max_events is not None and self.counters.consumed >= s.max_events:
                    break
                if (s.stop_when_idle_s is not None and idle_since is not None
                        and now - idle_since >= s.stop_when_idle_s):
                    break
            self.checkpoint()
            return self.summary(time.monotonic() - started)
        finally:
            self.consumer.close(autocommit=False)
            self.dlq.close(timeout=10)

    def _consume(self, polled: dict[TopicPartition, list[Any]], now: float) -> int:
        """Decode, check and process one poll's records (dead-lettering the bad ones); returns
        how many records there were."""
        ahead = self.s.max_event_ahead_s
        wall_limit = time.time() + ahead
        got = 0
        if polled and self.pipeline is not None:
            # The idle marks were confirmed before this fetch: a partition marked idle may have
            # records that the other partitions' records here run ahead of, later in this poll
            # (processed after them) or not fetched yet. Every partition holds event time until
            # _align_partitions confirms it again.
            self.pipeline.tracker.wake()
        for tp, records in polled.items():
            if not records:
                continue
            self._last_record[tp] = now
            got += len(records)
            self.offsets[tp] = records[-1].offset + 1
            # One partition's records decoded and validated column-wise (ctrloop/core/batch.py:
            # the same events and reject reasons as decode_event, record by record).
            batch = decode_batch([rec.value for rec in records], self.kinds[tp.topic])
            for index, reason in batch.rejects:
                self._dead_letter(tp, records[index], reason)
            accepted = []
            for index, event in zip(batch.indices, batch.events, strict=True):
                rec = records[index]
                if event.ts > wall_limit or (
                        rec.timestamp >= 0 and event.ts > rec.timestamp / 1000.0 + ahead):
                    try:
                        self._refuse_ahead(event.ts, rec.timestamp, wall_limit - ahead)
                    except InvalidEvent as e:
                        self._dead_letter(tp, rec, e.reason)
                        continue
                accepted.append(event)
            self._process(accepted, tp)
        return got

    def _process(self, events: list[Event], tp: TopicPartition) -> None:
        pipe = self.pipeline
        if pipe is None:
            self._buffered.extend((event, tp) for event in events)
            return
        # The impressions' rows encoded together, in order (the encoder's stats as one by one).
        imps = [e for e in events if type(e) is Impression]
        rows = iter(pipe.encoder.encode_rows(imps)) if imps else iter(())
        for event in events:
            pipe.process(event, tp, next(rows) if type(event) is Impression else None)

    def _maybe_infer(self, buffered: list[tuple[Any, TopicPartition]], force: bool) -> None:
        imps = [e for e, _ in buffered if isinstance(e, Impression)]
        if len(imps) < INFER_IMPRESSIONS and not (force and imps):
            return
        spec = FeatureSpec.infer(imps[:INFER_IMPRESSIONS])
        self.pipeline = self._new_pipeline(spec)
        for tp in self.consumer.assignment():
            self.pipeline.tracker.register(tp)
        self.s.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.s.checkpoint_dir / "feature_spec.json"
        spec.save(path)
        log.info("inferred a feature spec from %d impressions (saved to %s; edit it and pass "
                 "--feature-spec to reuse):\n%s", len(imps[:INFER_IMPRESSIONS]), path,
                 spec.to_json())
        for event, tp in buffered:
            self.pipeline.process(event, tp)

    def _align_partitions(self, now: float) -> bool:
        """Mark the partitions that may stop holding event time back idle (module docstring),
        pause the ones far ahead; True if every partition is idle."""
        assert self.pipeline is not None
        tracker = self.pipeline.tracker
        assigned = self.consumer.assignment()
        if not assigned:
            # No partitions yet: the group is still (re)balancing, e.g. waiting for a killed
            # member's session to expire. That is not "caught up": treating it so let event
            # time follow the wall clock (closing windows before their clicks were read) and
            # let --stop-when-idle-s stop a restarted trainer before it read anything.
            return False
        quiet_s = self.s.idle_advance_s
        candidates = []
        for tp in assigned:
            tracker.register(tp)
            last = self._last_record.setdefault(tp, now)
            # A partition that never delivered has no ts to hold the clock at; one that did
            # holds it while it is busy.
            if tracker.max_ts(tp) > float("-inf") and now - last < quiet_s:
                continue
            hw = self.consumer.highwater(tp)
            if hw is None:
                # No fetch parsed yet: only a partition this trainer never read from can be
                # judged (empty), below; a restored one waits for its first fetch.
                if tp not in self.offsets:
                    candidates.append(tp)
            elif self.offsets.get(tp, 0) >= hw:
                candidates.append(tp)
        idle: set[TopicPartition] = set()
        if candidates:
            try:
                # Tansu answers the base offset of the last batch + 1 (ctrloop/io/kafka.py): a
                # batch appended after our position still shows; records we hold but have not
                # processed (a batch split over polls) are caught by the highwater test above.
                end = self.consumer.end_offsets(candidates, timeout_ms=5000)
            except KafkaError as e:
                log.debug("end offsets unavailable (%s): no partition is idle this round", e)
                end = {}
            idle = {tp for tp in candidates if tp in end and self.offsets.get(tp, 0) >= end[tp]}
        for tp in assigned:
            tracker.set_idle(tp, tp in idle)
        clock = tracker.clock
        to_pause, to_resume = [], []
        paused = self.consumer.paused()
        for tp in assigned:
            ahead = tracker.max_ts(tp) > clock + ALIGN_SLACK_S
            if ahead and tp not in paused:
                to_pause.append(tp)
            elif not ahead and tp in paused:
                to_resume.append(tp)
        if to_pause:
            self.consumer.pause(*to_pause)
        if to_resume:
            self.consumer.resume(*to_resume)
        return len(idle) == len(assigned)

    def _refuse_ahead(self, ts: float, record_ms: int, wall: float) -> None:
        """Raise InvalidEvent naming the clock that `ts` runs too far ahead of."""
        ahead = self.s.max_event_ahead_s
        if record_ms >= 0:
            check_not_ahead(ts, record_ms / 1000.0, ahead)
        check_not_ahead(ts, wall, ahead)

    def _dead_letter(self, tp: TopicPartition, rec: Any, reason: str) -> None:
        """Send a rejected record to the dead-letter topic; never raises on what the record
        holds (no value, no key, binary, a megabyte, any headers)."""
        self.counters.dead_lettered += 1
        value = rec.value
        if value is None:
            raw = b""
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
        else:  # a deserializer configured elsewhere: show what it gave
            raw = repr(value).encode()
        key = rec.key if isinstance(rec.key, bytes) or rec.key is None else repr(rec.key).encode()
        value = orjson.dumps({
            "reason": reason, "topic": tp.topic, "partition": tp.partition,
            "offset": rec.offset, "timestamp_ms": rec.timestamp,
            "value_bytes": None if rec.value is None else len(raw),
            # Valid UTF-8 reads as itself; anything else as \xNN escapes (a JSON string cannot
            # carry raw bytes, and U+FFFD replacement would hide what was sent).
            "payload": raw[:DLQ_PAYLOAD_BYTES].decode("utf-8", "backslashreplace"),
            "truncated": len(raw) > DLQ_PAYLOAD_BYTES,
        })
        # The original key, bounded: a dead letter must fit where its record did.
        self.dlq.send(self.s.topic_dead_letter,
                      key=None if key is None else key[:DLQ_PAYLOAD_BYTES], value=value)
        if self.counters.dead_lettered <= 10 or self.counters.dead_lettered % 1000 == 0:
            log.warning("dead-lettered %s:%d@%d: %s (%d so far)", tp.topic, tp.partition,
                        rec.offset, reason, self.counters.dead_lettered)

    def checkpoint(self) -> None:
        """Flush the DLQ, write the checkpoint, then commit offsets (in that order)."""
        self.dlq.flush(timeout=30)
        if self.pipeline is None:
            return  # nothing learned yet; buffered events will be re-read
        save_checkpoint(self.s.checkpoint_dir, {
            "spec": self.pipeline.spec.to_dict(),
            "pipeline": self.pipeline.state(_tp_key),
            "offsets": {_tp_key(tp): off for tp, off in self.offsets.items()},
        })
        self.counters.checkpoints += 1
        # Not while the group is (re)joining: the broker refuses it (RebalanceInProgress, a
        # WARNING every checkpoint), and the checkpoint already holds the offsets.
        if self.offsets and self.consumer.assignment():
            try:
                self.consumer.commit({tp: OffsetAndMetadata(off, "", -1)
                                      for tp, off in self.offsets.items()})
            except KafkaError as e:
                # Not fatal: the checkpoint's offsets are the authority on restart; Kafka's
                # committed offsets only show lag (e.g. a commit during a rebalance after a
                # crashed member is refused until the group settles).
                self.counters.commit_failures += 1
                log.warning("offset commit failed (%s); the checkpoint holds the offsets", e)

    def summary(self, elapsed: float) -> dict[str, Any]:
        out: dict[str, Any] = {"consumed": self.counters.consumed,
                               "dead_lettered": self.counters.dead_lettered,
                               "checkpoints": self.counters.checkpoints,
                               "published": self.publisher.published,
                               "seconds": elapsed}
        if self.pipeline is not None:
            out.update(self.pipeline.summary())
        return out

    def _log(self, elapsed: float) -> None:
        if self.pipeline is None:
            log.info("waiting for impressions to infer a feature spec (%d events consumed)",
                     self.counters.consumed)
            return
        p = self.pipeline
        m = p.learner.metrics.report()
        log.info("%9d events (%6.0f/s)  learned %9d  pending %7d  logloss %.4f  AUC %.4f  "
                 "calib %.3f  model v%s  DLQ %d", self.counters.consumed,
                 self.counters.consumed / max(elapsed, 1e-9), p.stats.learned, p.joiner.pending,
                 m.logloss, m.auc, m.calibration, p.model_version, self.counters.dead_lettered)
        behind = {f"{tp.topic}[{tp.partition}]": [self.offsets.get(tp, 0), hw]
                  for tp in self.consumer.assignment()
                  if (hw := self.consumer.highwater(tp)) is None or self.offsets.get(tp, 0) < hw}
        if behind or self.consumer.paused():
            # What holds event time back: partitions not read to their end ([offset, end])
            # and the ones paused for being ahead of the others.
            log.info("behind %s  paused %s  clock %s", behind,
                     sorted(f"{tp.topic}[{tp.partition}]" for tp in self.consumer.paused()),
                     p.tracker.clock)


def run_trainer(settings: TrainerSettings, summary_out: Path | None = None) -> dict[str, Any]:
    trainer = StreamingTrainer(settings)
    signal.signal(signal.SIGTERM, trainer.request_stop)
    signal.signal(signal.SIGINT, trainer.request_stop)
    summary = trainer.run()
    if summary_out is not None:
        summary_out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return summary
