"""Per-advertiser observability of pCVR under a delay policy: windows, statistic, calibration.

Two pieces, both pure and driven by event time like the policies they watch:

- `CvrMonitor` counts, per advertiser key and per hour of *click* time, the clicks, the pCVR the
  served model gave them and the conversions that come in for them. A click *matures*
  `mature_s` (3 days, the variance policy's ceiling) after its hour ends; its hour is then
  folded into two totals: `history` (every matured click since the start) and `recent`
  (matured clicks, exponentially decayed with `half_life_s`, 1 day). From those:
  observed CVR = conversions / clicks over recent matured clicks, history CVR = the same since
  the start, and the model's calibration = sum pCVR / sum conversions over recent matured clicks
  (1.0 is calibrated; the paper's bias is calibration - 1). Matured clicks are what make this
  honest under delayed feedback: over immature clicks every policy looks biased upward, because
  their conversions have not come yet. Conversions after maturity are not counted
  (`after_maturity`), so a late-reporting advertiser's observed CVR is a lower bound.
  Memory: one record per immature click (id -> key, hour), at most `max_clicks`; at the cap the
  oldest is forgotten (its conversion, if any, is then counted as `unmatched`).
- `delay_report` joins the policy's view of each key (`DelayPolicy.key_view`: the current wait,
  the variance statistic raw and shrunk, the reports in its window) with the monitor's, and
  bounds it: the top `top_n` advertisers by recent clicks, one pooled `other` line for the rest
  and a `total` line. The cap is what keeps the snapshot meta small and the Prometheus label set
  at most `top_n` + 2 series per gauge (service/metrics.py), whatever the number of advertisers.

The report is plain JSON (NaN becomes null) and is published with every pCVR snapshot
(`Pipeline.head_record_meta`), exported on the service's /metrics and printed by
`ctrloop delay-report`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

from ctrloop.core.delays import DelayPolicy, PolicyConfig, build_policy
from ctrloop.core.errors import ConfigError

DEFAULT_TOP_N = 20
OTHER = "_other"
TOTAL = "_total"


@dataclass(frozen=True)
class MonitorConfig:
    mature_s: float = 3 * 86_400.0
    bucket_s: float = 3600.0
    half_life_s: float = 86_400.0
    max_clicks: int = 1_000_000

    def __post_init__(self) -> None:
        if self.mature_s < 0 or self.bucket_s <= 0 or self.half_life_s <= 0:
            raise ConfigError("need mature_s >= 0, bucket_s > 0 and half_life_s > 0")
        if self.max_clicks < 1:
            raise ConfigError("max_clicks must be >= 1")


@dataclass
class MonitorStats:
    clicks: int = 0
    duplicate_clicks: int = 0
    conversions: int = 0  # first conversion of a remembered click
    duplicate_conversions: int = 0
    unmatched: int = 0  # no remembered click (orphan, forgotten at the cap, or never seen)
    after_maturity: int = 0
    forgotten_at_cap: int = 0


@dataclass
class _Adv:
    clicks: float = 0.0  # every click seen
    clicks_w: float = 0.0  # decayed with half_life_s, for ranking
    clicks_ts: float = -math.inf
    # Immature click hours: hour -> [clicks, sum pCVR, conversions].
    open: dict[int, list[float]] = field(default_factory=dict)
    history: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    recent: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    recent_ts: float = -math.inf


class CvrMonitor:
    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        self.stats = MonitorStats()
        self.watermark = -math.inf
        self._advs: dict[Hashable, _Adv] = {}
        # Immature clicks: id -> [key, hour, converted]; `_order` holds (hour, id) by arrival.
        self._clicks: dict[str, list[Any]] = {}
        self._order: deque[tuple[int, str]] = deque()
        self._matured_before = -(2**62)  # hours < this have been folded

    # --- events ------------------------------------------------------------------------
    def _hour(self, ts: float) -> int:
        return int(ts // self.config.bucket_s)

    def _adv(self, key: Hashable) -> _Adv:
        adv = self._advs.get(key)
        if adv is None:
            adv = self._advs[key] = _Adv()
        return adv

    def add_click(self, iid: str, key: Hashable, click_ts: float) -> None:
        if iid in self._clicks:
            self.stats.duplicate_clicks += 1
            return
        self.stats.clicks += 1
        adv = self._adv(key)
        adv.clicks += 1.0
        if adv.clicks_ts > -math.inf and click_ts > adv.clicks_ts:
            adv.clicks_w *= 0.5 ** ((click_ts - adv.clicks_ts) / self.config.half_life_s)
        adv.clicks_ts = max(adv.clicks_ts, click_ts)
        adv.clicks_w += 1.0
        hour = self._hour(click_ts)
        if hour < self._matured_before:
            return  # a click already past maturity (a very late event): nothing to wait for
        adv.open.setdefault(hour, [0.0, 0.0, 0.0])[0] += 1.0
        self._clicks[iid] = [key, hour, False]
        self._order.append((hour, iid))
        while len(self._clicks) > self.config.max_clicks:
            _, old = self._order.popleft()
            if self._clicks.pop(old, None) is not None:
                self.stats.forgotten_at_cap += 1

    def add_pcvr(self, key: Hashable, click_ts: float, pcvr: float) -> None:
        """The served pCVR of a click added before (scored at the next tick, in a batch)."""
        adv = self._advs.get(key)
        row = None if adv is None else adv.open.get(self._hour(click_ts))
        if row is not None:
            row[1] += pcvr

    def add_conversion(self, iid: str, ts: float) -> None:
        rec = self._clicks.get(iid)
        if rec is None:
            self.stats.unmatched += 1
            return
        if rec[2]:
            self.stats.duplicate_conversions += 1
            return
        rec[2] = True
        row = self._advs[rec[0]].open.get(rec[1])
        if row is None:
            self.stats.after_maturity += 1
            return
        self.stats.conversions += 1
        row[2] += 1.0

    def advance(self, watermark: float) -> None:
        if watermark <= self.watermark:
            return
        self.watermark = watermark
        c = self.config
        # Hour h matures when (h + 1) * bucket_s + mature_s <= watermark.
        before = math.floor((watermark - c.mature_s) / c.bucket_s)
        if before <= self._matured_before:
            return
        self._matured_before = before
        for adv in self._advs.values():
            done = [h for h in adv.open if h < before]
            for h in sorted(done):
                self._fold(adv, adv.open.pop(h), (h + 1) * c.bucket_s + c.mature_s)
        order = self._order
        while order and order[0][0] < before:
            self._clicks.pop(order.popleft()[1], None)

    def _fold(self, adv: _Adv, row: list[float], matured_at: float) -> None:
        if adv.recent_ts > -math.inf and matured_at > adv.recent_ts:
            f = 0.5 ** ((matured_at - adv.recent_ts) / self.config.half_life_s)
            adv.recent = [x * f for x in adv.recent]
        adv.recent_ts = max(adv.recent_ts, matured_at)
        for i in range(3):
            adv.history[i] += row[i]
            adv.recent[i] += row[i]

    # --- views ---------------------------------------------------------------------------
    def stat_keys(self) -> list[Hashable]:
        return list(self._advs)

    def recent_clicks(self, key: Hashable) -> float:
        """Clicks decayed to the watermark (or the key's newest click), for ranking."""
        adv = self._advs.get(key)
        if adv is None:
            return 0.0
        now = max(self.watermark, adv.clicks_ts)
        return adv.clicks_w * 0.5 ** ((now - adv.clicks_ts) / self.config.half_life_s)

    def view(self, key: Hashable) -> dict[str, float]:
        adv = self._advs.get(key) or _Adv()
        return {"clicks": adv.clicks, "clicks_recent": self.recent_clicks(key),
                "matured_clicks": adv.history[0], "matured_conversions": adv.history[2],
                "recent_clicks": adv.recent[0], "recent_pcvr": adv.recent[1],
                "recent_conversions": adv.recent[2]}

    # --- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "watermark": None if self.watermark == -math.inf else self.watermark,
            "matured_before": self._matured_before,
            "stats": asdict(self.stats),
            "advertisers": [[k, a.clicks, a.clicks_w, _num(a.clicks_ts),
                             [[h, *row] for h, row in a.open.items()], a.history, a.recent,
                             _num(a.recent_ts)] for k, a in self._advs.items()],
            "clicks": [[iid, *self._clicks[iid]] for _, iid in self._order
                       if iid in self._clicks],
        }

    def restore(self, state: dict[str, Any]) -> None:
        wm = state["watermark"]
        self.watermark = -math.inf if wm is None else float(wm)
        self._matured_before = int(state["matured_before"])
        self.stats = MonitorStats(**state["stats"])
        self._advs = {}
        for k, clicks, clicks_w, clicks_ts, open_rows, history, recent, recent_ts in \
                state["advertisers"]:
            self._advs[k] = _Adv(float(clicks), float(clicks_w), _unnum(clicks_ts),
                                 {int(r[0]): [float(x) for x in r[1:]] for r in open_rows},
                                 [float(x) for x in history], [float(x) for x in recent],
                                 _unnum(recent_ts))
        self._clicks, self._order = {}, deque()
        for iid, key, hour, converted in state["clicks"]:
            self._clicks[iid] = [key, int(hour), bool(converted)]
            self._order.append((int(hour), iid))


def _num(x: float) -> float | None:
    return None if x == -math.inf else x


def _unnum(x: float | None) -> float:
    return -math.inf if x is None else float(x)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        # 6 significant digits: the report rides on every published pCVR record.
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


def _row(name: str, policy_view: dict[str, Any], mon: dict[str, float]) -> dict[str, Any]:
    row: dict[str, Any] = {"advertiser": name, **policy_view,
                           "clicks": mon["clicks"], "clicks_recent": mon["clicks_recent"],
                           "matured_clicks": mon["matured_clicks"],
                           "matured_conversions": mon["matured_conversions"],
                           "observed_cvr": _ratio(mon["recent_conversions"], mon["recent_clicks"]),
                           "history_cvr": _ratio(mon["matured_conversions"],
                                                 mon["matured_clicks"]),
                           "calibration": _ratio(mon["recent_pcvr"], mon["recent_conversions"])}
    return {k: _clean(v) for k, v in row.items()}


def _pooled(name: str, rows: list[tuple[dict[str, Any], dict[str, float]]]) -> dict[str, Any]:
    mon = {k: sum(m[k] for _, m in rows) for k in (
        "clicks", "clicks_recent", "matured_clicks", "matured_conversions", "recent_clicks",
        "recent_pcvr", "recent_conversions")}
    weight = sum(m["clicks_recent"] for _, m in rows)
    waits = [(p.get("wait_s"), m["clicks_recent"]) for p, m in rows]
    wait = (sum(w * c for w, c in waits if w is not None) / weight) if weight > 0 else None
    reports = [p.get("window_reports") for p, _ in rows]
    pview: dict[str, Any] = {"wait_s": wait, "dispersion": None, "dispersion_shrunk": None,
                             "window_reports": sum(r for r in reports if r is not None)
                             if any(r is not None for r in reports) else None}
    return {**_row(name, pview, mon), "advertisers": len(rows)}


def delay_report(policy: DelayPolicy, monitor: CvrMonitor,
                 names: Callable[[Hashable], str] = str,
                 top_n: int = DEFAULT_TOP_N) -> dict[str, Any]:
    """The bounded per-advertiser report (module docstring): top `top_n` by recent clicks,
    the rest pooled as `other`, and a `total` line. Plain JSON, NaN as null."""
    if top_n < 0:
        raise ConfigError("top_n must be >= 0")
    keys = set(monitor.stat_keys()) | set(policy.stat_keys())
    both = [(k, policy.key_view(k), monitor.view(k)) for k in keys]
    # Ties (equal recent clicks) broken by name, so the report is deterministic.
    both.sort(key=lambda x: (-x[2]["clicks_recent"], names(x[0])))
    top, rest = both[:top_n], both[top_n:]
    watermark = max(policy.watermark, monitor.watermark)
    return {
        "policy": policy.name,
        "event_time": _clean(watermark),
        "top_n": top_n,
        "advertisers_tracked": len(both),
        "mature_s": monitor.config.mature_s,
        "pool": {k: _clean(v) for k, v in policy.pool_view().items()},
        "advertisers": [_row(names(k), p, m) for k, p, m in top],
        "other": _pooled(OTHER, [(p, m) for _, p, m in rest]),
        "total": _pooled(TOTAL, [(p, m) for _, p, m in both]),
        "monitor": asdict(monitor.stats),
    }


COLUMNS = (("advertiser", "advertiser", "{}"), ("clicks", "clicks", "{:.0f}"),
           ("wait", "wait_s", "dur"), ("D raw", "dispersion", "{:.2f}"),
           ("D shrunk", "dispersion_shrunk", "{:.2f}"), ("reports", "window_reports", "{:.0f}"),
           ("observed CVR", "observed_cvr", "{:.4f}"), ("history CVR", "history_cvr", "{:.4f}"),
           ("calibration", "calibration", "{:.3f}"))


def render_report(report: dict[str, Any]) -> str:
    """The report as a fixed-width table (the `ctrloop delay-report` default output)."""
    rows = [*report["advertisers"], report["other"], report["total"]]
    cells = [[h for h, _, _ in COLUMNS]]
    for r in rows:
        cells.append([_fmt(r.get(k), f) for _, k, f in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    pool = report["pool"]
    head = (f"delay policy {report['policy']}, event time {report['event_time']}, "
            f"{report['advertisers_tracked']} advertisers (top {report['top_n']} by recent "
            f"clicks shown); clicks mature after {_fmt(report['mature_s'], 'dur')}")
    if pool.get("dispersion") is not None:
        head += f"; pool dispersion {pool['dispersion']:.2f}"
    return "\n".join([head, *lines])


def _fmt(v: Any, f: str) -> str:
    if v is None:
        return "-"
    if f == "dur":
        s = float(v)
        return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else \
            f"{s / 3600:.1f} h"
    return f.format(v)


def report_from_pipeline_state(state: dict[str, Any], top_n: int = DEFAULT_TOP_N,
                               conversion_type: str | None = None) -> dict[str, Any]:
    """The report of a trainer checkpoint's pipeline state (`Pipeline.state()`), without
    building the models: the policy and the monitor are rebuilt from their plain data. With
    several conversion types, `conversion_type`'s (default the first type's)."""
    if "cvr_policy" not in state:
        raise ConfigError("this checkpoint has no pCVR state (written before pCVR existed)")
    types = list(state.get("cvr_types", ()))
    if conversion_type is not None and conversion_type != (types[0] if types else None):
        if conversion_type not in types:
            raise ConfigError(f"this checkpoint has no conversion type {conversion_type!r}; it "
                              f"has {', '.join(types) or 'one task for every type'}")
        policy_state, _, monitor_state, _ = state["cvr_task_state"][types.index(conversion_type)]
        state = {**state, "cvr_policy": policy_state, "cvr_monitor": monitor_state}
    pstate = dict(state["cvr_policy"])
    config = PolicyConfig(**pstate["config"]) if "config" in pstate else None
    policy = build_policy(pstate["name"], config,
                          converted=() if pstate["name"] == "oracle" else None)
    # Feature rows are not needed for a report; placeholders keep restore's shape check.
    pstate["payloads"] = [None] * (len(pstate["pending"]) + len(pstate["done"]))
    policy.restore(pstate)
    monitor = CvrMonitor(MonitorConfig(**state["cvr_monitor"]["config"])
                         if "cvr_monitor" in state else None)
    if "cvr_monitor" in state:
        monitor.restore(state["cvr_monitor"])
    names = {int(k): str(v) for k, v in state.get("advertiser_names", [])}
    return delay_report(policy, monitor, lambda k: names.get(k, str(k)),  # type: ignore
                        top_n)
