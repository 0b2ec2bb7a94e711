"""The learning loop: events → encode → join → learn → publish, driven only by event time.

Replay (a file) and streaming (Kafka) both feed a `Pipeline`; neither has its own logic.

Event time is cut into publication ticks of `publish_interval` seconds. At each tick, in order:
1. impressions that arrived since the previous tick are scored with the current weights, which
   are exactly the last published snapshot — that is the pCTR the *served* model gave them;
2. the samples the joiner released (positives at click time, negatives when the watermark closes
   their window) are learned, each predicted before it is learned from (progressive validation);
3. a snapshot is published (if anything was learned).
Learning only at ticks is what makes the replay's served predictions exact, and makes a replay
of a Kafka stream reproduce what the streaming trainer learned.

Warm-up. Positives are learned at click time but negatives only when their window closes, so in
steady state every tick learns positives of recent impressions and negatives of impressions one
window older — the same mix, as long as traffic is steady. A *fresh* trainer has no negatives at
all during its first window: learning those positives alone teaches the model that everything is
clicked (measured: served calibration 4.7× on the simulator). So a fresh pipeline skips positives
whose click lands within the first window of event time (counted as `warmup_skipped`); from then
on positives of impressions ~now pair with negatives of impressions one window ago. A pipeline
restored from a checkpoint goes on with the warm-up where the checkpoint left it, so it learns
exactly what an uninterrupted run learns.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ctrloop.errors import ConfigError
from ctrloop.events import Click, Conversion, Event, Impression
from ctrloop.features import FeatureEncoder, FeatureSpec
from ctrloop.joining import Joiner, JoinerConfig, Sample, WatermarkTracker
from ctrloop.learner import LearnerConfig, OnlineLearner
from ctrloop.metrics import ProgressiveMetrics
from ctrloop.models import build_model

PRIOR_VERSION = "0"


@dataclass(frozen=True)
class PipelineConfig:
    publish_interval: float = 1.0
    allowed_lateness: float = 30.0
    warmup: bool = True
    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)

    def __post_init__(self) -> None:
        if not self.publish_interval > 0:
            raise ConfigError("publish_interval must be > 0 seconds of event time")
        if self.allowed_lateness < 0:
            raise ConfigError("allowed_lateness must be >= 0 seconds")


class Publisher(Protocol):
    def __call__(self, pipeline: Pipeline, clock: float) -> str | None:
        """Publish the current model; return its version, or None if it was not published."""
        ...


ServedSink = Callable[[list[str], np.ndarray, str], None]


class CountingPublisher:
    """Replay's publisher: every tick that learned something is a new version, no I/O."""

    def __init__(self) -> None:
        self.version = 0

    def __call__(self, pipeline: Pipeline, clock: float) -> str | None:
        self.version += 1
        return str(self.version)


@dataclass
class PipelineStats:
    events: int = 0
    impressions: int = 0
    clicks: int = 0
    conversions: int = 0
    ticks: int = 0
    publications: int = 0
    learned: int = 0
    learned_positives: int = 0
    warmup_skipped: int = 0
    # Order-independent digest of the learned impression ids: equal digests and counts across
    # a crash and restart show that every sample was learned exactly once.
    learned_digest: int = 0


class Pipeline:
    def __init__(self, spec: FeatureSpec, config: PipelineConfig | None = None,
                 publisher: Publisher | None = None, served: ServedSink | None = None,
                 seed: int = 0) -> None:
        self.config = config or PipelineConfig()
        torch.manual_seed(seed)
        self.spec = spec
        self.encoder = FeatureEncoder(spec)
        self.joiner = Joiner(self.config.joiner)
        lc = self.config.learner
        self.learner = OnlineLearner(build_model(lc.model, spec, **lc.hparams), lc)
        self.tracker = WatermarkTracker(self.config.allowed_lateness)
        self.publisher: Publisher = publisher or CountingPublisher()
        self.served = served
        self.model_version = PRIOR_VERSION
        self.stats = PipelineStats()
        self._ready: list[Sample] = []
        self._unscored_ids: list[str] = []
        self._unscored_rows: list[list[int]] = []
        self._next_tick = -math.inf
        self._learned_since_publish = False
        self._warmup_until: float | None = None  # set from the first event's ts
        self._warm = False

    def process(self, event: Event, source: Any = "0") -> None:
        # The default source is a str so that state()/restore() with their default str
        # mapping give it back as the same key (an int 0 came back as "0": a second source
        # that held event time at the checkpoint forever).
        self.stats.events += 1
        if self._warmup_until is None:
            # The first negatives come out when the watermark passes the first window, which
            # is a window plus the allowed lateness after the first event.
            self._warmup_until = (event.ts + self.config.joiner.click_window
                                  + self.config.allowed_lateness)
        self.tracker.observe(source, event.ts)
        clock = self.tracker.clock
        if clock >= self._next_tick and clock > -math.inf:
            self.tick(clock)
        if type(event) is Impression:
            self.stats.impressions += 1
            row = self.encoder.encode(event)
            if self.served is not None:
                self._unscored_ids.append(event.impression_id)
                self._unscored_rows.append(row)
            released = self.joiner.add_impression(event.impression_id, event.ts, row)
        elif type(event) is Click:
            self.stats.clicks += 1
            released = self.joiner.add_click(event.impression_id, event.ts)
        elif type(event) is Conversion:
            self.stats.conversions += 1  # learned by the pCVR model (a later release)
            return
        else:
            raise TypeError(f"not an event: {event!r}")
        if released:
            self._ready.extend(released)

    def advance_idle(self, clock: float) -> None:
        """Move event time with no events (a quiet live stream), ticking if a boundary passed."""
        self.tracker.force(clock)
        if self.tracker.clock >= self._next_tick and self.tracker.clock > -math.inf:
            self.tick(self.tracker.clock)

    def tick(self, clock: float) -> None:
        self.stats.ticks += 1
        self._score_unscored()
        self._ready.extend(self.joiner.advance(clock - self.config.allowed_lateness))
        self._learn_ready()
        self._publish(clock)
        interval = self.config.publish_interval
        self._next_tick = (math.floor(clock / interval) + 1) * interval

    def finish(self) -> None:
        """End of a finite stream: score what is left, close every window, learn, publish."""
        self._score_unscored()
        self._ready.extend(self.joiner.flush())
        self._learn_ready()
        self._publish(self.tracker.clock)

    def _score_unscored(self) -> None:
        if not self._unscored_ids:
            return
        preds = self.learner.predict(np.asarray(self._unscored_rows, dtype=np.int64))
        assert self.served is not None
        self.served(self._unscored_ids, preds, self.model_version)
        self._unscored_ids = []
        self._unscored_rows = []

    def _learn_ready(self) -> None:
        ready = self._ready
        if not ready:
            return
        self._ready = []
        until = self._warmup_until
        if not self._warm and until is not None and self.config.warmup:
            kept = [s for s in ready if s.label == 0 or s.label_ts >= until]
            self.stats.warmup_skipped += len(ready) - len(kept)
            ready = kept
            if self.tracker.clock > until + self.config.joiner.click_window:
                self._warm = True  # no click of the first window can still come
            if not ready:
                return
        rows = np.asarray([s.payload for s in ready], dtype=np.int64)
        labels = np.fromiter((s.label for s in ready), dtype=np.float32, count=len(ready))
        self.learner.learn(rows, labels)
        st = self.stats
        st.learned += len(ready)
        st.learned_positives += int(labels.sum())
        digest = st.learned_digest
        for s in ready:
            digest += zlib.crc32(s.impression_id.encode())
        st.learned_digest = digest & 0xFFFFFFFFFFFFFFFF
        self._learned_since_publish = True

    def _publish(self, clock: float) -> None:
        if not self._learned_since_publish:
            return
        version = self.publisher(self, clock)
        if version is not None:
            self.model_version = version
            self.stats.publications += 1
            self._learned_since_publish = False

    def summary(self) -> dict[str, Any]:
        return {
            "pipeline": self.stats.__dict__.copy(),
            "join": self.joiner.stats.__dict__.copy(),
            "features": self.encoder.stats(),
            "metrics": self.learner.metrics.report().as_dict(),
            "model_version": self.model_version,
            "pending": self.joiner.pending,
        }

    # --- checkpointing -------------------------------------------------------------------
    # State is plain containers of tensors, numbers and strings, so `torch.load(...,
    # weights_only=True)` can read it back and a checkpoint can never execute code.

    def state(self, source_name: Callable[[Any], str] = str) -> dict[str, Any]:
        if self._unscored_ids:
            raise RuntimeError("checkpoint between ticks with unscored impressions")
        joiner = self.joiner.snapshot()
        pending = joiner.pop("pending")
        nf = self.spec.num_fields
        ready = self._ready
        return {
            "spec": self.spec.to_dict(),
            "learner": self.learner.state_dict(),
            "metrics": self.learner.metrics.state(),
            "joiner": joiner,
            "pending_ids": [r[0] for r in pending],
            "pending_ts": torch.tensor([r[1] for r in pending], dtype=torch.float64),
            "pending_rows": torch.tensor([r[2] for r in pending],
                                         dtype=torch.int64).reshape(-1, nf),
            "ready": [[s.impression_id, s.ts, s.label, s.label_ts] for s in ready],
            "ready_rows": torch.tensor([s.payload for s in ready],
                                       dtype=torch.int64).reshape(-1, nf),
            "tracker": self.tracker.state(source_name),
            "stats": self.stats.__dict__.copy(),
            "model_version": self.model_version,
            "next_tick": self._next_tick,
            "warm": self._warm,
            "warmup_until": self._warmup_until,
        }

    def restore(self, state: dict[str, Any], source_key: Callable[[str], Any] = str) -> None:
        """Load `state()` output into this (fresh) pipeline; `source_key` maps the saved source
        names back to the objects the caller feeds as `source` (e.g. TopicPartitions)."""
        self.learner.load_state_dict(state["learner"])
        self.learner.metrics = ProgressiveMetrics.from_state(state["metrics"],
                                                             self.config.learner.metrics_window)
        joiner = dict(state["joiner"])
        rows = state["pending_rows"].tolist()
        joiner["pending"] = [[k, ts, row] for k, ts, row in
                             zip(state["pending_ids"], state["pending_ts"].tolist(), rows,
                                 strict=True)]
        self.joiner = Joiner.restore(joiner, self.config.joiner)
        self._ready = [Sample(k, ts, int(label), row, lts) for (k, ts, label, lts), row in
                       zip(state["ready"], state["ready_rows"].tolist(), strict=True)]
        self.tracker.restore(state["tracker"], source_key)
        self.stats = PipelineStats(**state["stats"])
        self.model_version = str(state["model_version"])
        self._next_tick = float(state["next_tick"])
        if "warmup_until" in state:  # the warm-up goes on where the checkpoint left it
            self._warm = bool(state["warm"])
            wu = state["warmup_until"]
            self._warmup_until = None if wu is None else float(wu)
        else:  # older checkpoints: restored as warm
            self._warm = bool(state["warm"])
            self._warmup_until = None if not self._warm else -math.inf
