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

Lazy ticks. Step 1 costs one forward pass per tick, however few impressions arrived; on a sparse
stream (an impression every few event seconds) that, and one optimizer step per tick, is all
the replay does. So impressions are scored only when the weights are about to change (or at the
end): every impression since the last change in one forward pass, each with the version that
was current at its tick. The predictions are byte-identical to per-tick scoring
(trainer/scoring.py; tests/unit/test_lazy_ticks.py checks it against the per-tick
reference).

Learning cadence. Released samples are learned at the first tick at which at least
`min_learn_samples` of them wait, or the oldest has waited `max_learn_wait` event seconds, or at
the end of a finite stream. The default (1) learns every tick's samples at that tick: exactly
the semantics above. A larger value trades a slightly staler served model for fewer, larger
optimizer steps (docs/benchmarks.md, "Learning cadence").

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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ctrloop.core.delay_report import DEFAULT_TOP_N, MonitorConfig
from ctrloop.core.delays import PolicyConfig, build_policy
from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Click, Conversion, Event, Impression
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.joining import Joiner, JoinerConfig, WatermarkTracker
from ctrloop.core.learner import LearnerConfig
from ctrloop.core.posterior import PosteriorConfig
from ctrloop.trainer.heads import CtrHead, CvrHead, Head
from ctrloop.trainer.scoring import ServedScores, ServedSink

PRIOR_VERSION = "0"


@dataclass(frozen=True)
class PipelineConfig:
    publish_interval: float = 1.0
    allowed_lateness: float = 30.0
    warmup: bool = True
    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # pCVR: which clicks become samples when (ctrloop/core/delays/), and its learner (None: the
    # pCTR learner's configuration).
    delay_policy: str = "variance"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    cvr_learner: LearnerConfig | None = None
    # Conversion types learned as tasks of one pCVR model (STEM, ctrloop/core/models/stem.py), each
    # with its own delay policy and statistics. Empty: one task fed by every conversion,
    # whatever its type, with the pCVR learner's own architecture.
    conversion_types: tuple[str, ...] = ()
    # The GP posterior over the pCTR logit (ctrloop/core/posterior.py; None: no posterior). The
    # pCVR head has none: exploration ranks by pCTR.
    posterior: PosteriorConfig | None = field(default_factory=PosteriorConfig)
    # Per-advertiser calibration over matured clicks (ctrloop/core/delay_report.py).
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # A source's event-time frontier moves more than this on one event only when a second
    # event confirms it (WatermarkTracker.max_jump). None: off, as in replay, whose file is
    # trusted and must stay byte-identical; the streaming trainer sets max_event_ahead_s.
    watermark_max_jump: float | None = None
    # Learning cadence (module docstring): per head, learn the waiting samples once this many
    # wait or the oldest has waited `max_learn_wait` event seconds. 1: every tick (exact).
    min_learn_samples: int = 1
    max_learn_wait: float = 60.0
    # Dimensional collapse watched like latency: each head's IA per field (ctrloop/core/
    # analysis.py) goes into the metadata of the snapshots it publishes, recomputed every this
    # many publications (0: off) over at most this many trained rows per field. Measured CPU
    # per computation (one thread, the simulator's spec): ~5-8 ms FwFM, ~16 ms HMoE 2x16 —
    # a quarter of encoding the snapshot itself; every 10th publication makes it ~1-2 ms
    # amortised, and the streaming trainer publishes at most once a second anyway.
    collapse_every: int = 10
    collapse_max_rows: int = 2048

    def __post_init__(self) -> None:
        if not self.publish_interval > 0:
            raise ConfigError("publish_interval must be > 0 seconds of event time")
        if self.allowed_lateness < 0:
            raise ConfigError("allowed_lateness must be >= 0 seconds")
        if self.watermark_max_jump is not None and not self.watermark_max_jump > 0:
            raise ConfigError("watermark_max_jump must be > 0 seconds (or None: off)")
        if self.min_learn_samples < 1:
            raise ConfigError("min_learn_samples must be >= 1 (1: learn at every tick)")
        if not self.max_learn_wait >= 0:
            raise ConfigError("max_learn_wait must be >= 0 event seconds")
        if self.collapse_every < 0 or self.collapse_max_rows < 1:
            raise ConfigError("collapse_every must be >= 0 publications (0: off) and "
                              "collapse_max_rows >= 1")
        # Fail at configuration time on a bad name (oracle is checked when its truth is given).
        build_policy(self.delay_policy, self.policy, converted=())
        types = self.conversion_types
        if len(set(types)) != len(types) or not all(isinstance(t, str) and t for t in types):
            raise ConfigError(f"conversion types must be distinct non-empty names, got {types!r}")


class Publisher(Protocol):
    def __call__(self, pipeline: Pipeline, clock: float) -> str | None:
        """Publish the current model; return its version, or None if it was not published."""
        ...


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
    # pCVR: samples the delay policy released and the model learned (retractions included).
    cvr_learned: int = 0
    cvr_label_sum: float = 0.0
    cvr_digest: int = 0
    # Conversions of a type the pipeline does not learn (with `conversion_types` set).
    cvr_other_types: int = 0


class Pipeline:
    def __init__(self, spec: FeatureSpec, config: PipelineConfig | None = None,
                 publisher: Publisher | None = None, served: ServedSink | None = None,
                 seed: int = 0, served_cvr: ServedSink | None = None,
                 converted: Collection[str] | Mapping[str, Collection[str]] | None = None,
                 served_var: ServedSink | None = None) -> None:
        """`served_cvr` receives the pCVR of every impression (same ids and version as
        `served`, called just before it; [B], or [B, T] with conversion types); `converted` is
        the truth the oracle policy reads (with conversion types: a mapping type -> ids);
        `served_var` receives the posterior's per-field variances of every impression's logit
        (float32 [B, F], `LogitPosterior.row_variance`; sum a row for Sigma(x)), also just
        before `served` (not called without a posterior)."""
        self.config = config or PipelineConfig()
        torch.manual_seed(seed)
        self.spec = spec
        self.encoder = FeatureEncoder(spec)
        self.joiner = Joiner(self.config.joiner)
        self.stats = PipelineStats()
        self.ctr = CtrHead(spec, self.config, self.stats)
        # Built after the pCTR model, so the pCTR initialisation is what it was without pCVR.
        self.cvr = CvrHead(spec, self.config, self.stats, converted)
        self.heads: tuple[Head, ...] = (self.ctr, self.cvr)  # learned in this order
        self.tracker = WatermarkTracker(self.config.allowed_lateness,
                                        max_jump=self.config.watermark_max_jump)
        self.publisher: Publisher = publisher or CountingPublisher()
        self.model_version = PRIOR_VERSION
        # The served model's scores, handed to the sinks just before the weights change.
        self.scores = (ServedScores(served, served_cvr, served_var) if served is not None
                       else None)
        # Per head: event time since which its released samples wait (learning cadence).
        self._waiting_since: dict[str, float | None] = {h.name: None for h in self.heads}
        self._next_tick = -math.inf
        self._learned_since_publish = False
        self._started = False

    # The heads' parts under the names they had before heads (tests, benchmarks, the CLI).
    learner = property(lambda self: self.ctr.learner)
    cvr_learner = property(lambda self: self.cvr.learner)
    cvr_policies = property(lambda self: self.cvr.policies)
    cvr_policy = property(lambda self: self.cvr.policies[0])
    cvr_monitors = property(lambda self: self.cvr.monitors)
    cvr_monitor = property(lambda self: self.cvr.monitors[0])
    cvr_tasks = property(lambda self: self.cvr.tasks)
    cvr_task_metrics = property(lambda self: self.cvr.task_metrics)
    advertiser_names = property(lambda self: self.cvr.advertiser_names)
    on_cvr_samples = property(lambda self: self.cvr.on_samples,
                              lambda self, hook: setattr(self.cvr, "on_samples", hook))

    def delay_report(self, top_n: int = DEFAULT_TOP_N, task: int = 0) -> dict[str, Any]:
        """Per advertiser (top `top_n` by recent clicks, the rest pooled): the policy's wait
        and statistic, observed vs history CVR and the pCVR calibration over matured clicks,
        for conversion type `task` (an index into `cvr_tasks`)."""
        return self.cvr.delay_report(top_n, task)

    def process(self, event: Event, source: Any = "0", row: list[int] | None = None) -> None:
        """`row`: the impression's encoded features if the caller already has them (a columnar
        reader); None: encoded here. Ignored for other events."""
        # The default source is a str so that state()/restore() with their default str
        # mapping give it back as the same key (an int 0 came back as "0": a second source
        # that held event time at the checkpoint forever).
        self.stats.events += 1
        if not self._started:
            self._started = True
            self.ctr.start(event.ts)
        self.tracker.observe(source, event.ts)
        clock = self.tracker.clock
        if clock >= self._next_tick and clock > -math.inf:
            self.tick(clock)
        if type(event) is Impression:
            self.stats.impressions += 1
            if row is None:
                row = self.encoder.encode(event)
            self.cvr.on_impression(row, event.advertiser_id)
            if self.scores is not None:
                self.scores.add(event.impression_id, row)
            released = self.joiner.add_impression(event.impression_id, event.ts, row)
        elif type(event) is Click:
            self.stats.clicks += 1
            released = self.joiner.add_click(event.impression_id, event.ts)
        elif type(event) is Conversion:
            self.stats.conversions += 1
            self.cvr.on_conversion(event)
            return
        else:
            raise TypeError(f"not an event: {event!r}")
        if released:
            self.ctr.ready.extend(released)
            self.cvr.on_released(released)

    def advance_idle(self, clock: float) -> None:
        """Move event time with no events (a quiet live stream), ticking if a boundary passed."""
        self.tracker.force(clock)
        if self.tracker.clock >= self._next_tick and self.tracker.clock > -math.inf:
            self.tick(self.tracker.clock)
        # A quiet stream: hand out the scores due so far rather than wait for the next change.
        self._flush_scores()

    def tick(self, clock: float) -> None:
        self.stats.ticks += 1
        self._close_tick()
        watermark = clock - self.config.allowed_lateness
        self.ctr.ready.extend(self.joiner.advance(watermark))
        self.cvr.advance(watermark)
        for head in self.heads:
            if self._learn_due(head, clock):
                self._learn(head, clock)
        self._publish(clock)
        interval = self.config.publish_interval
        self._next_tick = (math.floor(clock / interval) + 1) * interval

    def finish(self) -> None:
        """End of a finite stream: score what is left, close every window, learn, publish."""
        self._close_tick()
        self._flush_scores()
        self.ctr.ready.extend(self.joiner.flush())
        self.cvr.flush()
        for head in self.heads:
            self._learn(head, self.tracker.clock)
            self._waiting_since[head.name] = None
        self._publish(self.tracker.clock)

    def _learn(self, head: Head, clock: float) -> None:
        if head.learn(clock, self._flush_scores):
            self._learned_since_publish = True

    def _learn_due(self, head: Head, clock: float) -> bool:
        """The learning cadence of one head: learn its waiting samples at this tick?"""
        waiting = head.waiting()
        if not waiting:
            self._waiting_since[head.name] = None
            return False
        since = self._waiting_since[head.name]
        waited = 0.0 if since is None else clock - since
        due = (waiting >= self.config.min_learn_samples
               or waited >= self.config.max_learn_wait)
        self._waiting_since[head.name] = None if due else clock if since is None else since
        return due

    def _close_tick(self) -> None:
        if self.scores is not None:
            self.scores.close_tick(self.model_version)

    def _flush_scores(self) -> None:
        if self.scores is not None:
            self.scores.flush(self.ctr.learner, self.cvr.learner)

    # --- publication ---------------------------------------------------------------------

    def bundle(self, version: int, meta: dict[str, Any]) -> dict[str, tuple[bytes, dict[str, Any]]]:
        """Every head as of `version`: name -> (snapshot blob, registry record meta). "pctr"
        is the main model (its record meta is `meta`); the others are published under
        `ModelRegistry.head(name)` with the same version, before the main one. Each head's
        snapshot and record carry its IA per field ("collapse", `config.collapse_every`)."""
        for h in self.heads:
            h.watch_collapse()
        return {h.name: (h.snapshot(version, meta), h.record_meta(meta)) for h in self.heads}

    def head_snapshots(self, version: int, meta: dict[str, Any]) -> dict[str, bytes]:
        """The heads published next to pCTR snapshot `version`: {"pcvr": blob}."""
        return {h.name: h.snapshot(version, meta) for h in self.heads if h is not self.ctr}

    def head_record_meta(self, name: str, top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
        """The registry record's meta of head `name` (not the main model's)."""
        head = {h.name: h for h in self.heads}.get(name)
        return {"head": name} if head is None or head is self.ctr else head.record_meta({},
                                                                                     top_n)

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
            "metrics": self.ctr.learner.metrics.report().as_dict(),
            "model_version": self.model_version,
            "pending": self.joiner.pending,
            "cvr": self.cvr.summary(),
        }

    # --- checkpointing -------------------------------------------------------------------
    # State is plain containers of tensors, numbers and strings, so `torch.load(...,
    # weights_only=True)` can read it back and a checkpoint can never execute code. The
    # heads' keys are the ones the pipeline wrote before heads: older checkpoints restore.

    def state(self, source_name: Callable[[Any], str] = str) -> dict[str, Any]:
        self._flush_scores()  # impressions of past ticks: their weights are still current
        if self.scores is not None and self.scores.between_ticks:
            raise RuntimeError("checkpoint between ticks with unscored impressions")
        joiner = self.joiner.snapshot()
        pending = joiner.pop("pending")
        nf = self.spec.num_fields
        state = {
            "spec": self.spec.to_dict(),
            "joiner": joiner,
            "pending_ids": [r[0] for r in pending],
            "pending_ts": torch.tensor([r[1] for r in pending], dtype=torch.float64),
            "pending_rows": torch.tensor([r[2] for r in pending],
                                         dtype=torch.int64).reshape(-1, nf),
            "tracker": self.tracker.state(source_name),
            "stats": self.stats.__dict__.copy(),
            "model_version": self.model_version,
            "next_tick": self._next_tick,
            "started": self._started,
            "waiting_since": dict(self._waiting_since),
        }
        for head in self.heads:
            state.update(head.state())
        return state

    def restore(self, state: dict[str, Any], source_key: Callable[[str], Any] = str) -> None:
        """Load `state()` output into this (fresh) pipeline; `source_key` maps the saved source
        names back to the objects the caller feeds as `source` (e.g. TopicPartitions)."""
        joiner = dict(state["joiner"])
        rows = state["pending_rows"].tolist()
        joiner["pending"] = [[k, ts, row] for k, ts, row in
                             zip(state["pending_ids"], state["pending_ts"].tolist(), rows,
                                 strict=True)]
        self.joiner = Joiner.restore(joiner, self.config.joiner)
        self.tracker.restore(state["tracker"], source_key)
        # The heads count into the same stats object: update it in place.
        self.stats.__dict__.update(PipelineStats(**state["stats"]).__dict__)
        self.model_version = str(state["model_version"])
        self._next_tick = float(state["next_tick"])
        # Older checkpoints: started if the warm-up clock was set (or they predate it).
        self._started = bool(state.get("started", state.get("warmup_until", 0) is not None))
        for name, since in state.get("waiting_since", {}).items():
            if name in self._waiting_since:
                self._waiting_since[name] = None if since is None else float(since)
        for head in self.heads:
            head.restore(state)
