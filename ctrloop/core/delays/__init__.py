"""Conversion-delay policies: when a click becomes a pCVR training sample, and with what label.

Conversions are reported minutes to days after the click, and some advertisers upload them in
bursts at irregular times. A click released to training before its conversion is reported is a
*fake negative*; waiting long for every click makes the model stale. A policy decides, per click,
when to release it and with which label, and what to do when a conversion comes after the click
was released as a negative. Every policy here is pure and driven by event time only (the caller
feeds clicks and conversions and moves a watermark), so the same object runs on Kafka and in
replay, and `state()`/`restore()` make a restart invisible.

Policies, by name (`build_policy`):

- `naive`: each click is released at once as a negative; when its conversion comes, a positive
  is released as well (the negative stays: this is the biased baseline).
- `fnw`: the same samples, learned with the fake-negative weights of Ktena et al. (2019):
  positives weigh 1 + p, negatives (1 - p)(1 + p), p the model's current pCVR (no gradient).
  Unbiased when *every* conversion eventually gets its duplicate positive, whatever the delay.
- `fixed:SECONDS`: a click waits SECONDS of event time; its label is "conversion reported at or
  before click_ts + SECONDS" (the edge is inclusive).
- `variance` (paper §6.3, designed here): a per-advertiser wait chosen from the dispersion of the
  advertiser's conversion reports (below); labels and late corrections as `fixed`.
- `oracle`: the eventual label is known at the click (read from the simulator's truth): the
  "prophet" every other policy is measured against. Replay only.

**Late conversions are corrected, not dropped.** When a conversion arrives after its click was
released with label q (0, or the variance policy's expected label), `fixed` and `variance` emit a
*retraction pair*: the same features with label 1 and weight +1, and with label q and weight -1.
Summed over the stream, every click then contributes exactly one sample with its eventual label
(the -1 cancels the earlier sample's loss term to first order; on the logit its gradient is a
constant push of 1 - q toward the positive), so the correction is unbiased whatever the delay
distribution, unlike a bare duplicate positive (which leaves the fake negative in, `naive`) or
FNW's weights (which assume every click was first released as a negative). Clicks are remembered
for `remember_s` after release (the attribution horizon plus the longest upload gap); a
conversion for a click forgotten by then is counted (`unmatched_conversions`) and dropped.

**The variance policy.** Per advertiser key (the advertiser's feature bucket), event time is cut
into buckets of `bucket_s` (1 h); the statistic looks at the last K = `window_buckets` (48) whole
buckets of *reported* conversions r_1..r_K:

    D = sum_k (r_k - r_mean)^2 / ((K - 1) * r_mean)                  (index of dispersion)

D is about 1 when reports arrive as a Poisson stream (an advertiser that reports as conversions
happen, at steady traffic) and about (reports per upload) when they arrive in uploads, so it
separates streaming from bursty reporting once an advertiser has a few reports per upload.
It is shrunk toward the pool (the report-weighted mean D of all advertisers; `prior_dispersion`
before any data) by the number of reports n in the window: D~ = (n D + n0 D_pool) / (n + n0),
n0 = `shrink_reports` — thin advertisers borrow the coarser level. The wait is

    W(D~) = floor                                   if D~ <= d_lo
          = floor * (ceiling / floor) ** t,  t = (ln D~ - ln d_lo) / (ln d_hi - ln d_lo)
          = ceiling                                 if D~ >= d_hi

with floor 5 min, ceiling 3 days (the longest upload gap of the simulator plus conversion
delay), d_lo 2, d_hi 8: stable advertisers are released within minutes, volatile ones when their
uploads have come in. Waits are recomputed when the bucket changes and apply to clicks from then.

A click released with label 0 whose conversion comes later is a fake negative until the
retraction pair arrives, so the bias of a fast release is the conversion mass still to come; it
is small for advertisers whose delays are short and for ads with a long history, and largest for
new ads of advertisers with long delays (docs/benchmarks.md measures it). `soft_labels=True`
(off by default) releases an unconverted click with the expected label
q = h (1 - F(W)) / (1 - h F(W)) instead (h: the advertiser's decayed conversion rate, F: its
decayed click-to-report delay histogram). Without more, it over-counts (measured +50% on a
5-day simulation): q is fixed at release while the posterior of a click that stays unconverted
keeps falling. So a soft-labelled click still unconverted at `settle_s` (3 days) after the click
is *settled*: a retraction pair (label 0, weight +1) and (label q, weight -1) turns it into a
negative, and a conversion after that is corrected as usual; every click's net label is then its
eventual one, as with hard labels. Measured on a month (docs/benchmarks.md), it is unstable:
the settle pairs push the logit down at a constant rate q whatever the prediction, and with one
per unconverted click they dominate the loss (per-day bias between +74% and -100%, AUC 0.55).
Kept as an option for experiments, off by default.

**State and memory.** Pending clicks (with their feature rows), remembered released clicks and
per-advertiser statistics are plain data in `state()`. At most `max_clicks` clicks are held
(pending plus remembered); at the cap the oldest remembered click is forgotten (its late
conversion, if any, will be dropped and counted), and if none is remembered the pending click
with the earliest deadline is released early with the label it has (counted as `evicted`).
Orphan conversions (before their click) wait `orphan_ttl` seconds, at most `max_orphans`.
`state()` also carries the `PolicyConfig`, so a reader of a checkpoint can rebuild the policy.

**Observability.** `key_view(key)` gives a key's current wait and, for `variance`, the statistic
raw and shrunk and the reports in its window, without side effects; `pool_view()` the pooled
statistic. `ctrloop/core/delay_report.py` joins them with the model's calibration over matured
clicks into a bounded per-advertiser report (published with every pCVR snapshot, exported on
the service's /metrics, printed by `ctrloop delay-report`).

**Conversion types.** Without `conversion_types` (PipelineConfig; CTRLOOP_CONVERSION_TYPES),
every conversion counts for its click whatever its type and the first one decides the label.
With them, the pipeline holds one policy per type, so the policy key is in effect (advertiser,
type): each type has its own statistic and wait (a purchase uploaded in bursts waits, a signup
reported live does not). A click is a pending sample per type, released per type with that
type's label, and the retraction pairs are per type too; samples carry the type's index
(`CvrSample.task`), and the pCVR model is the multi-task STEM FwFM (ctrloop/core/models/stem.py,
one output per type, a sample's loss touching only its type's output). Conversions of a type
not listed are counted (`cvr_other_types`) and not learned. Memory: the pending and remembered
clicks are held once per type (`max_clicks` is per type).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Collection, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctrloop.core.errors import ConfigError
from ctrloop.core.joining import expire

POLICY_NAMES = ("variance", "fixed:SECONDS", "naive", "fnw", "oracle")


@dataclass(slots=True)
class CvrSample:
    """One pCVR training sample: the click's features, a label in [0, 1] and a loss weight."""

    impression_id: str
    click_ts: float
    label: float
    weight: float
    payload: Any
    release_ts: float  # the watermark (event time) at which the policy released it
    kind: str  # "click": the click's first sample; "late": positive after release; "retract"
    key: Hashable = None
    task: int = 0  # the conversion type's index, set by the pipeline (one policy per type)


@dataclass(frozen=True)
class PolicyConfig:
    remember_s: float = 9 * 86_400.0  # attribution horizon (7 d) + longest upload gap (2 d)
    orphan_ttl: float = 600.0
    max_clicks: int = 1_000_000
    max_orphans: int = 100_000
    # variance policy
    floor_s: float = 300.0
    ceiling_s: float = 3 * 86_400.0
    bucket_s: float = 3600.0
    window_buckets: int = 48
    d_lo: float = 2.0
    d_hi: float = 8.0
    shrink_reports: float = 10.0
    prior_dispersion: float = 8.0  # before any report: assume volatile (wait the ceiling)
    half_life_s: float = 7 * 86_400.0  # of the rate and delay statistics
    soft_labels: bool = False  # expected labels, settled at settle_s: unstable (docstring)
    settle_s: float = 3 * 86_400.0  # soft labels: when an unconverted click becomes a 0

    def __post_init__(self) -> None:
        if self.remember_s < 0 or self.orphan_ttl < 0:
            raise ConfigError("remember_s and orphan_ttl must be >= 0")
        if self.max_clicks < 1 or self.max_orphans < 1:
            raise ConfigError("max_clicks and max_orphans must be >= 1")
        if not 0 < self.floor_s <= self.ceiling_s:
            raise ConfigError("need 0 < floor_s <= ceiling_s")
        if not 1.0 <= self.d_lo < self.d_hi:
            raise ConfigError("need 1 <= d_lo < d_hi")
        if self.bucket_s <= 0 or self.window_buckets < 2 or self.half_life_s <= 0:
            raise ConfigError("bucket_s, half_life_s must be > 0 and window_buckets >= 2")
        if self.soft_labels and not 0 <= self.settle_s <= self.remember_s:
            # A soft label is settled while its click is still remembered, or never.
            raise ConfigError("need 0 <= settle_s <= remember_s")


@dataclass
class PolicyStats:
    clicks: int = 0
    duplicate_clicks: int = 0
    conversions: int = 0
    duplicate_conversions: int = 0
    released: int = 0
    released_positive: int = 0
    late_conversions: int = 0  # corrected after the click was released
    unmatched_conversions: int = 0  # no click within orphan_ttl, or the click was forgotten
    evicted: int = 0
    forgotten_at_cap: int = 0
    release_delay_sum: float = 0.0  # seconds from click to first release, summed
    settled: int = 0  # soft labels turned into 0 at settle_s (a retraction pair each)


# Pending record: [key, click_ts, deadline, payload, conversion_ts or None]
# Remembered record: [key, click_ts, label given, payload, forget_at]


class DelayPolicy:
    """The shared buffer: pending clicks released at a deadline, remembered for corrections.

    Subclasses choose the wait (`_wait`), the label of an unconverted click (`_open_label`) and
    the correction for a late conversion (`_late`).
    """

    name = "base"
    needs_predictions = False  # True: the learner passes current predictions to `weights`

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.stats = PolicyStats()
        self.watermark = -math.inf
        self._pending: dict[str, list[Any]] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._seq = 0
        self._done: dict[str, list[Any]] = {}
        self._forget: deque[tuple[float, str]] = deque()
        self._orphans: dict[str, float] = {}
        self._settle: list[tuple[float, str]] = []  # soft-labelled clicks: (settle at, id)

    # --- hooks -------------------------------------------------------------------------
    def _wait(self, key: Hashable, click_ts: float) -> float:
        raise NotImplementedError

    def _open_label(self, key: Hashable, click_ts: float, released_at: float) -> float:
        return 0.0

    def _late(self, iid: str, rec: list[Any], ts: float) -> list[CvrSample]:
        key, click_ts, given, payload, _ = rec
        return [CvrSample(iid, click_ts, 1.0, 1.0, payload, ts, "late", key),
                CvrSample(iid, click_ts, given, -1.0, payload, ts, "retract", key)]

    def _observe_click(self, key: Hashable, ts: float) -> None:
        pass

    def _observe_conversion(self, key: Hashable, click_ts: float, ts: float) -> None:
        pass

    def _on_advance(self, watermark: float) -> None:
        pass

    def weights(self, samples: list[CvrSample], preds: np.ndarray | None) -> np.ndarray:
        return np.fromiter((s.weight for s in samples), np.float32, len(samples))

    # --- events ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def remembered(self) -> int:
        return len(self._done)

    def add_click(self, iid: str, key: Hashable, click_ts: float,
                  payload: Any) -> list[CvrSample]:
        if iid in self._pending or iid in self._done:
            self.stats.duplicate_clicks += 1
            return []
        self.stats.clicks += 1
        self._observe_click(key, click_ts)
        deadline = click_ts + self._wait(key, click_ts)
        rec = [key, click_ts, deadline, payload, self._orphans.pop(iid, None)]
        if rec[4] is not None:
            self._observe_conversion(key, click_ts, rec[4])
        out: list[CvrSample] = []
        if deadline <= max(self.watermark, click_ts):
            out.extend(self._release(iid, rec, max(self.watermark, click_ts)))
        else:
            self._pending[iid] = rec
            heapq.heappush(self._deadlines, (deadline, self._seq, iid))
            self._seq += 1
        out.extend(self._enforce_cap())
        return out

    def add_conversion(self, iid: str, ts: float) -> list[CvrSample]:
        self.stats.conversions += 1
        rec = self._pending.get(iid)
        if rec is not None:
            if rec[4] is not None:
                self.stats.duplicate_conversions += 1
            else:
                rec[4] = ts
                self._observe_conversion(rec[0], rec[1], ts)
            return []
        done = self._done.get(iid)
        if done is not None:
            if done[2] >= 1.0:  # already a positive
                self.stats.duplicate_conversions += 1
                return []
            self._observe_conversion(done[0], done[1], ts)
            self.stats.late_conversions += 1
            out = self._late(iid, done, ts)
            done[2] = 1.0
            return out
        if iid in self._orphans:
            self.stats.duplicate_conversions += 1
        elif ts + self.config.orphan_ttl <= self.watermark:
            self.stats.unmatched_conversions += 1
        else:
            if len(self._orphans) >= self.config.max_orphans:
                self._orphans.pop(next(iter(self._orphans)))
                self.stats.unmatched_conversions += 1
            self._orphans[iid] = ts
        return []

    def advance(self, watermark: float) -> list[CvrSample]:
        if watermark <= self.watermark:
            return []
        self.watermark = watermark
        self._on_advance(watermark)
        out: list[CvrSample] = []
        heap = self._deadlines
        while heap and heap[0][0] <= watermark:
            _, _, iid = heapq.heappop(heap)
            rec = self._pending.pop(iid, None)
            if rec is not None:
                out.extend(self._release(iid, rec, rec[2]))
        settle = self._settle
        while settle and settle[0][0] <= watermark:
            at, iid = heapq.heappop(settle)
            done = self._done.get(iid)
            if done is not None and 0.0 < done[2] < 1.0:
                out.extend(self._settle_one(iid, done, at))
        self._expire(watermark)
        return out

    def _settle_one(self, iid: str, rec: list[Any], at: float) -> list[CvrSample]:
        """No conversion by settle_s: the soft label q becomes 0 through a retraction pair, so
        a click's net label is its eventual one (without this, soft labels over-count)."""
        key, click_ts, given, payload, _ = rec
        self.stats.settled += 1
        rec[2] = 0.0
        return [CvrSample(iid, click_ts, 0.0, 1.0, payload, at, "settle", key),
                CvrSample(iid, click_ts, given, -1.0, payload, at, "retract", key)]

    def flush(self) -> list[CvrSample]:
        """End of a finite stream: release every pending click with the label it has."""
        out: list[CvrSample] = []
        for _, _, iid in sorted(self._deadlines):
            rec = self._pending.pop(iid, None)
            if rec is not None:
                out.extend(self._release(iid, rec, max(self.watermark, rec[1])))
        self._deadlines = []
        return out

    # --- internals -----------------------------------------------------------------------
    def _release(self, iid: str, rec: list[Any], at: float) -> list[CvrSample]:
        key, click_ts, deadline, payload, conv_ts = rec
        st = self.stats
        st.released += 1
        st.release_delay_sum += at - click_ts
        # The label is decided by the deadline, inclusive; a conversion reported after it (but
        # before the watermark passed it) is a late one, corrected right away.
        converted = conv_ts is not None and conv_ts <= deadline
        label = 1.0 if converted else self._open_label(key, click_ts, at)
        st.released_positive += converted
        done = [key, click_ts, label, payload, click_ts + self.config.remember_s]
        out = [CvrSample(iid, click_ts, label, 1.0, payload, at, "click", key)]
        if conv_ts is not None and not converted:
            st.late_conversions += 1
            out.extend(self._late(iid, done, max(at, conv_ts)))
            done[2] = 1.0
        elif 0.0 < label < 1.0:
            heapq.heappush(self._settle, (click_ts + self.config.settle_s, iid))
        self._done[iid] = done
        self._forget.append((done[4], iid))
        return out

    def _enforce_cap(self) -> list[CvrSample]:
        out: list[CvrSample] = []
        while len(self._pending) + len(self._done) > self.config.max_clicks:
            if self._forget:
                _, iid = self._forget.popleft()
                if self._done.pop(iid, None) is not None:
                    self.stats.forgotten_at_cap += 1
                continue
            while self._deadlines:
                _, _, iid = heapq.heappop(self._deadlines)
                rec = self._pending.pop(iid, None)
                if rec is not None:
                    self.stats.evicted += 1
                    out.extend(self._release(iid, rec, max(self.watermark, rec[1])))
                    break
        return out

    def _expire(self, watermark: float) -> None:
        self.stats.unmatched_conversions += expire(self._orphans, self.config.orphan_ttl,
                                                   self._forget, self._done, watermark)

    # --- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Plain data; feature rows are under "payloads" in record order, for the caller to
        store compactly (the pipeline keeps them as one int64 tensor)."""
        pending = sorted((seq, iid) for _, seq, iid in self._deadlines if iid in self._pending)
        seen: set[str] = set()
        p_rows, payloads = [], []
        for _, iid in pending:
            if iid in seen:
                continue
            seen.add(iid)
            key, click_ts, deadline, payload, conv = self._pending[iid]
            p_rows.append([iid, key, click_ts, deadline, conv])
            payloads.append(payload)
        d_rows = []
        for forget_at, iid in self._forget:
            rec = self._done.get(iid)
            if rec is not None and rec[4] == forget_at:
                d_rows.append([iid, rec[0], rec[1], rec[2]])
                payloads.append(rec[3])
        return {
            "name": self.name,
            "watermark": None if self.watermark == -math.inf else self.watermark,
            "pending": p_rows,
            "done": d_rows,
            "payloads": payloads,
            "orphans": [[k, v] for k, v in self._orphans.items()],
            "stats": asdict(self.stats),
            "extra": self._extra_state(),
            # Readers of a checkpoint (`ctrloop delay-report`) rebuild the policy with it.
            "config": asdict(self.config),
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ConfigError(f"checkpoint was written by delay policy {state['name']!r}, "
                              f"not {self.name!r}")
        wm = state["watermark"]
        self.watermark = -math.inf if wm is None else float(wm)
        payloads = list(state["payloads"])
        n_p = len(state["pending"])
        for (iid, key, click_ts, deadline, conv), payload in zip(
                state["pending"], payloads[:n_p], strict=True):
            self._pending[iid] = [key, float(click_ts), float(deadline), payload,
                                  None if conv is None else float(conv)]
            self._deadlines.append((float(deadline), self._seq, iid))
            self._seq += 1
        heapq.heapify(self._deadlines)
        for (iid, key, click_ts, label), payload in zip(state["done"], payloads[n_p:],
                                                        strict=True):
            forget_at = float(click_ts) + self.config.remember_s
            self._done[iid] = [key, float(click_ts), float(label), payload, forget_at]
            self._forget.append((forget_at, iid))
            if 0.0 < float(label) < 1.0:  # the settle queue follows from the soft labels
                self._settle.append((float(click_ts) + self.config.settle_s, iid))
        heapq.heapify(self._settle)
        self._orphans = {k: float(v) for k, v in state["orphans"]}
        self.stats = PolicyStats(**state["stats"])
        self._restore_extra(state["extra"])

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        pass

    # --- observability (ctrloop/core/delay_report.py builds the bounded report) --------------
    def stat_keys(self) -> list[Hashable]:
        """Keys the policy keeps statistics for (none but the variance policy's)."""
        return []

    def key_view(self, key: Hashable) -> dict[str, Any]:
        """The current wait of `key` and, for the variance policy, its statistic; no side
        effects (a report must not create keys or move caches)."""
        return {"wait_s": self._wait(key, self.watermark), "dispersion": None,
                "dispersion_shrunk": None, "window_reports": None}

    def pool_view(self) -> dict[str, Any]:
        return {}

    def report(self) -> dict[str, Any]:
        st = self.stats
        return {"policy": self.name, "pending": self.pending, "remembered": self.remembered,
                "mean_release_delay_s": st.release_delay_sum / st.released if st.released
                else math.nan, **asdict(st)}


class FixedPolicy(DelayPolicy):
    def __init__(self, seconds: float, config: PolicyConfig | None = None) -> None:
        if not seconds >= 0:
            raise ConfigError("fixed:SECONDS needs SECONDS >= 0")
        super().__init__(config)
        self.seconds = float(seconds)
        self.name = f"fixed:{seconds:g}"

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return self.seconds


class NaivePolicy(DelayPolicy):
    name = "naive"

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return 0.0

    def _late(self, iid: str, rec: list[Any], ts: float) -> list[CvrSample]:
        key, click_ts, _, payload, _ = rec
        return [CvrSample(iid, click_ts, 1.0, 1.0, payload, ts, "late", key)]


class FNWPolicy(NaivePolicy):
    """Naive's samples, learned with the fake-negative weights (Ktena et al. 2019)."""

    name = "fnw"
    needs_predictions = True

    def weights(self, samples: list[CvrSample], preds: np.ndarray | None) -> np.ndarray:
        assert preds is not None
        p = np.asarray(preds, np.float32)
        y = np.fromiter((s.label for s in samples), np.float32, len(samples))
        return np.where(y >= 1.0, 1.0 + p, (1.0 - p) * (1.0 + p)).astype(np.float32)


class OraclePolicy(DelayPolicy):
    """The prophet: every click released at once with its eventual label (from the truth)."""

    name = "oracle"

    def __init__(self, converted: Collection[str], config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._converted = converted

    def _wait(self, key: Hashable, click_ts: float) -> float:
        return 0.0

    def add_click(self, iid: str, key: Hashable, click_ts: float,
                  payload: Any) -> list[CvrSample]:
        self.stats.clicks += 1
        self.stats.released += 1
        label = 1.0 if iid in self._converted else 0.0
        self.stats.released_positive += int(label)
        return [CvrSample(iid, click_ts, label, 1.0, payload, click_ts, "click", key)]

    def add_conversion(self, iid: str, ts: float) -> list[CvrSample]:
        self.stats.conversions += 1  # already in the labels
        return []


@dataclass
class _KeyStats:
    """Per-advertiser statistics of the variance policy (all in event time)."""

    bucket: int = -1  # index of the newest bucket seen
    reports: list[float] = field(default_factory=list)  # ring of the last K+1 buckets
    clicks_w: float = 0.0  # decayed click count
    reports_w: float = 0.0  # decayed report count
    delays_w: list[float] = field(default_factory=list)  # decayed click->report histogram
    decay_ts: float = -math.inf
    wait: float = -1.0  # cached wait (-1: recompute)
    dispersion: float = math.nan
    window_reports: float = 0.0


# Log-spaced delay bins for F: edges from 1 min to 16 days.
DELAY_EDGES = np.geomspace(60.0, 16 * 86_400.0, 25)


class VariancePolicy(DelayPolicy):
    name = "variance"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._keys: dict[Hashable, _KeyStats] = {}
        self._pool_dispersion = self.config.prior_dispersion
        self._pool_bucket = -1
        # Pooled rate and delay histogram, refreshed with the buckets (hourly): the fallback
        # of thin advertisers, and cheap enough to keep off the per-click path.
        self._pooled_cache: tuple[float, float, np.ndarray] = (
            0.0, 0.0, np.zeros(len(DELAY_EDGES) + 1))

    # --- statistics ------------------------------------------------------------------------
    def _ks(self, key: Hashable) -> _KeyStats:
        ks = self._keys.get(key)
        if ks is None:
            # K + 2 slots: the K whole buckets before the watermark's, that one, and one more
            # for events ahead of the watermark by up to the allowed lateness.
            ks = _KeyStats(reports=[0.0] * (self.config.window_buckets + 2),
                           delays_w=[0.0] * (len(DELAY_EDGES) + 1))
            self._keys[key] = ks
        return ks

    def _decay(self, ks: _KeyStats, ts: float) -> None:
        if ts <= ks.decay_ts:
            return
        if ks.decay_ts > -math.inf:
            f = 0.5 ** ((ts - ks.decay_ts) / self.config.half_life_s)
            ks.clicks_w *= f
            ks.reports_w *= f
            ks.delays_w = [d * f for d in ks.delays_w]
        ks.decay_ts = ts

    def _roll(self, ks: _KeyStats, bucket: int) -> None:
        """Move the key's ring forward to `bucket` (zero-filled), dropping the wait cache."""
        if bucket <= ks.bucket:
            return
        n = len(ks.reports)
        steps = min(bucket - ks.bucket, n) if ks.bucket >= 0 else n
        for i in range(1, steps + 1):
            ks.reports[(bucket - steps + i) % n] = 0.0
        ks.bucket = bucket
        ks.wait = -1.0

    def _observe_click(self, key: Hashable, ts: float) -> None:
        ks = self._ks(key)
        self._decay(ks, ts)
        ks.clicks_w += 1.0
        self._roll(ks, int(ts // self.config.bucket_s))

    def _observe_conversion(self, key: Hashable, click_ts: float, ts: float) -> None:
        ks = self._ks(key)
        self._decay(ks, ts)
        ks.reports_w += 1.0
        delay = max(ts - click_ts, 0.0)
        ks.delays_w[int(np.searchsorted(DELAY_EDGES, delay))] += 1.0
        b = int(ts // self.config.bucket_s)
        self._roll(ks, b)
        if ks.bucket - b < len(ks.reports):  # still in the ring
            ks.reports[b % len(ks.reports)] += 1.0

    def _dispersion(self, ks: _KeyStats, now_bucket: int) -> tuple[float, float]:
        """(D, reports) over the K whole buckets before `now_bucket`."""
        k = self.config.window_buckets
        n = len(ks.reports)
        if ks.bucket < 0:
            return math.nan, 0.0
        counts = []
        for b in range(now_bucket - k, now_bucket):
            counts.append(ks.reports[b % n] if ks.bucket - n < b <= ks.bucket else 0.0)
        total = float(sum(counts))
        if total <= 0:
            return math.nan, 0.0
        mean = total / k
        d = sum((c - mean) ** 2 for c in counts) / ((k - 1) * mean)
        return d, total

    def _on_advance(self, watermark: float) -> None:
        bucket = int(watermark // self.config.bucket_s) if watermark > -math.inf else -1
        if bucket <= self._pool_bucket:
            return
        self._pool_bucket = bucket
        num = den = 0.0
        for ks in self._keys.values():
            self._roll(ks, bucket)
            d, n = self._dispersion(ks, bucket)
            ks.dispersion, ks.window_reports = d, n
            if n > 0:
                num += n * d
                den += n
        if den > 0:
            self._pool_dispersion = num / den
        self._pooled_cache = self._pooled()

    def shrunk_dispersion(self, key: Hashable) -> float:
        ks = self._keys.get(key)
        n0 = self.config.shrink_reports
        pool = self._pool_dispersion
        if ks is None or ks.window_reports <= 0 or math.isnan(ks.dispersion):
            return pool
        n = ks.window_reports
        return (n * ks.dispersion + n0 * pool) / (n + n0)

    def wait_for(self, dispersion: float) -> float:
        c = self.config
        if dispersion <= c.d_lo:
            return c.floor_s
        if dispersion >= c.d_hi:
            return c.ceiling_s
        t = (math.log(dispersion) - math.log(c.d_lo)) / (math.log(c.d_hi) - math.log(c.d_lo))
        return c.floor_s * (c.ceiling_s / c.floor_s) ** t

    def _wait(self, key: Hashable, click_ts: float) -> float:
        ks = self._ks(key)
        if ks.wait < 0:
            ks.wait = self.wait_for(self.shrunk_dispersion(key))
        return ks.wait

    def _pooled(self) -> tuple[float, float, np.ndarray]:
        clicks = sum(ks.clicks_w for ks in self._keys.values())
        reports = sum(ks.reports_w for ks in self._keys.values())
        hist = np.sum([ks.delays_w for ks in self._keys.values()], axis=0) \
            if self._keys else np.zeros(len(DELAY_EDGES) + 1)
        return clicks, reports, np.asarray(hist, np.float64)

    def expected_label(self, key: Hashable, elapsed: float) -> float:
        """q = P(converts | not reported within `elapsed`) for a click of `key`."""
        ks = self._keys.get(key)
        p_clicks, p_reports, p_hist = self._pooled_cache
        n0 = self.config.shrink_reports
        pool_rate = p_reports / p_clicks if p_clicks > 0 else 0.0
        pool_cdf = _cdf_at(p_hist, elapsed)
        if ks is None:
            h, f = pool_rate, pool_cdf
        else:
            h = (ks.reports_w + n0 * pool_rate) / (ks.clicks_w + n0)
            n = float(sum(ks.delays_w))
            f = (n * _cdf_at(np.asarray(ks.delays_w), elapsed) + n0 * pool_cdf) / (n + n0)
        h = min(max(h, 0.0), 0.999)
        return h * (1.0 - f) / (1.0 - h * f)

    def _open_label(self, key: Hashable, click_ts: float, released_at: float) -> float:
        if not self.config.soft_labels:
            return 0.0
        return self.expected_label(key, released_at - click_ts)

    # --- state and observability -------------------------------------------------------
    def _extra_state(self) -> dict[str, Any]:
        clicks, reports, hist = self._pooled_cache
        return {
            "pool_dispersion": self._pool_dispersion,
            "pool_bucket": self._pool_bucket,
            "pooled": [clicks, reports, hist.tolist()],
            "keys": [[k, asdict(ks)] for k, ks in self._keys.items()],
        }

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        self._pool_dispersion = float(extra["pool_dispersion"])
        self._pool_bucket = int(extra["pool_bucket"])
        clicks, reports, hist = extra["pooled"]
        self._pooled_cache = (float(clicks), float(reports), np.asarray(hist, np.float64))
        self._keys = {k: _KeyStats(**v) for k, v in extra["keys"]}

    def key_report(self, names: Callable[[Hashable], str] = str) -> list[dict[str, Any]]:
        """Per advertiser: the current wait, the statistic, and observed vs history CVR."""
        out = []
        for k, ks in self._keys.items():
            out.append({
                "advertiser": names(k),
                "wait_s": self.wait_for(self.shrunk_dispersion(k)),
                "dispersion": ks.dispersion,
                "dispersion_shrunk": self.shrunk_dispersion(k),
                "window_reports": ks.window_reports,
                "history_cvr": ks.reports_w / ks.clicks_w if ks.clicks_w > 0 else math.nan,
                "expected_label_at_wait": self.expected_label(
                    k, self.wait_for(self.shrunk_dispersion(k))),
            })
        return out

    def stat_keys(self) -> list[Hashable]:
        return list(self._keys)

    def key_view(self, key: Hashable) -> dict[str, Any]:
        ks = self._keys.get(key)
        shrunk = self.shrunk_dispersion(key)
        # The cached wait is what clicks of this key get until the next bucket.
        wait = ks.wait if ks is not None and ks.wait >= 0 else self.wait_for(shrunk)
        return {"wait_s": wait,
                "dispersion": None if ks is None or math.isnan(ks.dispersion)
                else ks.dispersion,
                "dispersion_shrunk": shrunk,
                "window_reports": 0.0 if ks is None else ks.window_reports}

    def pool_view(self) -> dict[str, Any]:
        return {"dispersion": self._pool_dispersion,
                "wait_s": self.wait_for(self._pool_dispersion)}

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["pool_dispersion"] = self._pool_dispersion
        out["advertisers"] = len(self._keys)
        return out


def _cdf_at(hist: np.ndarray, elapsed: float) -> float:
    """Fraction of the histogram's mass at delays <= elapsed (bins are whole: conservative)."""
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    i = int(np.searchsorted(DELAY_EDGES, elapsed, side="right"))
    return float(hist[:i].sum()) / total


def build_policy(name: str, config: PolicyConfig | None = None,
                 converted: Collection[str] | None = None) -> DelayPolicy:
    """A policy by name: variance, fixed:SECONDS, naive, fnw, oracle (needs `converted`)."""
    name = name.strip()
    if name == "variance":
        return VariancePolicy(config)
    if name == "naive":
        return NaivePolicy(config)
    if name == "fnw":
        return FNWPolicy(config)
    if name == "oracle":
        if converted is None:
            raise ConfigError("delay policy 'oracle' reads the truth: replay with --truth")
        return OraclePolicy(converted, config)
    if name.startswith("fixed:"):
        try:
            seconds = float(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"bad delay policy {name!r}: fixed:SECONDS needs a number") from None
        return FixedPolicy(seconds, config)
    raise ConfigError(f"unknown delay policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


def validate_policy_name(name: str) -> str:
    """Raise ConfigError for a name `build_policy` would refuse (oracle is accepted here)."""
    build_policy(name, converted=() if name.strip() == "oracle" else None)
    return name
