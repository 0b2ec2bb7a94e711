"""Quality over the scenario suite (issue 11): every delay policy and the pCTR model, replayed on
S scenarios x several seeds, scored against the truth per segment, with intervals across seeds.

For each (scenario, seed) the world (ctrloop/sim/scenarios.py) is simulated once, and every
delay policy is replayed on the same events through the trainer's Pipeline (`trainer.replay`,
as `ctrloop replay` does, with `--publish-interval` event seconds between snapshots). The
served predictions are scored after the first 20% of the stream (by impression time):

- pCVR, on clicked impressions: bias against the true CVR (sum served pCVR / sum true CVR - 1)
  overall, for new ads (< 3 days old at the impression), for bursty and for streaming
  advertisers; the share of advertisers with at least --min-clicks clicks whose own bias is
  within +-10%; AUC against the eventual conversions, and its gap to the `oracle` policy's
  (the prophet: trained on the eventual labels) on the same seed; bias per day (the plot).
- pCTR, on every impression (from the `variance` run; the pCTR head does not read the delay
  policy): served AUC against the click-window labels, its gap to the true rates' AUC, served
  logloss; Vowpal Wabbit's progressive predictions on the same events and labels
  (benchmarks/vw_baseline.py, its best of two settings by logloss) when `vowpalwabbit` imports.

Seeds: TUNING_SEEDS are for tuning (look at them while changing a policy); HELDOUT_SEEDS are
reported, and only they by default (`--seeds tuning` to see the others). Each number is the
mean over seeds with a 95% t-interval (half width). Writes quality.json, one SVG per scenario
(bias per day, per policy, all / bursty / streaming clicks) and prints markdown tables and the
goals of issue 11, met or missed, per scenario.

    nice -n 10 python -m benchmarks.quality --impressions 100000 --jobs 2 --out runs/quality
    python -m benchmarks.quality --quick --out /tmp/q      # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctrloop.core.metrics import auc, logloss
from ctrloop.sim import scenarios
from ctrloop.sim.stream import write_files
from ctrloop.trainer.replay import outputs_for, replay
from ctrloop.trainer.settings import LearningSettings

POLICIES = ("oracle", "variance", "naive", "fnw", "fixed:259200")
TUNING_SEEDS = (0, 1, 2)
HELDOUT_SEEDS = (1001, 1002, 1003)
DEFAULT_SCENARIOS = ("baseline", "heldout_like", "delay_heavy", "backfill", "drift", "random")
PCTR_RUN = "variance"  # the run whose pCTR is scored (every run learns the same pCTR head)
SKIP_FRACTION = 0.2
NEW_AD_S = 3 * 86_400.0
ADV_BAND = 0.10  # "within +-10%"
CLICK_WINDOW = 120.0
VW_SETTINGS = ("-l 0.25", "-q :: -l 0.1 -b 22")  # benchmarks/replay_vs_vw.py's two
COLORS = {"oracle": "#000000", "variance": "#d62728", "naive": "#1f77b4", "fnw": "#2ca02c",
          "fixed:259200": "#ff7f0e"}
# The goals of issue 11 (held-out seeds of every scenario), on the interval's mean.
GOALS = {"bias_new_ads": 0.01, "bias_bursty": 0.03, "bias_streaming": 0.03,
         "share_adv_within_10pct": 0.90, "pcvr_auc_gap_to_oracle": 0.005,
         "pctr_auc_gap": 0.01}
# Two-sided 95% t quantiles by degrees of freedom (no scipy here).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- statistics ------------------------------------------------------------------------------

def t95(df: int) -> float:
    """The two-sided 95% t quantile for `df` degrees of freedom (the next smaller tabled df:
    conservative between entries)."""
    if df < 1:
        return math.nan
    return T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval half width of the finite `values` (NaN width for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    half = t95(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 \
        else math.nan
    return {"mean": float(v.mean()), "ci95": half, "n": int(v.size)}


def _bias(pred: np.ndarray, true: np.ndarray) -> float:
    total = float(true.sum())
    return float(pred.sum()) / total - 1.0 if total > 0 else math.nan


# --- truth and scoring -----------------------------------------------------------------------

@dataclass
class Truth:
    """The truth file as columns in impression order."""

    ids: list[str]
    ts: np.ndarray
    ctr: np.ndarray
    click_label: np.ndarray  # clicked within the click window (what pCTR learns)
    clicked: np.ndarray
    cvr: np.ndarray
    converted: np.ndarray
    age: np.ndarray  # ad age at the impression
    bursty: np.ndarray
    advertiser: np.ndarray  # advertiser index into `advertisers`
    advertisers: list[str]

    @property
    def start(self) -> int:
        """The first scored impression: after the first SKIP_FRACTION of the stream's time."""
        t0, t1 = float(self.ts[0]), float(self.ts[-1])
        return int(np.searchsorted(self.ts, t0 + SKIP_FRACTION * (t1 - t0)))


def load_truth(path: Path) -> Truth:
    ids, rows, advs = [], [], []
    names: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f:
            t = orjson.loads(line)
            ids.append(t["impression_id"])
            c = t["click_ts"]
            rows.append((t["ts"], t["ctr"], c is not None and c - t["ts"] <= CLICK_WINDOW,
                         t["clicked"], t["cvr"], t["converted"], t["ts"] - t["ad_created_ts"],
                         t["reporting"] == "bursty"))
            advs.append(names.setdefault(t["advertiser_id"], len(names)))
    a = np.asarray(rows, np.float64).reshape(-1, 8)
    return Truth(ids, a[:, 0], a[:, 1], a[:, 2], a[:, 3] > 0, a[:, 4], a[:, 5], a[:, 6],
                 a[:, 7] > 0, np.asarray(advs, np.int64), list(names))


def load_predictions(path: Path, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pctr, pcvr) per truth impression, NaN where the file has none."""
    pos = {iid: i for i, iid in enumerate(ids)}
    pctr = np.full(len(ids), np.nan)
    pcvr = np.full(len(ids), np.nan)
    with open(path, "rb") as f:
        for line in f:
            p = orjson.loads(line)
            i = pos.get(p["impression_id"])
            if i is not None:
                pctr[i] = p["pctr"]
                pcvr[i] = p.get("pcvr", math.nan)
    return pctr, pcvr


def score_pcvr(truth: Truth, pcvr: np.ndarray, min_clicks: int) -> dict[str, Any]:
    """pCVR of clicked impressions after the skip, by segment (see the module docstring)."""
    m = truth.clicked & np.isfinite(pcvr)
    m[: truth.start] = False
    p, tr, y = pcvr[m], truth.cvr[m], truth.converted[m]
    new, bursty, adv = truth.age[m] < NEW_AD_S, truth.bursty[m], truth.advertiser[m]
    out: dict[str, Any] = {
        "clicks": int(m.sum()), "conversions": int(y.sum()),
        "auc": auc(y, p) if 0 < y.sum() < y.size else math.nan,
        "true_cvr_auc": auc(y, tr) if 0 < y.sum() < y.size else math.nan,
        "bias": _bias(p, tr), "bias_new_ads": _bias(p[new], tr[new]),
        "bias_bursty": _bias(p[bursty], tr[bursty]),
        "bias_streaming": _bias(p[~bursty], tr[~bursty]),
        "clicks_new_ads": int(new.sum()), "clicks_bursty": int(bursty.sum()),
    }
    per_adv = []
    for a in np.unique(adv).tolist():
        sel = adv == a
        if sel.sum() >= min_clicks:
            per_adv.append({"advertiser": truth.advertisers[a], "clicks": int(sel.sum()),
                            "bursty": bool(bursty[sel][0]), "bias": _bias(p[sel], tr[sel])})
    out["advertisers_scored"] = len(per_adv)
    out["share_adv_within_10pct"] = (float(np.mean([abs(r["bias"]) <= ADV_BAND
                                                    for r in per_adv])) if per_adv else math.nan)
    out["per_advertiser"] = per_adv
    # Bias per day over every clicked impression (the cold start included: the plot shows it).
    every = truth.clicked & np.isfinite(pcvr)
    day = np.floor((truth.ts - truth.ts[0]) / 86_400.0).astype(np.int64)
    out["per_day"] = [
        {"day": int(d),
         **{k: _bias(pcvr[sel & seg], truth.cvr[sel & seg]) for k, seg in (
             ("bias", every), ("bias_bursty", every & truth.bursty),
             ("bias_streaming", every & ~truth.bursty))}}
        for d in np.unique(day).tolist() for sel in [day == d]]
    return out


def score_pctr(truth: Truth, pctr: np.ndarray) -> dict[str, Any]:
    """Served pCTR after the skip against the click-window labels and the true rates."""
    s = slice(truth.start, None)
    y, p, c = truth.click_label[s], pctr[s], truth.ctr[s]
    ok = np.isfinite(p)
    y, p, c = y[ok], p[ok], c[ok]
    a, oracle = auc(y, p), auc(y, c)
    return {"impressions": int(y.size), "auc": a, "true_auc": oracle, "auc_gap": oracle - a,
            "logloss": logloss(y, np.clip(p, 1e-7, 1 - 1e-7)), "true_logloss": logloss(y, c)}


# --- jobs ------------------------------------------------------------------------------------

def simulate_job(job: tuple[str, int, int, str]) -> dict[str, Any]:
    """Simulate one (scenario, seed) into its folder; reuse files of the same size."""
    name, seed, n, folder = job
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    events, truth, summary = d / "events.jsonl", d / "truth.jsonl", d / "simulation.json"
    if summary.exists() and json.loads(summary.read_text()).get("impressions") == n:
        return json.loads(summary.read_text())
    cfg = scenarios.build(name, seed)
    sim = write_files(cfg, n, events, truth)
    # The world's own knobs (a random scenario's differ per seed).
    sim["knobs"] = {k: v for k, v in scenarios.knobs_of(cfg).items() if k != "seed"}
    summary.write_text(json.dumps(sim, default=str))
    return sim


def replay_job(job: tuple[str, int, str, str, float, int]) -> dict[str, Any]:
    """Replay one delay policy on one (scenario, seed) and score it."""
    import torch

    name, seed, policy, folder, publish_interval, min_clicks = job
    torch.set_num_threads(1)
    d = Path(folder)
    safe = "".join(c if c.isalnum() else "_" for c in policy)
    pred = d / f"preds_{safe}.jsonl"
    settings = LearningSettings(delay_policy=policy, publish_interval=publish_interval,
                                click_window=CLICK_WINDOW, seed=0)
    t0 = time.perf_counter()
    outputs = outputs_for(pred)
    summary = replay(d / "events.jsonl", outputs, None, settings.pipeline_config(), 0,
                     truth=d / "truth.jsonl")
    truth = load_truth(d / "truth.jsonl")
    pctr, pcvr = load_predictions(pred, truth.ids)
    out = {"scenario": name, "seed": seed, "policy": policy,
           "seconds": time.perf_counter() - t0, "events_per_s": summary["events_per_s"],
           "pcvr": score_pcvr(truth, pcvr, min_clicks)}
    if policy == PCTR_RUN:
        out["pctr"] = score_pctr(truth, pctr)
    # Scored: ~100 bytes per impression, not worth keeping (nor replay's side files).
    for path in (pred, outputs.rejects, outputs.spec):
        path.unlink(missing_ok=True)
    return out


def vw_job(job: tuple[str, int, str]) -> dict[str, Any]:
    """VW's best setting (by served logloss after the skip) on one (scenario, seed)."""
    from benchmarks.vw_baseline import run_vw

    name, seed, folder = job
    d = Path(folder)
    vw_dir = d / "vw"
    results = run_vw(d / "events.jsonl", CLICK_WINDOW, list(VW_SETTINGS), vw_dir)
    (vw_dir / "events.vw").unlink(missing_ok=True)
    truth = load_truth(d / "truth.jsonl")
    rows = []
    for i, r in enumerate(results):
        preds = np.asarray((vw_dir / f"preds_{i}.txt").read_bytes().split(), np.float64)
        if preds.size != truth.ctr.size:
            raise RuntimeError(f"VW wrote {preds.size} predictions for {truth.ctr.size} "
                               "impressions: they do not line up with the truth")
        rows.append({"setting": r["vw_args"], **score_pctr(truth, preds)})
    best = min(rows, key=lambda r: r["logloss"])
    return {"scenario": name, "seed": seed, "vw": best, "vw_all": rows}


def vw_available() -> bool:
    return importlib.util.find_spec("vowpalwabbit") is not None


# --- aggregation -----------------------------------------------------------------------------

PCVR_KEYS = ("auc", "pcvr_auc_gap_to_oracle", "bias", "bias_new_ads", "bias_bursty",
             "bias_streaming", "share_adv_within_10pct")
PCTR_KEYS = ("auc_gap", "logloss", "vw_auc_gap", "vw_logloss", "logloss_minus_vw")


def aggregate(runs: list[dict[str, Any]], vws: list[dict[str, Any]]
              ) -> dict[str, dict[str, Any]]:
    """scenario -> {"pcvr": policy -> key -> interval, "pctr": key -> interval, "per_day"}."""
    oracle_auc = {(r["scenario"], r["seed"]): r["pcvr"]["auc"] for r in runs
                  if r["policy"] == "oracle"}
    vw = {(v["scenario"], v["seed"]): v["vw"] for v in vws}
    by: dict[str, dict[str, Any]] = defaultdict(lambda: {"pcvr": {}, "pctr": {}, "per_day": {}})
    vals: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    days: dict[tuple[str, str, int, str], list[float]] = defaultdict(list)
    pctr_vals: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in runs:
        s, pol, pc = r["scenario"], r["policy"], r["pcvr"]
        o = oracle_auc.get((s, r["seed"]))
        derived = {"pcvr_auc_gap_to_oracle": (o - pc["auc"]) if o is not None else math.nan}
        for k in PCVR_KEYS:
            vals[(s, pol, k)].append(derived.get(k, pc.get(k, math.nan)))
        for row in pc["per_day"]:
            for k in ("bias", "bias_bursty", "bias_streaming"):
                days[(s, pol, row["day"], k)].append(row[k])
        if "pctr" in r:
            ct = r["pctr"]
            pctr_vals[(s, "auc_gap")].append(ct["auc_gap"])
            pctr_vals[(s, "logloss")].append(ct["logloss"])
            v = vw.get((s, r["seed"]))
            if v is not None:
                pctr_vals[(s, "vw_auc_gap")].append(v["auc_gap"])
                pctr_vals[(s, "vw_logloss")].append(v["logloss"])
                pctr_vals[(s, "logloss_minus_vw")].append(ct["logloss"] - v["logloss"])
    for (s, pol, k), v in vals.items():
        by[s]["pcvr"].setdefault(pol, {})[k] = interval(v)
    for (s, k), v in pctr_vals.items():
        by[s]["pctr"][k] = interval(v)
    for (s, pol, day, k), v in days.items():
        series = by[s]["per_day"].setdefault(pol, {}).setdefault(k, {})
        series[day] = interval(v)["mean"]
    return dict(by)


def _goal(value: float, test: Callable[[float], bool]) -> dict[str, Any]:
    """A goal's value and whether it is met; met None where there is nothing to judge (no
    bursty advertisers in the world, VW not run)."""
    return {"value": value, "met": bool(test(value)) if math.isfinite(value) else None}


# (goal, where: "pcvr" (the policy's) or "pctr", key there, test of the mean)
GOAL_TESTS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("bias_new_ads", "pcvr", "bias_new_ads", lambda m: abs(m) <= GOALS["bias_new_ads"]),
    ("bias_bursty", "pcvr", "bias_bursty", lambda m: abs(m) <= GOALS["bias_bursty"]),
    ("bias_streaming", "pcvr", "bias_streaming", lambda m: abs(m) <= GOALS["bias_streaming"]),
    ("share_adv_within_10pct", "pcvr", "share_adv_within_10pct",
     lambda m: m >= GOALS["share_adv_within_10pct"]),
    ("pcvr_auc_gap_to_oracle", "pcvr", "pcvr_auc_gap_to_oracle",
     lambda m: m <= GOALS["pcvr_auc_gap_to_oracle"]),
    ("pctr_auc_gap", "pctr", "auc_gap", lambda m: m <= GOALS["pctr_auc_gap"]),
    ("pctr_logloss_below_vw", "pctr", "logloss_minus_vw", lambda m: m < 0),
)


def goals(agg: dict[str, dict[str, Any]], policy: str = "variance") -> dict[str, dict[str, Any]]:
    """Per scenario, each goal of issue 11 for `policy` (pCTR: the model): the mean, met?"""
    out: dict[str, dict[str, Any]] = {}
    for s, a in agg.items():
        where = {"pcvr": a["pcvr"].get(policy, {}), "pctr": a["pctr"]}
        out[s] = {name: _goal(where[src].get(key, {}).get("mean", math.nan), test)
                  for name, src, key, test in GOAL_TESTS}
    return out


# --- rendering -------------------------------------------------------------------------------

def _pm(iv: dict[str, Any] | None, fmt: str, pct: bool = False) -> str:
    if not iv or not math.isfinite(iv.get("mean", math.nan)):
        return "—"
    m, h = iv["mean"], iv["ci95"]
    if pct:
        return f"{m:+.1%} ± {h:.1%}" if math.isfinite(h) else f"{m:+.1%}"
    return f"{m:{fmt}} ± {h:{fmt.lstrip('+')}}" if math.isfinite(h) else f"{m:{fmt}}"


def render_pcvr(agg: dict[str, dict[str, Any]]) -> str:
    lines = ["| scenario | policy | pCVR AUC | AUC gap to oracle | bias | new ads | bursty | "
             "streaming | advertisers within ±10% |", "|" + "---|" * 9]
    for s, a in agg.items():
        for pol, k in a["pcvr"].items():
            lines.append(
                f"| {s} | {pol} | {_pm(k.get('auc'), '.4f')} | "
                f"{_pm(k.get('pcvr_auc_gap_to_oracle'), '+.4f')} | "
                f"{_pm(k.get('bias'), '', True)} | {_pm(k.get('bias_new_ads'), '', True)} | "
                f"{_pm(k.get('bias_bursty'), '', True)} | "
                f"{_pm(k.get('bias_streaming'), '', True)} | "
                f"{_pm(k.get('share_adv_within_10pct'), '.2f')} |")
    return "\n".join(lines)


def render_pctr(agg: dict[str, dict[str, Any]]) -> str:
    lines = ["| scenario | pCTR AUC gap to true rates | served logloss | VW AUC gap | "
             "VW logloss | logloss − VW |", "|" + "---|" * 6]
    for s, a in agg.items():
        k = a["pctr"]
        lines.append(f"| {s} | {_pm(k.get('auc_gap'), '.4f')} | {_pm(k.get('logloss'), '.4f')} | "
                     f"{_pm(k.get('vw_auc_gap'), '.4f')} | {_pm(k.get('vw_logloss'), '.4f')} | "
                     f"{_pm(k.get('logloss_minus_vw'), '+.4f')} |")
    return "\n".join(lines)


GOAL_LABELS = (("bias_new_ads", "new ads ±1%", True), ("bias_bursty", "bursty ±3%", True),
               ("bias_streaming", "streaming ±3%", True),
               ("share_adv_within_10pct", "≥90% adv. ±10%", False),
               ("pcvr_auc_gap_to_oracle", "pCVR AUC gap ≤0.005", False),
               ("pctr_auc_gap", "pCTR AUC gap ≤0.01", False),
               ("pctr_logloss_below_vw", "logloss < VW", False))


def render_goals(g: dict[str, dict[str, Any]]) -> str:
    lines = ["| scenario | " + " | ".join(lbl for _, lbl, _ in GOAL_LABELS) + " |",
             "|" + "---|" * (len(GOAL_LABELS) + 1)]
    for s, row in g.items():
        cells = []
        for k, _, pct in GOAL_LABELS:
            v, met = row[k]["value"], row[k]["met"]
            val = "—" if not math.isfinite(v) else (f"{v:+.1%}" if pct else f"{v:.4f}")
            cells.append(f"{val} {'✓' if met else ('—' if met is None else '✗')}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def svg_plot(scenario: str, per_day: dict[str, dict[str, dict[int, float]]]) -> str:
    """Bias per day (mean over seeds) per policy: all / bursty / streaming clicks, side by
    side. Written by hand: no plotting library in the environment."""
    pw, h, pad, top = 330, 320, 45, 40
    w = 3 * pw + 120
    vals = [v for pol in per_day.values() for ser in pol.values() for v in ser.values()
            if math.isfinite(v)]
    lo, hi = max(min([*vals, -0.1]), -1.0), min(max([*vals, 0.1]), 1.0)
    days = max((d for pol in per_day.values() for ser in pol.values() for d in ser), default=1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="11">', f'<rect width="{w}" height="{h}" '
             'fill="white"/>', f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="14">'
             f'{html.escape(scenario)}: pCVR bias vs true CVR per day, mean over seeds '
             '(clipped to ±100%)</text>']

    for i, (key, title) in enumerate((("bias", "all clicks"), ("bias_bursty", "bursty"),
                                      ("bias_streaming", "streaming"))):
        x0 = pad + i * pw

        def x(d: float, x0: float = x0) -> float:
            return x0 + (pw - pad) * d / max(days, 1)

        def y(v: float) -> float:
            v = min(max(v, lo), hi)
            return h - pad - (h - pad - top) * (v - lo) / (hi - lo)

        parts.append(f'<text x="{x0 + (pw - pad) / 2}" y="{top - 6}" '
                     f'text-anchor="middle">{title}</text>')
        for t in np.linspace(lo, hi, 6):
            parts.append(f'<line x1="{x0}" x2="{x0 + pw - pad}" y1="{y(t):.1f}" '
                         f'y2="{y(t):.1f}" stroke="#eee"/>')
            if i == 0:
                parts.append(f'<text x="{x0 - 4}" y="{y(t) + 4:.1f}" text-anchor="end">'
                             f'{t:+.0%}</text>')
        parts.append(f'<line x1="{x0}" x2="{x0 + pw - pad}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                     'stroke="#888"/>')
        step = max(1, days // 4)
        for d in range(0, days + 1, step):
            parts.append(f'<text x="{x(d):.1f}" y="{h - pad + 14}" text-anchor="middle">'
                         f'd{d}</text>')
        for pol, series in per_day.items():
            pts = sorted((d, v) for d, v in series.get(key, {}).items() if math.isfinite(v))
            if pts:
                path = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in pts)
                parts.append(f'<polyline fill="none" stroke="{COLORS.get(pol, "#555")}" '
                             f'stroke-width="1.6" points="{path}"/>')
    for j, pol in enumerate(per_day):
        parts.append(f'<text x="{w - 110}" y="{top + 14 * j}" '
                     f'fill="{COLORS.get(pol, "#555")}">{html.escape(pol)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# --- main ------------------------------------------------------------------------------------

def _pool_map(fn: Any, jobs: list[Any], n: int) -> list[Any]:
    if n <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        return pool.map(fn, jobs, chunksize=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help=f"comma-separated, of: {', '.join(scenarios.names())}")
    ap.add_argument("--seeds", default="heldout",
                    help="heldout (default), tuning, or comma-separated integers")
    ap.add_argument("--n-seeds", type=int, help="use only the first N of the seed set")
    ap.add_argument("--impressions", type=int, default=60_000,
                    help="per (scenario, seed); at the suite's 0.1 imp/s, 60k is ~6.9 days")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--publish-interval", type=float, default=900.0,
                    help="event seconds between snapshots (the suite's rate is 0.1 imp/s)")
    ap.add_argument("--min-clicks", type=int, default=100,
                    help="clicks after the skip an advertiser needs to be scored on its own")
    ap.add_argument("--no-vw", action="store_true", help="skip Vowpal Wabbit")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in seconds: 2 scenarios x 2 held-out seeds, 3 policies, "
                         "4k impressions (numbers mean nothing)")
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    args = ap.parse_args(argv)
    if args.quick:
        args.scenarios, args.n_seeds, args.impressions = "baseline,random", 2, 4000
        args.policies, args.min_clicks, args.publish_interval = "oracle,variance,naive", 20, 3600.0
    return args


def seed_list(spec: str) -> list[int]:
    if spec == "heldout":
        return list(HELDOUT_SEEDS)
    if spec == "tuning":
        return list(TUNING_SEEDS)
    return [int(s) for s in spec.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in names:
        scenarios.describe(s)  # fail early on a bad name
    seeds = seed_list(args.seeds)[: args.n_seeds]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if PCTR_RUN not in policies:
        _log(f"note: no pCTR scores without the {PCTR_RUN!r} run")
    args.out.mkdir(parents=True, exist_ok=True)
    folder = {(s, seed): str(args.out / "data" / f"{s}-seed{seed}")
              for s in names for seed in seeds}
    t0 = time.perf_counter()
    _log(f"simulating {len(folder)} worlds x {args.impressions:,} impressions")
    sims = _pool_map(simulate_job, [(s, seed, args.impressions, f)
                                    for (s, seed), f in folder.items()], args.jobs)
    _log(f"replaying {len(folder) * len(policies)} runs ({args.jobs} jobs)")
    jobs = [(s, seed, p, f, args.publish_interval, args.min_clicks)
            for (s, seed), f in folder.items() for p in policies]
    runs = _pool_map(replay_job, jobs, args.jobs)
    vws: list[dict[str, Any]] = []
    vw_note = None
    if args.no_vw:
        vw_note = "VW skipped (--no-vw)"
    elif not vw_available():
        vw_note = ("VW skipped: the `vowpalwabbit` package is not installed "
                   "(pip install vowpalwabbit, as in pyproject's dev extras)")
    else:
        _log(f"VW on {len(folder)} worlds")
        vws = _pool_map(vw_job, [(s, seed, f) for (s, seed), f in folder.items()], args.jobs)
    if vw_note:
        _log(vw_note)
    agg = aggregate(runs, vws)
    agg = {s: agg[s] for s in names if s in agg}
    goal_rows = goals(agg)
    for s, a in agg.items():
        (args.out / f"quality_{s}.svg").write_text(svg_plot(s, a["per_day"]))
    result = {
        "config": {**vars(args), "out": str(args.out), "seeds": seeds,
                   "seed_set": args.seeds, "policies": policies},
        "scenarios": {s: {"description": scenarios.describe(s),
                          "knobs": {k: v for k, v in scenarios.knobs_of(
                              scenarios.build(s, seeds[0])).items() if k != "seed"}}
                      for s in names},
        "simulations": [{"scenario": s, "seed": seed, **sim}
                        for ((s, seed), _), sim in zip(folder.items(), sims, strict=True)],
        "runs": runs, "vw": vws, "vw_note": vw_note, "aggregate": agg, "goals": goal_rows,
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "quality.json").write_text(json.dumps(result, indent=1, default=str))
    label = "held-out" if args.seeds == "heldout" else args.seeds
    print(f"## pCVR by policy ({label} seeds {seeds}; mean ± 95% t-interval across seeds)\n")
    print(render_pcvr(agg))
    print(f"\n## pCTR ({label} seeds; served, after the first 20%)\n")
    print(render_pctr(agg))
    if vw_note:
        print(f"\n{vw_note}")
    print("\n## Goals of issue 11, variance policy (✓ met / ✗ missed, on the mean)\n")
    print(render_goals(goal_rows))
    _log(f"done in {result['seconds']:.0f} s; {args.out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
