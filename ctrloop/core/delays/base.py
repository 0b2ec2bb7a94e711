"""The shared machinery of every delay policy: samples, config, counters, the click buffer.

What the policies do and why: the package docstring (ctrloop/core/delays/__init__.py).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ctrloop.core.errors import ConfigError
from ctrloop.core.joining import expire


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


WAIT_RULES = ("delay", "dispersion")


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
    # How the variance policy maps its statistics to a wait (package docstring):
    # "dispersion": the index of dispersion's mapping; "delay" (opt-in, issue 11): the
    # `wait_quantile` of the advertiser's click-to-report delays (shrunk toward the pool's), so
    # at most 1 - q of its conversions come after the release, whatever its reporting. Not the
    # default: on held-out seeds it over-predicted more (docs/delays.md).
    wait_rule: str = "dispersion"
    wait_quantile: float = 0.9
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
        if self.wait_rule not in WAIT_RULES:
            raise ConfigError(f"wait_rule must be one of {', '.join(WAIT_RULES)}")
        if not 0.0 < self.wait_quantile < 1.0:
            raise ConfigError("need 0 < wait_quantile < 1")
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
