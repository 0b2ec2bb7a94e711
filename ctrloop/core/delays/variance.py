"""`variance`: a per-advertiser wait from the dispersion of its conversion reports.

The statistic, the wait mapping and the soft labels: the package docstring
(ctrloop/core/delays/__init__.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ctrloop.core.delays.base import DelayPolicy, PolicyConfig


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

    def delay_wait(self, key: Hashable) -> float:
        """The `wait_quantile` of the key's click-to-report delays, shrunk toward the pool's
        (`shrink_reports` pseudo-reports), within [floor, ceiling]; the ceiling before any
        report anywhere. No side effects."""
        c = self.config
        pool = self._pooled_cache[2]
        p_total = float(pool.sum())
        ks = self._keys.get(key)
        own = np.asarray(ks.delays_w, np.float64) if ks is not None else np.zeros(len(pool))
        hist = own + (c.shrink_reports / p_total) * pool if p_total > 0 else own
        if float(hist.sum()) <= 0:
            return c.ceiling_s
        return min(max(_quantile(hist, c.wait_quantile), c.floor_s), c.ceiling_s)

    def wait_of(self, key: Hashable) -> float:
        """The wait the key's next click would get by the configured rule (no side effects)."""
        if self.config.wait_rule == "dispersion":
            return self.wait_for(self.shrunk_dispersion(key))
        return self.delay_wait(key)

    def _wait(self, key: Hashable, click_ts: float) -> float:
        ks = self._ks(key)
        if ks.wait < 0:
            ks.wait = self.wait_of(key)
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
                "wait_s": self.wait_of(k),
                "dispersion": ks.dispersion,
                "dispersion_shrunk": self.shrunk_dispersion(k),
                "window_reports": ks.window_reports,
                "history_cvr": ks.reports_w / ks.clicks_w if ks.clicks_w > 0 else math.nan,
                "delay_wait_s": self.delay_wait(k),
                "expected_label_at_wait": self.expected_label(k, self.wait_of(k)),
            })
        return out

    def stat_keys(self) -> list[Hashable]:
        return list(self._keys)

    def key_view(self, key: Hashable) -> dict[str, Any]:
        ks = self._keys.get(key)
        shrunk = self.shrunk_dispersion(key)
        # The cached wait is what clicks of this key get until the next bucket.
        wait = ks.wait if ks is not None and ks.wait >= 0 else self.wait_of(key)
        return {"wait_s": wait,
                "dispersion": None if ks is None or math.isnan(ks.dispersion)
                else ks.dispersion,
                "dispersion_shrunk": shrunk,
                "window_reports": 0.0 if ks is None else ks.window_reports}

    def pool_view(self) -> dict[str, Any]:
        # A never-seen key's wait is the pool's, by either rule.
        return {"dispersion": self._pool_dispersion,
                "wait_s": self.wait_of(_NEVER_SEEN)}

    def report(self) -> dict[str, Any]:
        out = super().report()
        out["pool_dispersion"] = self._pool_dispersion
        out["advertisers"] = len(self._keys)
        return out


def _quantile(hist: np.ndarray, q: float) -> float:
    """The delay below which a share `q` of the histogram's mass lies: log-linear inside a
    bin (bins are log-spaced), linear in the first ([0, 1 min]); the last bin (over 16 days)
    answers its lower edge."""
    cum = np.cumsum(hist)
    target = q * float(cum[-1])
    i = int(np.searchsorted(cum, target, side="left"))
    if i >= len(DELAY_EDGES):
        return float(DELAY_EDGES[-1])
    below = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - below) / float(hist[i]) if hist[i] > 0 else 1.0
    if i == 0:
        return float(DELAY_EDGES[0]) * frac
    lo, hi = float(DELAY_EDGES[i - 1]), float(DELAY_EDGES[i])
    return lo * (hi / lo) ** frac


class _NeverSeen:
    """A key no advertiser has (the pool's view)."""


_NEVER_SEEN = _NeverSeen()


def _cdf_at(hist: np.ndarray, elapsed: float) -> float:
    """Fraction of the histogram's mass at delays <= elapsed (bins are whole: conservative)."""
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    i = int(np.searchsorted(DELAY_EDGES, elapsed, side="right"))
    return float(hist[:i].sum()) / total
