"""The model zoo on simulated worlds (issue 12): served AUC and logloss after warm-up, training
examples/s and parameter count per architecture.

Each architecture replays the same `ctrloop simulate` worlds through the trainer's pipeline
(`ctrloop.trainer.replay.replay`, the code `ctrloop replay` runs) and its *served* predictions
(every impression scored by the last published snapshot, before its label is known) are
evaluated against the simulator's truth over the impressions after the first 20%. Seed 0 is the
tuning world (what defaults and configs were chosen on); seeds 1, 2, 3 are held out and are the
ones reported, as the mean over seeds ± the 95% t-interval, and as the paired difference from
FwFM on the same world (the same clicks), which is the tighter comparison.

Throughput: `OnlineLearner.learn` on 1024-row minibatches of the tuning world's encoded
impressions, one thread, after one warm-up minibatch: examples/s of training alone, the best of
4 passes. Collapse: each run's final pCTR model's Information Abundance (analysis.py), the mean
over fields with at least 2 D trained rows, per table and (several tables) side by side.
Outputs: models.json (every run; models_cost.json with --cost-only), auc_vs_params.svg, the
tables on stdout.

    nice -n 10 python -m benchmarks.models --impressions 120000 --jobs 2 --out runs/models \
        --archs fwfm,gwpfm,dcnv2,hmoe-1,hmoe-2,hmoe-4,fwfm+rank=0.3,hmoe-2+rank=0.3
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctrloop.core.analysis import collapse_report
from ctrloop.core.evaluate import evaluate
from ctrloop.core.events import Impression
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot, encode_snapshot
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.replay import infer_spec, outputs_for, read_events, replay
from ctrloop.trainer.settings import LearningSettings

# name -> (model, model params). hmoe-T: T tables of 16; the experts of the paper's example
# (GwPFM, FlatDNN, IPNN) spread over the tables, so 1 -> 2 -> 4 tables adds tables, not kinds.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "fwfm": ("fwfm", {"dim": 16}),
    "gwpfm": ("gwpfm", {"dim": 8, "parts": 2}),  # 2 parts x 8: 16 floats a feature, as FwFM
    "dcnv2": ("dcnv2", {"dim": 16, "layers": 2}),
    "ipnn": ("ipnn", {"dim": 16}),
    "flatdnn": ("flatdnn", {"dim": 16}),
    "hmoe-1": ("hmoe", {"tables": [16], "experts": [
        {"type": "gwpfm", "table": 0}, {"type": "flatdnn", "table": 0},
        {"type": "ipnn", "table": 0}]}),
    "hmoe-2": ("hmoe", {"tables": [16, 16], "experts": [
        {"type": "gwpfm", "table": 0}, {"type": "flatdnn", "table": 0},
        {"type": "ipnn", "table": 1}]}),
    "hmoe-4": ("hmoe", {"tables": [16, 16, 16, 16], "experts": [
        {"type": "gwpfm", "table": 0}, {"type": "flatdnn", "table": 1},
        {"type": "ipnn", "table": 2}, {"type": "gwpfm", "table": 3}]}),
}
TUNING_SEED = 0
HELD_OUT = (1, 2, 3)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # two-sided 95% t, by dof


def world(out: Path, seed: int, impressions: int) -> tuple[Path, Path]:
    events, truth = out / f"events_{seed}.jsonl", out / f"truth_{seed}.jsonl"
    if not truth.exists():
        write_files(WorldConfig(seed=seed), impressions, events, truth)
    return events, truth


# Learning variants an arch name may carry: `NAME+rank=W` (BCE + W x RankNet),
# `NAME+ada=A` (Adagrad's initial accumulator A), combinable: `fwfm+rank=0.3+ada=1e-5`.
VARIANTS = {"rank": "rank_loss_weight", "ada": "adagrad_initial"}


def learning_of(arch: str) -> dict[str, float]:
    """The LearningSettings overrides of an arch name's `+key=value` variants."""
    out = {}
    for part in arch.split("+")[1:]:
        key, _, value = part.partition("=")
        out[VARIANTS[key]] = float(value)
    return out


def config_of(arch: str) -> tuple[str, dict[str, Any], float]:
    """(model, model params, rank-loss weight) of an arch name (see VARIANTS)."""
    model, params = ARCHS[arch.split("+")[0]]
    return model, params, learning_of(arch).get("rank_loss_weight", 0.0)


def run_job(job: tuple[str, int, str, str, dict[str, Any], float]) -> dict[str, Any]:
    arch, seed, out_s, model, params, rank_weight = job
    out = Path(out_s)
    events, truth = out / f"events_{seed}.jsonl", out / f"truth_{seed}.jsonl"
    settings = LearningSettings(model=model, model_params=json.dumps(params),
                                **{"rank_loss_weight": rank_weight, **learning_of(arch)})
    outputs = outputs_for(out / f"preds_{arch}_{seed}.jsonl")
    ia: dict[str, float] = {}
    summary = replay(events, outputs, None, settings.pipeline_config(), settings.seed,
                     on_finish=lambda pipe: ia.update(mean_ia(pipe.learner.model)))
    ev = evaluate(outputs.predictions, truth, settings.click_window)["after_skip"]
    outputs.predictions.unlink()  # large; the metrics are what is kept
    return {"arch": arch, "seed": seed, "auc": ev["auc"], "logloss": ev["logloss"],
            "calibration": ev["calibration"], "oracle_auc": ev["oracle_auc"],
            "replay_s": summary["seconds"], "events_per_s": summary["events_per_s"],
            "ia": ia}


def mean_ia(model: CTRModel) -> dict[str, float]:
    """Information Abundance of the final pCTR model (ctrloop/core/analysis.py), per table the
    mean over fields, and for several tables, of each field's tables side by side ("all")."""
    by_table: dict[str, list[float]] = {}
    for s in collapse_report(model, all_tables=len(model.embedding_tables()) > 1):
        if s.rows_used >= 2 * s.dim:  # too few trained rows bound IA by the rows, not collapse
            by_table.setdefault(s.table, []).append(s.ia)
    return {t: float(np.mean(v)) for t, v in by_table.items()}


def parameter_count(arch: str, spec: FeatureSpec) -> dict[str, int]:
    model_name, params, _ = config_of(arch)
    model = build_model(model_name, spec, **params)
    embedding = sum(t.weight.numel() for t in model.hash_embeddings())
    dense = sum(p.numel() for p in model.dense_parameters())
    return {"embedding": embedding, "dense": dense, "total": embedding + dense}


def throughput(arch: str, spec: FeatureSpec, rows: np.ndarray, batches: int = 5,
               bs: int = 1024, repeats: int = 4) -> float:
    """Training examples/s: the best of `repeats` passes over `batches` minibatches of `bs`
    rows, after one warm-up minibatch. The best, not the mean: the machine is shared, and
    other processes only ever slow a pass down."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_name, params, rank_weight = config_of(arch)
    learner = OnlineLearner(build_model(model_name, spec, **params),
                            LearnerConfig(model=model_name, batch_size=bs,
                                          rank_weight=rank_weight))
    labels = (np.random.default_rng(0).random(len(rows)) < 0.03).astype(np.float32)
    learner.learn(rows[:bs], labels[:bs])
    n = min(batches * bs, len(rows) - bs)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        learner.learn(rows[bs:bs + n], labels[bs:bs + n])
        best = min(best, time.perf_counter() - start)
    return n / best


def forward_ms(arch: str, spec: FeatureSpec, rows: np.ndarray, candidates: int = 100,
               calls: int = 300) -> dict[str, float]:
    """The model's share of a /v1/score request: one eval forward over `candidates` rows, as a
    served snapshot runs it (built for inference from the snapshot, one thread), p50 and p99 in
    ms over `calls` requests of consecutive rows."""
    torch.set_num_threads(1)
    model_name, params, _ = config_of(arch)
    model = build_from_snapshot(decode_snapshot(encode_snapshot(
        build_model(model_name, spec, **params), 1)), inference=True)
    x = torch.from_numpy(rows)
    times = []
    with torch.inference_mode():
        for k in range(calls):
            start = (k * candidates) % (len(rows) - candidates)
            t0 = time.perf_counter()
            model(x[start:start + candidates])
            times.append((time.perf_counter() - t0) * 1e3)
    p50, p99 = np.percentile(times[10:], [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def encoded_rows(events: Path, spec: FeatureSpec, n: int) -> np.ndarray:
    imps: list[Impression] = []
    for e in read_events(events):
        if isinstance(e, Impression):
            imps.append(e)
            if len(imps) == n:
                break
    return FeatureEncoder(spec).encode_batch(imps)


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    m = float(np.mean(xs))
    if len(xs) < 2:
        return m, math.nan
    return m, T975[len(xs) - 1] * float(np.std(xs, ddof=1)) / math.sqrt(len(xs))


def report(results: list[dict[str, Any]], params: dict[str, dict[str, int]],
           speed: dict[str, float], archs: list[str]) -> str:
    by = {(r["arch"], r["seed"]): r for r in results}
    lines = ["| model | params (embedding + dense) | train ex/s | tuning seed 0 AUC | held-out "
             "AUC (mean ± 95%) | ΔAUC vs fwfm (paired) | held-out logloss | Δlogloss vs fwfm |"
             " calibration |", "|---|---|---|---|---|---|---|---|---|"]
    for a in archs:
        held = [by[(a, s)] for s in HELD_OUT if (a, s) in by]
        base = [by[("fwfm", s)] for s in HELD_OUT if ("fwfm", s) in by and (a, s) in by]
        auc, auc_hw = interval([r["auc"] for r in held])
        ll, ll_hw = interval([r["logloss"] for r in held])
        d_auc = interval([r["auc"] - b["auc"] for r, b in zip(held, base, strict=True)])
        d_ll = interval([r["logloss"] - b["logloss"] for r, b in zip(held, base, strict=True)])
        cal = np.mean([r["calibration"] for r in held])
        tune = by.get((a, TUNING_SEED), {}).get("auc", math.nan)
        p = params[a]
        lines.append(f"| {a} | {p['total']:,} ({p['embedding']:,} + {p['dense']:,}) | "
                     f"{speed.get(a, math.nan):,.0f} | {tune:.4f} | {auc:.4f} ± {auc_hw:.4f} | "
                     f"{d_auc[0]:+.4f} ± {d_auc[1]:.4f} | {ll:.5f} ± {ll_hw:.5f} | "
                     f"{d_ll[0]:+.5f} ± {d_ll[1]:.5f} | {cal:.3f} |")
    return "\n".join(lines)


def svg_auc_vs_params(results: list[dict[str, Any]], params: dict[str, dict[str, int]],
                      archs: list[str]) -> str:
    """Held-out AUC (mean, with its 95% interval) against parameter count, log x axis; by
    hand, as benchmarks/delay_policies.py does (no matplotlib here)."""
    pts = []
    for a in archs:
        aucs = [r["auc"] for r in results if r["arch"] == a and r["seed"] in HELD_OUT]
        if aucs:
            m, hw = interval(aucs)
            pts.append((a, math.log10(params[a]["total"]), m, 0.0 if math.isnan(hw) else hw))
    if not pts:
        return ""
    w, h, pad = 640, 400, 60
    x0, x1 = min(p[1] for p in pts) - 0.1, max(p[1] for p in pts) + 0.1
    y0 = min(p[2] - p[3] for p in pts) - 0.002
    y1 = max(p[2] + p[3] for p in pts) + 0.002

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="20" text-anchor="middle">served AUC (held-out seeds, mean ± '
           '95%) vs parameters</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">parameters (log10)</text>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{sx(xv):.0f}" y="{h - pad + 15}" text-anchor="middle">'
                   f'{xv:.2f}</text>')
        out.append(f'<text x="{pad - 5}" y="{sy(yv):.0f}" text-anchor="end">{yv:.4f}</text>')
    for a, x, m, hw in pts:
        out.append(f'<line x1="{sx(x):.1f}" y1="{sy(m - hw):.1f}" x2="{sx(x):.1f}" '
                   f'y2="{sy(m + hw):.1f}" stroke="gray"/>')
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(m):.1f}" r="4"/>')
        out.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(m) - 6:.1f}">{a}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impressions", type=int, default=120_000)
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated names of ARCHS; "
                    "NAME+rank=W adds the ranking loss with weight W, "
                    "NAME+ada=A Adagrad's initial accumulator A")
    ap.add_argument("--extra", default="", help="more configs to try, JSON "
                    '{"name": ["model", {params}]} (tuning on seed 0)')
    ap.add_argument("--seeds", default="0,1,2,3", help="0 is the tuning world")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/models"))
    ap.add_argument("--cost-only", action="store_true", help="skip the replays: parameter "
                    "counts, training examples/s and forward latency only")
    args = ap.parse_args(argv)
    for name, (model, params) in (json.loads(args.extra) if args.extra else {}).items():
        ARCHS[name] = (model, params)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a.split("+")[0] not in ARCHS
               or any(v.partition("=")[0] not in VARIANTS for v in a.split("+")[1:])]
    if unknown or "fwfm" not in archs:
        ap.error(f"--archs: choose from {sorted(ARCHS)}, fwfm included (the baseline)")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        world(args.out, s, args.impressions)
    start = time.perf_counter()
    jobs = [(a, s, str(args.out), *config_of(a)) for s in seeds for a in archs]
    results: list[dict[str, Any]] = []
    if not args.cost_only:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(run_job, jobs, chunksize=1)
    events = args.out / f"events_{seeds[0]}.jsonl"
    spec = infer_spec(events)
    rows = encoded_rows(events, spec, 6 * 1024)
    speed = {a: throughput(a, spec, rows) for a in archs}
    latency = {a: forward_ms(a, spec, rows) for a in archs}
    params = {a: parameter_count(a, spec) for a in archs}
    table = report(results, params, speed, archs) if results else ""
    table += "\n\n| model | params | train ex/s | forward of 100 candidates p50 / p99 ms |\n"
    table += "|---|---|---|---|\n" + "\n".join(
        f"| {a} | {params[a]['total']:,} | {speed[a]:,.0f} | {latency[a]['p50']:.2f} / "
        f"{latency[a]['p99']:.2f} |" for a in archs)
    out = {"impressions": args.impressions, "seeds": seeds,
           "archs": {a: config_of(a) for a in archs},
           "results": results, "params": params, "train_examples_per_s": speed,
           "forward_100_ms": latency,
           "seconds": time.perf_counter() - start, "table": table}
    result = args.out / ("models_cost.json" if args.cost_only else "models.json")
    result.write_text(json.dumps(out, indent=2))
    if results:
        (args.out / "auc_vs_params.svg").write_text(svg_auc_vs_params(results, params, archs))
    print(table)
    print(f"\n{time.perf_counter() - start:.0f} s; {result}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
