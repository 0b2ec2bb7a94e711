"""Today's (before issue 13 A) per-tick Pipeline, kept verbatim as the reference of the
differential test (test_lazy_ticks.py): the lazy pipeline must write byte-identical
predictions and summaries. Do not edit except to follow API renames elsewhere.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ctrloop.core.delay_report import DEFAULT_TOP_N, CvrMonitor, MonitorConfig, delay_report
from ctrloop.core.delays import CvrSample, DelayPolicy, PolicyConfig, build_policy
from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Click, Conversion, Event, Impression
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.joining import Joiner, JoinerConfig, Sample, WatermarkTracker
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.metrics import ProgressiveMetrics
from ctrloop.core.models import build_model
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig

PRIOR_VERSION = "0"


@dataclass(frozen=True)
class PipelineConfig:
    publish_interval: float = 1.0
    allowed_lateness: float = 30.0
    warmup: bool = True
    joiner: JoinerConfig = field(default_factory=JoinerConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    # pCVR: which clicks become samples when (ctrloop/core/delays.py), and its learner (None: the
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

    def __post_init__(self) -> None:
        if not self.publish_interval > 0:
            raise ConfigError("publish_interval must be > 0 seconds of event time")
        if self.allowed_lateness < 0:
            raise ConfigError("allowed_lateness must be >= 0 seconds")
        if self.watermark_max_jump is not None and not self.watermark_max_jump > 0:
            raise ConfigError("watermark_max_jump must be > 0 seconds (or None: off)")
        # Fail at configuration time on a bad name (oracle is checked when its truth is given).
        build_policy(self.delay_policy, self.policy, converted=())
        types = self.conversion_types
        if len(set(types)) != len(types) or not all(isinstance(t, str) and t for t in types):
            raise ConfigError(f"conversion types must be distinct non-empty names, got {types!r}")


class Publisher(Protocol):
    def __call__(self, pipeline: Pipeline, clock: float) -> str | None:
        """Publish the current model; return its version, or None if it was not published."""
        ...


ServedSink = Callable[[list[str], np.ndarray, str], None]
ADVERTISER_FIELD = "ad.advertiser_id"


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
        lc = self.config.learner
        posterior = (LogitPosterior(spec, self.config.posterior)
                     if self.config.posterior is not None else None)
        self.learner = OnlineLearner(build_model(lc.model, spec, **lc.hparams), lc, posterior)
        if self.learner.model.tasks:
            raise ConfigError(f"model {lc.model!r} is multi-task (pCVR per conversion type: "
                              "set conversion types); pCTR needs a one-output model, e.g. fwfm")
        self.served_var = served_var
        # Built after the pCTR model, so the pCTR initialisation is what it was without pCVR.
        self.cvr_learner = self._build_cvr_learner(spec)
        types = self.config.conversion_types
        # Task names: what the snapshot and reports call each pCVR output.
        self.cvr_tasks: tuple[str, ...] = types or ("default",)
        self._type_index = {t: i for i, t in enumerate(types)} if types else None
        self.cvr_policies: list[DelayPolicy] = [
            build_policy(self.config.delay_policy, self.config.policy,
                         self._truth_of(converted, t)) for t in self.cvr_tasks]
        self.served_cvr = served_cvr
        names = spec.names
        self._adv_slot = names.index(ADVERTISER_FIELD) if ADVERTISER_FIELD in names else None
        self.advertiser_names: dict[int, str] = {}  # policy key -> advertiser id(s), for reports
        self._cvr_ready: list[CvrSample] = []
        self.cvr_monitors = [CvrMonitor(self.config.monitor) for _ in self.cvr_tasks]
        # Progressive metrics per task (the learner's own mix every task's samples).
        window = (self.config.cvr_learner or lc).metrics_window
        self.cvr_task_metrics = [ProgressiveMetrics(window) for _ in self.cvr_tasks]
        # Clicks waiting for their served pCVR: scored in one batch at the next tick, with the
        # weights of the last published snapshot (they only change at ticks).
        self._unscored_clicks: list[tuple[str, int, float, list[int]]] = []
        # Observability/benchmark hook: sees every pCVR sample as it is learned.
        self.on_cvr_samples: Callable[[list[CvrSample]], None] | None = None
        self.tracker = WatermarkTracker(self.config.allowed_lateness,
                                        max_jump=self.config.watermark_max_jump)
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

    def _build_cvr_learner(self, spec: FeatureSpec) -> OnlineLearner:
        cc = self.config.cvr_learner or self.config.learner
        hp = dict(cc.hparams)
        types = self.config.conversion_types
        if types:
            # Several types: the multi-task model, sized like the configured one.
            if cc.model != "stem":
                hp = {k: v for k, v in hp.items() if k in ("dim", "init_std")}
            hp["tasks"] = list(types)
            name = "stem"
        else:
            name = cc.model
        # Every architecture starts at its prior (as trainer/heads.py since the model zoo).
        hp.setdefault("prior_ctr", 0.05)  # conversions per click, not clicks
        return OnlineLearner(build_model(name, spec, **hp), cc)

    def _truth_of(self, converted: Collection[str] | Mapping[str, Collection[str]] | None,
                  task: str) -> Collection[str] | None:
        if converted is None or not self.config.conversion_types:
            return converted  # type: ignore[return-value]
        if not isinstance(converted, Mapping) or task not in converted:
            raise ConfigError(f"delay policy 'oracle' with conversion types needs the truth per "
                              f"type (a truth file of a multi-type simulation); no {task!r}")
        return converted[task]

    @property
    def cvr_policy(self) -> DelayPolicy:
        """The first conversion type's policy (the only one without conversion types)."""
        return self.cvr_policies[0]

    @property
    def cvr_monitor(self) -> CvrMonitor:
        return self.cvr_monitors[0]

    def _task_of(self, conversion_type: str) -> int | None:
        if self._type_index is None:
            return 0  # one task: every conversion counts, whatever its type
        return self._type_index.get(conversion_type)

    def _extend_cvr(self, samples: list[CvrSample], task: int) -> None:
        if task:
            for s in samples:
                s.task = task
        self._cvr_ready.extend(samples)

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
            if self._adv_slot is not None and row[self._adv_slot] not in self.advertiser_names:
                self._name_advertiser(row[self._adv_slot], event.advertiser_id)
            if self.served is not None:
                self._unscored_ids.append(event.impression_id)
                self._unscored_rows.append(row)
            released = self.joiner.add_impression(event.impression_id, event.ts, row)
        elif type(event) is Click:
            self.stats.clicks += 1
            released = self.joiner.add_click(event.impression_id, event.ts)
        elif type(event) is Conversion:
            self.stats.conversions += 1
            task = self._task_of(event.conversion_type)
            if task is None:
                self.stats.cvr_other_types += 1
                return
            self._extend_cvr(self.cvr_policies[task].add_conversion(event.impression_id,
                                                                     event.ts), task)
            self.cvr_monitors[task].add_conversion(event.impression_id, event.ts)
            return
        else:
            raise TypeError(f"not an event: {event!r}")
        if released:
            self._ready.extend(released)
            self._clicks_to_policy(released)

    def _clicks_to_policy(self, released: list[Sample]) -> None:
        """Every attributed click (a pCTR positive) is a pCVR candidate; warm-up does not
        apply to pCVR: its policy releases labelled samples, never positives alone."""
        slot = self._adv_slot
        for s in released:
            if s.label:
                key = s.payload[slot] if slot is not None else 0
                # A pending sample per type: each type has its own wait (the policy key is
                # (advertiser, type)) and its own label.
                for task, policy in enumerate(self.cvr_policies):
                    self._extend_cvr(policy.add_click(s.impression_id, key, s.label_ts,
                                                      s.payload), task)
                    self.cvr_monitors[task].add_click(s.impression_id, key, s.label_ts)
                self._unscored_clicks.append((s.impression_id, key, s.label_ts, s.payload))

    def _score_clicks(self) -> None:
        """The monitor's pCVR of each click: what the served model said (before learning)."""
        clicks = self._unscored_clicks
        if not clicks:
            return
        self._unscored_clicks = []
        preds = self.cvr_learner.predict(np.asarray([c[3] for c in clicks], dtype=np.int64))
        if preds.ndim == 1:
            preds = preds[:, None]
        for task, monitor in enumerate(self.cvr_monitors):
            for (_, key, ts, _), p in zip(clicks, preds[:, task].tolist(), strict=True):
                monitor.add_pcvr(key, ts, p)

    def delay_report(self, top_n: int = DEFAULT_TOP_N, task: int = 0) -> dict[str, Any]:
        """Per advertiser (top `top_n` by recent clicks, the rest pooled): the policy's wait
        and statistic, observed vs history CVR and the pCVR calibration over matured clicks,
        for conversion type `task` (an index into `cvr_tasks`)."""
        return delay_report(self.cvr_policies[task], self.cvr_monitors[task],
                            lambda k: self.advertiser_names.get(k, str(k)),  # type: ignore
                            top_n)

    def _name_advertiser(self, key: int, advertiser_id: str) -> None:
        # Keys are hashed advertiser ids (the model's own bucket, so colliding advertisers
        # share statistics as they share an embedding); the first one seen names the key.
        if len(self.advertiser_names) < 100_000:
            self.advertiser_names[key] = advertiser_id

    def advance_idle(self, clock: float) -> None:
        """Move event time with no events (a quiet live stream), ticking if a boundary passed."""
        self.tracker.force(clock)
        if self.tracker.clock >= self._next_tick and self.tracker.clock > -math.inf:
            self.tick(self.tracker.clock)

    def tick(self, clock: float) -> None:
        self.stats.ticks += 1
        self._score_unscored()
        watermark = clock - self.config.allowed_lateness
        self._ready.extend(self.joiner.advance(watermark))
        for task, policy in enumerate(self.cvr_policies):
            self._extend_cvr(policy.advance(watermark), task)
        self._score_clicks()
        for monitor in self.cvr_monitors:
            monitor.advance(watermark)
        self._learn_ready()
        self._learn_cvr_ready()
        self._publish(clock)
        interval = self.config.publish_interval
        self._next_tick = (math.floor(clock / interval) + 1) * interval

    def finish(self) -> None:
        """End of a finite stream: score what is left, close every window, learn, publish."""
        self._score_unscored()
        self._ready.extend(self.joiner.flush())
        for task, policy in enumerate(self.cvr_policies):
            self._extend_cvr(policy.flush(), task)
        self._score_clicks()
        self._learn_ready()
        self._learn_cvr_ready()
        self._publish(self.tracker.clock)

    def _score_unscored(self) -> None:
        if not self._unscored_ids:
            return
        rows = np.asarray(self._unscored_rows, dtype=np.int64)
        preds = self.learner.predict(rows)
        assert self.served is not None
        if self.served_cvr is not None:
            self.served_cvr(self._unscored_ids, self.cvr_learner.predict(rows),
                            self.model_version)
        posterior = self.learner.posterior
        if self.served_var is not None and posterior is not None:
            self.served_var(self._unscored_ids, posterior.row_variance(
                torch.from_numpy(rows)).numpy(), self.model_version)
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
        if self.learner.posterior is not None:
            # Evidence fades with event time; a tick's samples all count as of its clock.
            self.learner.posterior.advance(self.tracker.clock)
        self.learner.learn(rows, labels)
        st = self.stats
        st.learned += len(ready)
        st.learned_positives += int(labels.sum())
        digest = st.learned_digest
        for s in ready:
            digest += zlib.crc32(s.impression_id.encode())
        st.learned_digest = digest & 0xFFFFFFFFFFFFFFFF
        self._learned_since_publish = True

    def _learn_cvr_ready(self) -> None:
        ready = self._cvr_ready
        if not ready:
            return
        self._cvr_ready = []
        if self.on_cvr_samples is not None:
            self.on_cvr_samples(ready)
        rows = np.asarray([s.payload for s in ready], dtype=np.int64)
        labels = np.fromiter((s.label for s in ready), dtype=np.float32, count=len(ready))
        multi = bool(self.config.conversion_types)
        tasks = (np.fromiter((s.task for s in ready), dtype=np.int64, count=len(ready))
                 if multi else None)
        policy = self.cvr_policy  # every type's policy is of the same kind: same weights
        preds = None
        if policy.needs_predictions:
            preds = self.cvr_learner.predict(rows)
            if tasks is not None:
                preds = preds[np.arange(len(ready)), tasks]
        weights = policy.weights(ready, preds)
        learned = self.cvr_learner.learn(rows, labels, weights, tasks)
        if tasks is not None:
            keep = weights > 0
            for task, metrics in enumerate(self.cvr_task_metrics):
                mine = keep & (tasks == task)
                metrics.add((labels[mine] >= 0.5).astype(np.float32), learned[mine])
        st = self.stats
        st.cvr_learned += len(ready)
        st.cvr_label_sum += float(sum(s.label * s.weight for s in ready))
        digest = st.cvr_digest
        for s in ready:
            # The task joins the key only past the first, so one-task digests stay as they were.
            digest += zlib.crc32((f"{s.impression_id}/{s.kind}/{s.task}" if s.task
                                  else f"{s.impression_id}/{s.kind}").encode())
        st.cvr_digest = digest & 0xFFFFFFFFFFFFFFFF
        self._learned_since_publish = True

    def published_models(self) -> dict[str, Any]:
        """What a snapshot carries: the pCTR model and the pCVR head (see `head_snapshots`)."""
        return {"pctr": self.learner.model, "pcvr": self.cvr_learner.model}

    def head_snapshots(self, version: int, meta: dict[str, Any]) -> dict[str, bytes]:
        """The heads published with pCTR snapshot `version`: today {"pcvr": blob}. Each blob
        is a standard ctrloop snapshot (`decode_snapshot` + `build_from_snapshot` load it) of
        the same version, with meta["head"] = "pcvr", the delay policy and the pCVR metrics,
        so a reader that loaded pCTR version v loads pCVR version v next to it."""
        from ctrloop.core.snapshot import encode_snapshot  # publication only; keeps import light

        cvr = self.cvr_learner
        head_meta = {**meta, "head": "pcvr", "delay_policy": self.cvr_policy.name,
                     "samples_seen": cvr.samples_seen, "positives_seen": cvr.positives_seen,
                     "metrics": cvr.metrics.report().as_dict(), **self._task_meta()}
        return {"pcvr": encode_snapshot(cvr.model, version, head_meta)}

    def _task_meta(self) -> dict[str, Any]:
        if not self.config.conversion_types:
            return {}
        return {"tasks": list(self.cvr_tasks),
                "metrics_by_type": {t: m.report().as_dict() for t, m in
                                    zip(self.cvr_tasks, self.cvr_task_metrics, strict=True)}}

    def head_record_meta(self, name: str, top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
        """The registry record's meta of head `name`: small and readable without the blob
        (the service exports the pCVR head's "delays" report on /metrics; `ctrloop
        delay-report` prints it), bounded by `top_n` advertisers."""
        if name != "pcvr":
            return {"head": name}
        meta = {"head": name, "delay_policy": self.cvr_policy.name,
                "delays": self.delay_report(top_n)}
        if self.config.conversion_types:
            # "delays" stays the first type's report (what older readers expect).
            meta.update(self._task_meta())
            meta["delays_by_type"] = {t: meta["delays"] if i == 0 else
                                      self.delay_report(top_n, i)
                                      for i, t in enumerate(self.cvr_tasks)}
        return meta

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
            "cvr": {"delay_policy": self.cvr_policy.report(),
                    "metrics": self.cvr_learner.metrics.report().as_dict(),
                    "delays": self.delay_report(),
                    **({"by_type": {
                        t: {"delay_policy": self.cvr_policies[i].report(),
                            "metrics": self.cvr_task_metrics[i].report().as_dict(),
                            "other_type_conversions": self.stats.cvr_other_types}
                        for i, t in enumerate(self.cvr_tasks)}}
                       if self.config.conversion_types else {})},
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
            **self._cvr_state(),
        }

    def _policy_state(self, task: int) -> tuple[dict[str, Any], torch.Tensor]:
        policy = self.cvr_policies[task].state()
        payloads = policy.pop("payloads")
        rows = torch.tensor(payloads, dtype=torch.int64).reshape(-1, self.spec.num_fields)
        return policy, rows

    def _cvr_state(self) -> dict[str, Any]:
        nf = self.spec.num_fields
        policy, policy_rows = self._policy_state(0)
        ready = self._cvr_ready
        types: dict[str, Any] = {}
        if self.config.conversion_types:
            # Per type: [policy, its rows, monitor, progressive metrics]. The first type is
            # also under the one-task keys, which `ctrloop delay-report` reads.
            types["cvr_types"] = list(self.cvr_tasks)
            types["cvr_task_state"] = [
                [*self._policy_state(i), self.cvr_monitors[i].state(),
                 self.cvr_task_metrics[i].state()] for i in range(len(self.cvr_tasks))]
        return {
            **types,
            "cvr_learner": self.cvr_learner.state_dict(),
            "cvr_metrics": self.cvr_learner.metrics.state(),
            "cvr_policy": policy,
            "cvr_policy_rows": policy_rows,
            "cvr_ready": [[s.impression_id, s.click_ts, s.label, s.weight, s.release_ts, s.kind,
                           s.key, s.task] for s in ready],
            "cvr_ready_rows": torch.tensor([s.payload for s in ready],
                                           dtype=torch.int64).reshape(-1, nf),
            "advertiser_names": [[k, v] for k, v in self.advertiser_names.items()],
            "cvr_monitor": self.cvr_monitor.state(),
            "cvr_unscored_clicks": [[iid, key, ts] for iid, key, ts, _ in self._unscored_clicks],
            "cvr_unscored_rows": torch.tensor([c[3] for c in self._unscored_clicks],
                                              dtype=torch.int64).reshape(-1, nf),
        }

    def _restore_cvr(self, state: dict[str, Any]) -> None:
        if "cvr_policy" not in state:  # a checkpoint from before pCVR: start it fresh
            return
        saved = tuple(state.get("cvr_types", ()))
        if saved != self.config.conversion_types:
            raise ConfigError(
                f"the checkpoint's pCVR learns conversion types {list(saved) or 'any (one task)'}"
                f", this trainer {list(self.config.conversion_types) or 'any (one task)'}: set "
                f"the same CTRLOOP_CONVERSION_TYPES, or start from a new checkpoint directory")
        self.cvr_learner.load_state_dict(state["cvr_learner"])
        window = (self.config.cvr_learner or self.config.learner).metrics_window
        self.cvr_learner.metrics = ProgressiveMetrics.from_state(state["cvr_metrics"], window)
        if saved:
            for i, (policy, rows, monitor, metrics) in enumerate(state["cvr_task_state"]):
                self.cvr_policies[i].restore({**policy, "payloads": rows.tolist()})
                self.cvr_monitors[i].restore(monitor)
                self.cvr_task_metrics[i] = ProgressiveMetrics.from_state(metrics, window)
        else:
            self.cvr_policy.restore({**state["cvr_policy"],
                                     "payloads": state["cvr_policy_rows"].tolist()})
            if "cvr_monitor" in state:  # older checkpoints: the monitor starts fresh
                self.cvr_monitor.restore(state["cvr_monitor"])
        self._cvr_ready = [
            CvrSample(iid, float(cts), float(label), float(w), row, float(rts), str(kind), key,
                      int(rest[0]) if rest else 0)
            for (iid, cts, label, w, rts, kind, key, *rest), row in
            zip(state["cvr_ready"], state["cvr_ready_rows"].tolist(), strict=True)]
        self.advertiser_names = {int(k): str(v) for k, v in state["advertiser_names"]}
        if "cvr_monitor" in state:
            self._unscored_clicks = [
                (str(iid), key, float(ts), row) for (iid, key, ts), row in
                zip(state["cvr_unscored_clicks"], state["cvr_unscored_rows"].tolist(),
                    strict=True)]

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
        self._restore_cvr(state)
