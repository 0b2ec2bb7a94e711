"""Delay policies against the prophet on a simulated month (issue 4).

Simulates a month of traffic with streaming and bursty advertisers, replays every delay policy on
the same events through the trainer's pipeline, and scores the served pCVR of every click against
the truth: AUC, logloss, calibration bias overall / new ads / bursty advertisers, bias per day,
and the delay from click to sample release for stable (streaming) and volatile (bursty)
advertisers. Writes a JSON result and an SVG plot of bias over time per policy, and prints,
for the variance policy, how many streaming and bursty advertisers got which wait (the
statistic against the simulator's labels, every 5 days). A policy may carry PolicyConfig
overrides in braces, e.g. `variance{shrink_reports=3|soft_labels=1}`.

    python -m benchmarks.delay_policies --days 30 --rate 0.3 --advertisers 50 \
        --publish-interval 300 --jobs 2 --out runs/delay_policies

The world's delays and reporting are flags (`--delay-median-min/max`, `--delay-sigma`,
`--burst-gap-min/max`, `--bursty-share`, `--churn`); `--seeds 2,3,4` runs each seed in its own
folder and prints every policy's mean and 95% interval across the seeds (issue 11, the world
of docs/delays.md):

    python -m benchmarks.delay_policies --days 21 --rate 0.25 --advertisers 100 \
        --delay-median-min 600 --delay-median-max 259200 --burst-gap-min 7200 \
        --burst-gap-max 259200 --bursty-share 0.33 --publish-interval 600 --jobs 3 \
        --policies "oracle,variance{wait_rule=dispersion},variance,naive,fnw,fixed:259200" \
        --seeds 2,3,4 --out runs/delays_heldout

Per reporting kind the JSON also has the label flow: samples and label mass by sample kind
(click, late, retract), i.e. how often the late correction fires and what it adds.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrloop.core.delays import CvrSample, PolicyConfig, VariancePolicy
from ctrloop.core.evaluate import evaluate_cvr
from ctrloop.sim import World, WorldConfig, write_files
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.replay import PredictionWriter, infer_spec, load_converted, read_events

POLICIES = ("oracle", "variance", "naive", "fnw", "fixed:3600", "fixed:86400")
COLORS = {"oracle": "#000000", "variance": "#d62728", "naive": "#1f77b4", "fnw": "#2ca02c",
          "fixed:3600": "#9467bd", "fixed:86400": "#ff7f0e"}


def world_config(args: argparse.Namespace, seed: int | None = None) -> WorldConfig:
    return WorldConfig(seed=args.seed if seed is None else seed,
                       impressions_per_second=args.rate, base_ctr=args.ctr,
                       base_cvr=args.cvr, bursty_share=args.bursty_share,
                       n_advertisers=args.advertisers,
                       conversion_delay_median_min_s=args.delay_median_min,
                       conversion_delay_median_max_s=args.delay_median_max,
                       conversion_delay_sigma=args.delay_sigma,
                       burst_gap_min_s=args.burst_gap_min, burst_gap_max_s=args.burst_gap_max,
                       ad_churn_per_hour=args.churn)


def parse_policy(label: str) -> tuple[str, PolicyConfig]:
    """`variance{soft_labels=1|d_hi=6}`: a policy name with PolicyConfig overrides."""
    name, _, rest = label.partition("{")
    overrides: dict[str, Any] = {}
    defaults = PolicyConfig()
    for item in filter(None, rest.rstrip("}").split("|")):
        k, _, v = item.partition("=")
        kind = type(getattr(defaults, k))
        overrides[k] = bool(int(v)) if kind is bool else kind(v)
    return name, PolicyConfig(**overrides)


def run_policy(job: tuple[str, str, str, str, float, int]) -> dict[str, Any]:
    policy, events, truth, out_dir, publish_interval, seed = job
    torch.set_num_threads(1)
    out = Path(out_dir)
    spec = infer_spec(Path(events))
    name, pconfig = parse_policy(policy)
    cfg = PipelineConfig(publish_interval=publish_interval, delay_policy=name, policy=pconfig)
    converted = load_converted(Path(truth)) if name == "oracle" else None
    safe = "".join(c if c.isalnum() else "_" for c in policy)
    preds_path = out / f"preds_{safe}.jsonl"
    delays: list[tuple[int, float]] = []
    # (key, kind) -> [samples, sum of label * weight]: where the label mass comes from.
    flow: dict[tuple[Any, str], list[float]] = {}

    def record(samples: list[CvrSample]) -> None:
        delays.extend((s.key, s.release_ts - s.click_ts) for s in samples if s.kind == "click")
        for s in samples:
            cell = flow.setdefault((s.key, s.kind), [0.0, 0.0])
            cell[0] += 1.0
            cell[1] += s.label * s.weight

    start = time.perf_counter()
    with open(preds_path, "wb") as pf:
        writer = PredictionWriter(pf)
        pipe = Pipeline(spec, cfg, served=writer, seed=seed, served_cvr=writer.pcvr,
                        converted=converted)
        pipe.on_cvr_samples = record
        snapshots: list[dict[str, Any]] = []
        next_snap = -math.inf
        for event in read_events(Path(events)):
            pipe.process(event)
            # The statistic every 5 days of event time: the end of the stream is a tail of
            # late conversions with no traffic, not a state worth judging.
            if isinstance(pipe.cvr_policy, VariancePolicy) and event.ts >= next_snap:
                if next_snap > -math.inf:
                    snapshots.append({"ts": event.ts, "advertisers": pipe.cvr_policy.key_report(
                        lambda k: pipe.advertiser_names.get(k, str(k)))})  # type: ignore
                    next_snap += 5 * 86_400.0
                else:
                    next_snap = event.ts + 5 * 86_400.0
        pipe.finish()
    seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "policy": policy,
        "seconds": seconds,
        "events_per_s": pipe.stats.events / seconds,
        "pipeline": pipe.stats.__dict__.copy(),
        "policy_report": pipe.cvr_policy.report(),
        "evaluation": evaluate_cvr(preds_path, Path(truth)),
        "release_delays": [[pipe.advertiser_names.get(k, str(k)), d] for k, d in delays],
        "label_flow": [[pipe.advertiser_names.get(k, str(k)), kind, n, mass]
                       for (k, kind), (n, mass) in flow.items()],
    }
    if snapshots:
        result["statistic_snapshots"] = snapshots
    result["delay_report"] = pipe.delay_report(top_n=10)
    print(f"  {policy:<12} {seconds:7.1f} s  ({result['events_per_s']:,.0f} events/s)",
          file=sys.stderr, flush=True)
    return result


def release_delay_summary(result: dict[str, Any], bursty: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rows = result.pop("release_delays")
    for name, volatile in (("stable", False), ("volatile", True)):
        d = np.asarray([x for a, x in rows if (a in bursty) == volatile], np.float64)
        out[name] = {"clicks": int(d.size),
                     "median_s": float(np.median(d)) if d.size else math.nan,
                     "p90_s": float(np.quantile(d, 0.9)) if d.size else math.nan}
    return out


def label_flow_summary(result: dict[str, Any], bursty: set[str]) -> dict[str, Any]:
    """Per reporting kind: samples and label mass (sum of label x weight) by sample kind, so
    how often the late correction fires and what it adds to the label sum can be read off."""
    out: dict[str, Any] = {}
    rows = result.pop("label_flow")
    for name, volatile in (("streaming", False), ("bursty", True)):
        kinds: dict[str, list[float]] = {}
        for adv, kind, n, mass in rows:
            if (adv in bursty) == volatile:
                cell = kinds.setdefault(kind, [0.0, 0.0])
                cell[0] += n
                cell[1] += mass
        clicks = kinds.get("click", [0.0, 0.0])
        late = kinds.get("late", [0.0, 0.0])
        out[name] = {"by_kind": {k: {"samples": int(v[0]), "label_mass": v[1]}
                                 for k, v in sorted(kinds.items())},
                     "clicks": int(clicks[0]),
                     "late_share_of_positives": late[0] / (late[0] + clicks[1])
                     if late[0] + clicks[1] > 0 else math.nan,
                     "net_label_mass": sum(v[1] for v in kinds.values())}
    return out


def dispersion_check(rows: list[dict[str, Any]], bursty: set[str]) -> dict[str, Any]:
    """How well the variance statistic tells bursty from streaming advertisers (the measurement
    behind the mapping's d_lo/d_hi)."""
    out: dict[str, Any] = {}
    for name, volatile in (("streaming", False), ("bursty", True)):
        sel = [r for r in rows if (r["advertiser"] in bursty) == volatile]
        raw = np.asarray([r["dispersion"] for r in sel if r["window_reports"] >= 20], np.float64)
        waits = np.asarray([r["wait_s"] for r in sel], np.float64)
        out[name] = {
            "advertisers": len(sel),
            "with_20_reports_in_window": int(raw.size),
            "median_dispersion_of_those": float(np.median(raw)) if raw.size else math.nan,
            "median_wait_s": float(np.median(waits)) if waits.size else math.nan,
            "share_at_floor": float(np.mean(waits <= 300.0 + 1e-6)) if waits.size else math.nan,
            "share_at_ceiling": float(np.mean(waits >= 3 * 86400.0 - 1)) if waits.size
            else math.nan,
            # The confusion table: how many of this kind got which window.
            "at_floor": int(np.sum(waits <= 300.0 + 1e-6)),
            "between": int(np.sum((waits > 300.0 + 1e-6) & (waits < 3600.0 * 6))),
            "long_6h_plus": int(np.sum(waits >= 3600.0 * 6)),
        }
    return out


def render_confusion(checks: list[dict[str, Any]]) -> str:
    """Advertisers by reporting kind and window, summed over the 5-day snapshots."""
    lines = ["| reporting | advertiser-snapshots | wait 5 min (floor) | 5 min – 6 h | ≥ 6 h |",
             "|---|---|---|---|---|"]
    for kind in ("streaming", "bursty"):
        n = sum(c[kind]["advertisers"] for c in checks)
        f = sum(c[kind]["at_floor"] for c in checks)
        b = sum(c[kind]["between"] for c in checks)
        long_ = sum(c[kind]["long_6h_plus"] for c in checks)
        lines.append(f"| {kind} | {n} | {f} | {b} | {long_} |")
    return "\n".join(lines)


def svg_plot(results: list[dict[str, Any]], key: str, title: str) -> str:
    """Bias per day, one line per policy, written by hand (no matplotlib here)."""
    w, h, pad = 760, 380, 60
    series = {r["policy"]: [(p["period"], p.get(key)) for p in r["evaluation"]["per_period"]]
              for r in results}
    vals = [v for s in series.values() for _, v in s if v is not None and math.isfinite(v)]
    days = max((d for s in series.values() for d, _ in s), default=1)
    lo, hi = max(min([*vals, -0.1]), -1.0), min(max([*vals, 0.1]), 1.0)

    def x(d: float) -> float:
        return pad + (w - 2 * pad) * d / max(days, 1)

    def y(v: float) -> float:
        v = min(max(v, lo), hi)
        return h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">'
             f'{html.escape(title)} (clipped to ±100%)</text>']
    for t in np.linspace(lo, hi, 7):
        parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                     f'stroke="#ddd"/><text x="{pad - 5}" y="{y(t) + 4:.1f}" '
                     f'text-anchor="end">{t:+.0%}</text>')
    parts.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
                 f'stroke="#888"/>')
    for d in range(0, days + 1, 5):
        parts.append(f'<text x="{x(d):.1f}" y="{h - pad + 16}" text-anchor="middle">'
                     f'day {d}</text>')
    for i, (name, pts) in enumerate(series.items()):
        good = [(d, v) for d, v in pts if v is not None and math.isfinite(v)]
        path = " ".join(f"{x(d):.1f},{y(v):.1f}" for d, v in good)
        color = COLORS.get(name, "#555")
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                     f'points="{path}"/>')
        parts.append(f'<text x="{w - pad + 4}" y="{pad + 14 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=0.5, help="impressions per event second")
    ap.add_argument("--ctr", type=float, default=0.1, help="base CTR (more clicks per month)")
    ap.add_argument("--cvr", type=float, default=0.15, help="base CVR of clicks")
    ap.add_argument("--bursty-share", type=float, default=0.3)
    ap.add_argument("--advertisers", type=int, default=200,
                    help="advertisers in the world (fewer: more reports per advertiser)")
    defaults = WorldConfig()
    ap.add_argument("--delay-median-min", type=float,
                    default=defaults.conversion_delay_median_min_s,
                    help="per-advertiser median conversion delay: log-uniform in [min, max] s")
    ap.add_argument("--delay-median-max", type=float,
                    default=defaults.conversion_delay_median_max_s)
    ap.add_argument("--delay-sigma", type=float, default=defaults.conversion_delay_sigma)
    ap.add_argument("--burst-gap-min", type=float, default=defaults.burst_gap_min_s,
                    help="bursty advertisers: gaps between uploads uniform in [min, max] s")
    ap.add_argument("--burst-gap-max", type=float, default=defaults.burst_gap_max_s)
    ap.add_argument("--churn", type=float, default=defaults.ad_churn_per_hour,
                    help="share of the ad pool replaced per event hour")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="comma-separated world seeds (overrides --seed): one run per seed "
                         "and a table of means with 95%% intervals across seeds")
    ap.add_argument("--publish-interval", type=float, default=60.0,
                    help="event seconds between snapshots (1 s is needlessly slow at low rates)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/delay_policies"))
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    tables = []
    for seed in seeds:
        out = args.out / f"seed{seed}" if args.seeds else args.out
        tables.append(run_seed(args, seed, out))
    if args.seeds:
        agg = aggregate(tables)
        (args.out / "across_seeds.json").write_text(json.dumps(
            {"config": {**vars(args), "out": str(args.out)}, "seeds": seeds, "rows": agg},
            indent=1, default=str))
        print(f"\nacross seeds {seeds} (mean [95% interval], t over seeds)")
        print(render_aggregate(agg))
    return 0


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> list[dict[str, Any]]:
    """Simulate one world, replay every policy on it, write the JSON and plots; the table."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = world_config(args, seed)
    events, truth = out / "events.jsonl", out / "truth.jsonl"
    n = int(args.days * 86400 * args.rate)
    t0 = time.perf_counter()
    sim = write_files(cfg, n, events, truth)
    print(f"seed {seed}: simulated {n:,} impressions, {sim['clicks']:,} clicks, "
          f"{sim['conversions']:,} conversions in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    world = World(cfg)
    bursty = {adv.id for adv, p in zip(world.advertisers, world.conversion_profiles, strict=True)
              if p.reporting == "bursty"}
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    jobs = [(p, str(events), str(truth), str(out), args.publish_interval, seed)
            for p in policies]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_policy, jobs, chunksize=1)
    for r in results:
        r["release_delay"] = release_delay_summary(r, bursty)
        r["label_flow"] = label_flow_summary(r, bursty)
        if "statistic_snapshots" in r:
            r["dispersion_check"] = [
                {"ts": snap["ts"], **dispersion_check(snap["advertisers"], bursty)}
                for snap in r["statistic_snapshots"]]
    summary = {"config": {**vars(args), "out": str(out), "seed": seed}, "world": cfg.__dict__,
               "simulation": sim, "results": results, "table": table(results)}
    (out / "delay_policies.json").write_text(json.dumps(summary, indent=1, default=str))
    for key, title in (("bias", "pCVR bias per day (sum pred / sum conversions - 1), all clicks"),
                       ("bias_new_ads", "pCVR bias per day, new ads (< 3 days old)"),
                       ("bias_bursty", "pCVR bias per day, bursty advertisers")):
        (out / f"bias_{key}.svg").write_text(svg_plot(results, key, title))
    print(render(summary["table"]))
    for r in results:
        if "dispersion_check" in r:
            print(f"\n{r['policy']}: advertisers by reporting kind and window (5-day "
                  f"snapshots)\n{render_confusion(r['dispersion_check'])}")
    return summary["table"]


# Two-sided 95% quantiles of Student's t by degrees of freedom (no scipy here).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228}
AGG_COLUMNS = ("auc_vs_oracle", "bias_vs_true_new_ads", "bias_vs_true_bursty",
               "bias_vs_true_streaming", "bias_new_ads", "bias_bursty", "bias_streaming", "auc")


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval across seeds (the interval is the mean with one seed)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, m, m
    half = T975.get(v.size - 1, 1.96) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


def aggregate(tables: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per policy: each column's mean and 95% interval across the seeds' tables."""
    policies = [r["policy"] for r in tables[0]]
    rows = []
    for p in policies:
        per_seed = [next(r for r in t if r["policy"] == p) for t in tables]
        rows.append({"policy": p, "seeds": len(per_seed),
                     **{c: mean_interval([r[c] for r in per_seed]) for c in AGG_COLUMNS}})
    return rows


def render_aggregate(rows: list[dict[str, Any]]) -> str:
    head = ("| policy | ΔAUC vs oracle | bias new ads | bias bursty | bias streaming | "
            "vs true CVR: new ads | bursty | streaming |")
    lines = [head, "|" + "---|" * 8]

    def pct(c: tuple[float, float, float]) -> str:
        return f"{c[0]:+.1%} [{c[1]:+.1%}, {c[2]:+.1%}]"

    for r in rows:
        d = r["auc_vs_oracle"]
        lines.append(f"| {r['policy']} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] | "
                     f"{pct(r['bias_new_ads'])} | {pct(r['bias_bursty'])} | "
                     f"{pct(r['bias_streaming'])} | {pct(r['bias_vs_true_new_ads'])} | "
                     f"{pct(r['bias_vs_true_bursty'])} | {pct(r['bias_vs_true_streaming'])} |")
    return "\n".join(lines)


def table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    oracle = next((r for r in results if r["policy"] == "oracle"), None)
    for r in results:
        ev = r["evaluation"]
        rows.append({
            "policy": r["policy"],
            "auc": ev["after_skip"]["auc"],
            "auc_vs_oracle": (ev["after_skip"]["auc"]
                              - oracle["evaluation"]["after_skip"]["auc"]) if oracle else None,
            "logloss": ev["after_skip"]["logloss"],
            "bias": ev["after_skip"]["bias"],
            "bias_new_ads": ev["new_ads"]["bias"],
            "bias_bursty": ev["bursty"]["bias"],
            "bias_streaming": ev["streaming"]["bias"],
            "bias_vs_true_cvr_new_ads": ev["new_ads"]["bias_vs_true_cvr"],
            "bias_vs_true_new_ads": ev["new_ads"]["bias_vs_true_cvr"],
            "bias_vs_true_bursty": ev["bursty"]["bias_vs_true_cvr"],
            "bias_vs_true_streaming": ev["streaming"]["bias_vs_true_cvr"],
            "median_release_stable_s": r["release_delay"]["stable"]["median_s"],
            "median_release_volatile_s": r["release_delay"]["volatile"]["median_s"],
            "events_per_s": r["events_per_s"],
        })
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    head = ("| policy | AUC | ΔAUC vs oracle | logloss | bias | bias new ads | bias bursty | "
            "bias streaming | median release stable | median release volatile |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        d = r["auc_vs_oracle"]
        lines.append(
            f"| {r['policy']} | {r['auc']:.4f} | {'—' if d is None else f'{d:+.4f}'} | "
            f"{r['logloss']:.4f} | {r['bias']:+.1%} | {r['bias_new_ads']:+.1%} | "
            f"{r['bias_bursty']:+.1%} | {r['bias_streaming']:+.1%} | "
            f"{_dur(r['median_release_stable_s'])} | {_dur(r['median_release_volatile_s'])} |")
    return "\n".join(lines)


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "—"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


if __name__ == "__main__":
    sys.exit(main())
