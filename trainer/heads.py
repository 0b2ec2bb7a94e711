"""The heads of the pipeline: each one learns from its own released samples, owns and serialises
its own state, and publishes one snapshot per version (issue 13 B).

`Pipeline` (trainer/pipeline.py) orchestrates them: it joins events into samples and hands each
head what is its own; at a tick it asks each head whether its learning cadence is due, lets it
learn, and publishes every head's snapshot under one version (`Pipeline.bundle`).

- `CtrHead`: pCTR (+ the GP posterior over its logit, carried in its snapshot), learned from the
  joiner's samples, with the fresh trainer's warm-up.
- `CvrHead`: pCVR, learned from the samples the delay policies release (one policy per
  conversion type), with the per-advertiser calibration monitors of the delay report.

A head's checkpoint keys are those the pipeline wrote before heads existed, so older checkpoints
restore unchanged.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ctrloop.core.analysis import CollapseWatch
from ctrloop.core.delay_report import DEFAULT_TOP_N, CvrMonitor, delay_report
from ctrloop.core.delays import CvrSample, DelayPolicy, build_policy
from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Conversion
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import Sample
from ctrloop.core.learner import OnlineLearner
from ctrloop.core.metrics import ProgressiveMetrics
from ctrloop.core.models import build_model
from ctrloop.core.posterior import LogitPosterior

if TYPE_CHECKING:
    from ctrloop.trainer.pipeline import PipelineConfig, PipelineStats

ADVERTISER_FIELD = "ad.advertiser_id"  # keys the pCVR delay statistics
DIGEST_MASK = 0xFFFFFFFFFFFFFFFF
# The cohort prior of unseen rows (issue 11, docs/exploration.md "Unseen rows"), when turned on
# (`CtrHead.cohort_prior_fields`): pCTR fields whose never-trained rows get their field's mean
# of trained rows, so a new ad is a typical ad until it has evidence. The ad's own id is the one
# field a new ad always brings unseen; its advertiser, category, etc. are usually known rows.
COHORT_PRIOR_FIELDS: tuple[str, ...] = ("ad.id",)


class Head(Protocol):
    """One model learned and published by the pipeline."""

    name: str
    learner: OnlineLearner

    def waiting(self) -> int:
        """Released samples not learned yet."""
        ...

    def learn(self, clock: float, before_change: Callable[[], None]) -> bool:
        """Learn every waiting sample at event time `clock`; call `before_change` just before
        the weights change. True if they changed."""
        ...

    def snapshot(self, version: int, meta: dict[str, Any]) -> bytes:
        """The standard ctrloop snapshot of this head as of `version`."""
        ...

    def record_meta(self, meta: dict[str, Any], top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
        """The registry record's meta (small, readable without the blob)."""
        ...

    def watch_collapse(self) -> None:
        """A publication: recompute the IA per field its snapshot and record carry, if due."""
        ...

    def state(self) -> dict[str, Any]:
        """Checkpoint entries (plain containers of tensors, numbers, strings)."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        ...


def _rows(payloads: list[list[int]], nf: int) -> torch.Tensor:
    return torch.tensor(payloads, dtype=torch.int64).reshape(-1, nf)


class CtrHead:
    name = "pctr"

    def __init__(self, spec: FeatureSpec, config: PipelineConfig, stats: PipelineStats) -> None:
        self.spec, self.config, self.stats = spec, config, stats
        lc = config.learner
        posterior = (LogitPosterior(spec, config.posterior)
                     if config.posterior is not None else None)
        self.learner = OnlineLearner(build_model(lc.model, spec, **lc.hparams), lc, posterior)
        if self.learner.model.tasks:
            raise ConfigError(f"model {lc.model!r} is multi-task (pCVR per conversion type: "
                              "set conversion types); pCTR needs a one-output model, e.g. fwfm")
        self.ready: list[Sample] = []
        self.warmup_until: float | None = None  # set from the first event's ts
        self.warm = False
        self.collapse = CollapseWatch(config.collapse_every, config.collapse_max_rows)
        # Public. Off by default: on held-out bandit worlds it did not lower regret (neither
        # greedy's nor Thompson sampling's, docs/exploration.md); COHORT_PRIOR_FIELDS turns it on.
        self.cohort_prior_fields: tuple[str, ...] = ()

    def waiting(self) -> int:
        return len(self.ready)

    def start(self, ts: float) -> None:
        """The first event: the first negatives come out when the watermark passes the first
        window, which is a window plus the allowed lateness after it."""
        self.warmup_until = ts + self.config.joiner.click_window + self.config.allowed_lateness

    def _skip_warmup(self, ready: list[Sample], clock: float) -> list[Sample]:
        until = self.warmup_until
        if self.warm or until is None or not self.config.warmup:
            return ready
        kept = [s for s in ready if s.label == 0 or s.label_ts >= until]
        self.stats.warmup_skipped += len(ready) - len(kept)
        if clock > until + self.config.joiner.click_window:
            self.warm = True  # no click of the first window can still come
        return kept

    def learn(self, clock: float, before_change: Callable[[], None]) -> bool:
        if not self.ready:
            return False
        ready = self._skip_warmup(self.ready, clock)
        self.ready = []
        if not ready:
            return False
        before_change()
        rows = np.asarray([s.payload for s in ready], dtype=np.int64)
        labels = np.fromiter((s.label for s in ready), dtype=np.float32, count=len(ready))
        if self.learner.posterior is not None:
            # Evidence fades with event time; the samples learned together count as of `clock`.
            self.learner.posterior.advance(clock)
        self.learner.learn(rows, labels)
        # If on, never-trained ad rows get their cohort's mean after every learn, so every
        # publication that follows (live, replay's or a benchmark's) serves a new ad a typical
        # ad's mean and it is explored through the posterior variance only (issue 11;
        # docs/exploration.md "Unseen rows"). In the learning model itself: a row first trained
        # later starts from the mean it was served with, and a checkpoint carries it.
        self.learner.model.fill_unseen_rows(self.cohort_prior_fields)
        st = self.stats
        st.learned += len(ready)
        st.learned_positives += int(labels.sum())
        digest = st.learned_digest
        for s in ready:
            digest += zlib.crc32(s.impression_id.encode())
        st.learned_digest = digest & DIGEST_MASK
        return True

    def snapshot(self, version: int, meta: dict[str, Any]) -> bytes:
        from ctrloop.core.snapshot import encode_snapshot  # publication only

        return encode_snapshot(self.learner.model, version, {**meta, **self.collapse.meta})

    def record_meta(self, meta: dict[str, Any], top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
        # The main record: what the publisher says (event time, metrics, ...) and the IA.
        return {**meta, **self.collapse.meta}

    def watch_collapse(self) -> None:
        self.collapse.update(self.learner.model)

    def state(self) -> dict[str, Any]:
        ready = self.ready
        return {
            "learner": self.learner.state_dict(),
            "metrics": self.learner.metrics.state(),
            "ready": [[s.impression_id, s.ts, s.label, s.label_ts] for s in ready],
            "ready_rows": _rows([s.payload for s in ready], self.spec.num_fields),
            "warm": self.warm,
            "warmup_until": self.warmup_until,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state["learner"])
        self.learner.metrics = ProgressiveMetrics.from_state(
            state["metrics"], self.config.learner.metrics_window)
        self.ready = [Sample(k, ts, int(label), row, lts) for (k, ts, label, lts), row in
                      zip(state["ready"], state["ready_rows"].tolist(), strict=True)]
        self.warm = bool(state["warm"])
        if "warmup_until" in state:  # the warm-up goes on where the checkpoint left it
            wu = state["warmup_until"]
            self.warmup_until = None if wu is None else float(wu)
        else:  # older checkpoints: restored as warm
            self.warmup_until = None if not self.warm else -math.inf


class CvrHead:
    name = "pcvr"

    def __init__(self, spec: FeatureSpec, config: PipelineConfig, stats: PipelineStats,
                 converted: Collection[str] | Mapping[str, Collection[str]] | None) -> None:
        self.spec, self.config, self.stats = spec, config, stats
        self.learner = self._build_learner(spec)
        types = config.conversion_types
        # Task names: what the snapshot and reports call each pCVR output.
        self.tasks: tuple[str, ...] = types or ("default",)
        self._type_index = {t: i for i, t in enumerate(types)} if types else None
        self.policies: list[DelayPolicy] = [
            build_policy(config.delay_policy, config.policy, self._truth_of(converted, t))
            for t in self.tasks]
        names = spec.names
        self.adv_slot = names.index(ADVERTISER_FIELD) if ADVERTISER_FIELD in names else None
        self.advertiser_names: dict[int, str] = {}  # policy key -> advertiser id(s), for reports
        self.ready: list[CvrSample] = []
        self.monitors = [CvrMonitor(config.monitor) for _ in self.tasks]
        # Progressive metrics per task (the learner's own mix every task's samples).
        window = (config.cvr_learner or config.learner).metrics_window
        self.task_metrics = [ProgressiveMetrics(window) for _ in self.tasks]
        # Clicks waiting for their served pCVR: scored in one batch at the next tick, with the
        # weights of the last published snapshot (they only change at ticks).
        self.unscored_clicks: list[tuple[str, int, float, list[int]]] = []
        # Observability/benchmark hook: sees every pCVR sample as it is learned.
        self.on_samples: Callable[[list[CvrSample]], None] | None = None
        self.collapse = CollapseWatch(config.collapse_every, config.collapse_max_rows)

    def _build_learner(self, spec: FeatureSpec) -> OnlineLearner:
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
        # Every architecture starts at its prior: conversions per click, not clicks.
        hp.setdefault("prior_ctr", 0.05)
        return OnlineLearner(build_model(name, spec, **hp), cc)

    def _truth_of(self, converted: Collection[str] | Mapping[str, Collection[str]] | None,
                  task: str) -> Collection[str] | None:
        if converted is None or not self.config.conversion_types:
            return converted  # type: ignore[return-value]
        if not isinstance(converted, Mapping) or task not in converted:
            raise ConfigError(f"delay policy 'oracle' with conversion types needs the truth per "
                              f"type (a truth file of a multi-type simulation); no {task!r}")
        return converted[task]

    def waiting(self) -> int:
        return len(self.ready)

    # --- what the pipeline hands over ---------------------------------------------------

    def _extend(self, samples: list[CvrSample], task: int) -> None:
        if task:
            for s in samples:
                s.task = task
        self.ready.extend(samples)

    def on_impression(self, row: list[int], advertiser_id: str) -> None:
        # Keys are hashed advertiser ids (the model's own bucket, so colliding advertisers
        # share statistics as they share an embedding); the first one seen names the key.
        slot = self.adv_slot
        if (slot is not None and row[slot] not in self.advertiser_names
                and len(self.advertiser_names) < 100_000):
            self.advertiser_names[row[slot]] = advertiser_id

    def on_conversion(self, event: Conversion) -> None:
        if self._type_index is None:
            task: int | None = 0  # one task: every conversion counts, whatever its type
        else:
            task = self._type_index.get(event.conversion_type)
        if task is None:
            self.stats.cvr_other_types += 1
            return
        self._extend(self.policies[task].add_conversion(event.impression_id, event.ts), task)
        self.monitors[task].add_conversion(event.impression_id, event.ts)

    def on_released(self, released: list[Sample]) -> None:
        """Every attributed click (a pCTR positive) is a pCVR candidate; warm-up does not
        apply to pCVR: its policy releases labelled samples, never positives alone."""
        slot = self.adv_slot
        for s in released:
            if s.label:
                key = s.payload[slot] if slot is not None else 0
                # A pending sample per type: each type has its own wait (the policy key is
                # (advertiser, type)) and its own label.
                for task, policy in enumerate(self.policies):
                    self._extend(policy.add_click(s.impression_id, key, s.label_ts,
                                                  s.payload), task)
                    self.monitors[task].add_click(s.impression_id, key, s.label_ts)
                self.unscored_clicks.append((s.impression_id, key, s.label_ts, s.payload))

    def advance(self, watermark: float) -> None:
        """A tick: the policies release what the watermark closes; the monitors see the
        served pCVR of the clicks since the previous tick, then mature."""
        for task, policy in enumerate(self.policies):
            self._extend(policy.advance(watermark), task)
        self._score_clicks()
        for monitor in self.monitors:
            monitor.advance(watermark)

    def flush(self) -> None:
        """End of a finite stream: every policy releases what it holds."""
        for task, policy in enumerate(self.policies):
            self._extend(policy.flush(), task)
        self._score_clicks()

    def _score_clicks(self) -> None:
        """The monitor's pCVR of each click: what the served model said (before learning)."""
        clicks = self.unscored_clicks
        if not clicks:
            return
        self.unscored_clicks = []
        preds = self.learner.predict(np.asarray([c[3] for c in clicks], dtype=np.int64))
        if preds.ndim == 1:
            preds = preds[:, None]
        for task, monitor in enumerate(self.monitors):
            for (_, key, ts, _), p in zip(clicks, preds[:, task].tolist(), strict=True):
                monitor.add_pcvr(key, ts, p)

    # --- learning -----------------------------------------------------------------------

    def learn(self, clock: float, before_change: Callable[[], None]) -> bool:
        ready = self.ready
        if not ready:
            return False
        self.ready = []
        if self.on_samples is not None:
            self.on_samples(ready)
        rows = np.asarray([s.payload for s in ready], dtype=np.int64)
        labels = np.fromiter((s.label for s in ready), dtype=np.float32, count=len(ready))
        tasks = (np.fromiter((s.task for s in ready), dtype=np.int64, count=len(ready))
                 if self.config.conversion_types else None)
        policy = self.policies[0]  # every type's policy is of the same kind: same weights
        preds = None
        if policy.needs_predictions:
            preds = self.learner.predict(rows)
            if tasks is not None:
                preds = preds[np.arange(len(ready)), tasks]
        weights = policy.weights(ready, preds)
        before_change()
        learned = self.learner.learn(rows, labels, weights, tasks)
        if tasks is not None:
            keep = weights > 0
            for task, metrics in enumerate(self.task_metrics):
                mine = keep & (tasks == task)
                metrics.add((labels[mine] >= 0.5).astype(np.float32), learned[mine])
        self._count(ready)
        return True

    def _count(self, ready: list[CvrSample]) -> None:
        st = self.stats
        st.cvr_learned += len(ready)
        st.cvr_label_sum += float(sum(s.label * s.weight for s in ready))
        digest = st.cvr_digest
        for s in ready:
            # The task joins the key only past the first, so one-task digests stay as they were.
            digest += zlib.crc32((f"{s.impression_id}/{s.kind}/{s.task}" if s.task
                                  else f"{s.impression_id}/{s.kind}").encode())
        st.cvr_digest = digest & DIGEST_MASK

    # --- publication and reports ----------------------------------------------------------

    def snapshot(self, version: int, meta: dict[str, Any]) -> bytes:
        """A standard ctrloop snapshot (`decode_snapshot` + `build_from_snapshot` load it) of
        the same version as pCTR's, with meta["head"] = "pcvr", the delay policy and the pCVR
        metrics, so a reader that loaded pCTR version v loads pCVR version v next to it."""
        from ctrloop.core.snapshot import encode_snapshot  # publication only

        cvr = self.learner
        head_meta = {**meta, "head": "pcvr", "delay_policy": self.policies[0].name,
                     "samples_seen": cvr.samples_seen, "positives_seen": cvr.positives_seen,
                     "metrics": cvr.metrics.report().as_dict(), **self.task_meta(),
                     **self.collapse.meta}
        return encode_snapshot(cvr.model, version, head_meta)

    def watch_collapse(self) -> None:
        self.collapse.update(self.learner.model)

    def task_meta(self) -> dict[str, Any]:
        if not self.config.conversion_types:
            return {}
        return {"tasks": list(self.tasks),
                "metrics_by_type": {t: m.report().as_dict() for t, m in
                                    zip(self.tasks, self.task_metrics, strict=True)}}

    def record_meta(self, meta: dict[str, Any], top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
        """Small and readable without the blob (the service exports the "delays" report on
        /metrics; `ctrloop delay-report` prints it), bounded by `top_n` advertisers."""
        out = {"head": self.name, "delay_policy": self.policies[0].name,
               "delays": self.delay_report(top_n), **self.collapse.meta}
        if self.config.conversion_types:
            # "delays" stays the first type's report (what older readers expect).
            out.update(self.task_meta())
            out["delays_by_type"] = {t: out["delays"] if i == 0 else self.delay_report(top_n, i)
                                     for i, t in enumerate(self.tasks)}
        return out

    def delay_report(self, top_n: int = DEFAULT_TOP_N, task: int = 0) -> dict[str, Any]:
        return delay_report(self.policies[task], self.monitors[task],
                            lambda k: self.advertiser_names.get(k, str(k)),  # type: ignore
                            top_n)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"delay_policy": self.policies[0].report(),
                               "metrics": self.learner.metrics.report().as_dict(),
                               "delays": self.delay_report()}
        if self.config.conversion_types:
            out["by_type"] = {
                t: {"delay_policy": self.policies[i].report(),
                    "metrics": self.task_metrics[i].report().as_dict(),
                    "other_type_conversions": self.stats.cvr_other_types}
                for i, t in enumerate(self.tasks)}
        return out

    # --- checkpoint ---------------------------------------------------------------------

    def _policy_state(self, task: int) -> tuple[dict[str, Any], torch.Tensor]:
        policy = self.policies[task].state()
        payloads = policy.pop("payloads")
        return policy, _rows(payloads, self.spec.num_fields)

    def state(self) -> dict[str, Any]:
        nf = self.spec.num_fields
        policy, policy_rows = self._policy_state(0)
        ready = self.ready
        types: dict[str, Any] = {}
        if self.config.conversion_types:
            # Per type: [policy, its rows, monitor, progressive metrics]. The first type is
            # also under the one-task keys, which `ctrloop delay-report` reads.
            types["cvr_types"] = list(self.tasks)
            types["cvr_task_state"] = [
                [*self._policy_state(i), self.monitors[i].state(), self.task_metrics[i].state()]
                for i in range(len(self.tasks))]
        return {
            **types,
            "cvr_learner": self.learner.state_dict(),
            "cvr_metrics": self.learner.metrics.state(),
            "cvr_policy": policy,
            "cvr_policy_rows": policy_rows,
            "cvr_ready": [[s.impression_id, s.click_ts, s.label, s.weight, s.release_ts, s.kind,
                           s.key, s.task] for s in ready],
            "cvr_ready_rows": _rows([s.payload for s in ready], nf),
            "advertiser_names": [[k, v] for k, v in self.advertiser_names.items()],
            "cvr_monitor": self.monitors[0].state(),
            "cvr_unscored_clicks": [[iid, key, ts] for iid, key, ts, _ in self.unscored_clicks],
            "cvr_unscored_rows": _rows([c[3] for c in self.unscored_clicks], nf),
        }

    def restore(self, state: dict[str, Any]) -> None:
        if "cvr_policy" not in state:  # a checkpoint from before pCVR: start it fresh
            return
        saved = tuple(state.get("cvr_types", ()))
        if saved != self.config.conversion_types:
            raise ConfigError(
                f"the checkpoint's pCVR learns conversion types {list(saved) or 'any (one task)'}"
                f", this trainer {list(self.config.conversion_types) or 'any (one task)'}: set "
                f"the same CTRLOOP_CONVERSION_TYPES, or start from a new checkpoint directory")
        self.learner.load_state_dict(state["cvr_learner"])
        window = (self.config.cvr_learner or self.config.learner).metrics_window
        self.learner.metrics = ProgressiveMetrics.from_state(state["cvr_metrics"], window)
        if saved:
            for i, (policy, rows, monitor, metrics) in enumerate(state["cvr_task_state"]):
                self.policies[i].restore({**policy, "payloads": rows.tolist()})
                self.monitors[i].restore(monitor)
                self.task_metrics[i] = ProgressiveMetrics.from_state(metrics, window)
        else:
            self.policies[0].restore({**state["cvr_policy"],
                                      "payloads": state["cvr_policy_rows"].tolist()})
            if "cvr_monitor" in state:  # older checkpoints: the monitor starts fresh
                self.monitors[0].restore(state["cvr_monitor"])
        self.ready = [
            CvrSample(iid, float(cts), float(label), float(w), row, float(rts), str(kind), key,
                      int(rest[0]) if rest else 0)
            for (iid, cts, label, w, rts, kind, key, *rest), row in
            zip(state["cvr_ready"], state["cvr_ready_rows"].tolist(), strict=True)]
        self.advertiser_names = {int(k): str(v) for k, v in state["advertiser_names"]}
        if "cvr_monitor" in state:
            self.unscored_clicks = [
                (str(iid), key, float(ts), row) for (iid, key, ts), row in
                zip(state["cvr_unscored_clicks"], state["cvr_unscored_rows"].tolist(),
                    strict=True)]
