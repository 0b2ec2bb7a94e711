"""Interval coverage of the GP posterior over the pCTR logit, per ad-age cohort (issue 5).

Simulates a stream with a steady arrival of new ads, replays it through the trainer's pipeline
with the replay's prediction writer (so each impression gets the pCTR and the logit std of the
last snapshot published before it: served before learned, i.e. held out), and compares the
central 50% and 90% intervals of sigmoid(f), f ~ N(logit(pctr), pctr_std^2), with the
simulator's true rate.

The true rate: the model sees no position, so what it estimates for features x is the CTR
averaged over the positions it is shown at, sigmoid(l(x)) * mean position bias. The truth
file's `ctr` is sigmoid(l(x)) * bias[position]; the benchmark divides the position out
(`target: marginal`, the default) and also reports against the raw per-position CTR.

It also fits the posterior's variances on a prefix of the stream: per-field prior variances
s_f^2 and the global scale by maximum likelihood of the true logit's residual,
logit(true) - logit(pctr) ~ N(0, scale * sum_f 1 / (1/s_f^2 + evidence_f)), from the per-field
evidence the posterior had when it served each impression. The defaults in
ctrloop/core/posterior.py come from such a fit (docs/exploration.md says which run); the coverage
reported as "served" is what the configured posterior wrote into the predictions file, the
"refit" rows what this run's own prefix fit would give on the evaluation window.

    python -m benchmarks.coverage --hours 48 --rate 8 --seed 1 --out runs/coverage
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from ctrloop.core.evaluate import AGE_COHORTS, interval_coverage
from ctrloop.core.posterior import PosteriorConfig
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.replay import PredictionWriter, infer_spec, read_events


def simulate(args: argparse.Namespace, out: Path) -> tuple[WorldConfig, dict[str, Any]]:
    config = WorldConfig(seed=args.seed, impressions_per_second=args.rate)
    n = int(args.hours * 3600 * args.rate)
    summary = write_files(config, n, out / "events.jsonl", out / "truth.jsonl")
    return config, summary


def run_replay(args: argparse.Namespace, out: Path, posterior: PosteriorConfig
               ) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """The replay's code path (Pipeline + PredictionWriter), also keeping each impression's
    per-field evidence (recovered from the row variances it was served with)."""
    torch.set_num_threads(1)
    events = out / "events.jsonl"
    spec = infer_spec(events)
    cfg = PipelineConfig(publish_interval=args.publish_interval, posterior=posterior)
    ids: list[str] = []
    evidence: list[np.ndarray] = []
    start = time.perf_counter()
    with open(out / "preds.jsonl", "wb") as pf:
        writer = PredictionWriter(pf)
        pipe: Pipeline | None = None

        def served_var(batch: list[str], row_var: np.ndarray, version: str) -> None:
            assert pipe is not None and pipe.learner.posterior is not None
            post = pipe.learner.posterior
            prior_precision = (1.0 / post.prior_var.numpy()).astype(np.float64)
            ids.extend(batch)
            evidence.append((post.scale / row_var.astype(np.float64) - prior_precision)
                            .astype(np.float32))
            writer.pctr_var(batch, row_var, version)

        pipe = Pipeline(spec, cfg, served=writer, seed=args.seed, served_cvr=writer.pcvr,
                        served_var=served_var)
        for event in read_events(events):
            pipe.process(event)
        pipe.finish()
    seconds = time.perf_counter() - start
    summary = {"seconds": seconds, "events_per_s": pipe.stats.events / seconds,
               "pipeline": pipe.stats.__dict__.copy(),
               "metrics": pipe.learner.metrics.report().as_dict(), "fields": spec.names}
    return summary, np.concatenate(evidence), ids


def _column(path: Path, keys: tuple[str, ...], only: bytes | None = None) -> list[tuple]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            if only is None or line.startswith(only):
                d = orjson.loads(line)
                out.append(tuple(d[k] for k in keys))
    return out


def load_rows(out: Path, ids: list[str], world: WorldConfig) -> dict[str, np.ndarray]:
    """Predictions, truth and impressions are all in impression order: read them side by side."""
    preds = _column(out / "preds.jsonl", ("impression_id", "pctr", "pctr_std"))
    truth = _column(out / "truth.jsonl", ("impression_id", "ctr", "ts", "ad_created_ts"))
    pos = _column(out / "events.jsonl", ("impression_id", "position"), b'{"type":"impression"')
    if not ([r[0] for r in preds] == ids == [r[0] for r in truth] == [r[0] for r in pos]):
        raise RuntimeError("predictions, truth and events are not in the same order")
    pctr, std = np.asarray([r[1:] for r in preds], np.float64).T
    ctr, ts, created = np.asarray([r[1:] for r in truth], np.float64).T
    b = np.asarray(world.position_bias, np.float64)[np.asarray([r[1] for r in pos]) - 1]
    return {"pctr": pctr, "std": std, "ctr": ctr, "ts": ts, "age": ts - created,
            "marginal": ctr / b * b.mean()}


def fit(evidence: np.ndarray, resid: np.ndarray, steps: int = 300,
        sample: int = 150_000) -> tuple[np.ndarray, float]:
    """Per-field prior variances and the scale by Gaussian maximum likelihood of `resid`
    (on a seeded subsample: the fit settles long before the full prefix matters)."""
    pick = np.random.default_rng(0).permutation(len(resid))[:sample]
    e = torch.from_numpy(evidence[pick].astype(np.float64)).clamp_(min=0)
    r2 = torch.from_numpy(resid[pick].astype(np.float64)) ** 2
    log_s2 = torch.zeros(e.shape[1], dtype=torch.float64, requires_grad=True)
    log_c = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_s2, log_c], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        var = log_c.exp() * (1.0 / (torch.exp(-log_s2) + e)).sum(1)
        loss = 0.5 * (var.log() + r2 / var).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            log_s2.clamp_(-9.0, 3.0)
    return log_s2.detach().exp().numpy(), float(log_c.detach().exp())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=48.0, help="event time simulated")
    ap.add_argument("--rate", type=float, default=8.0, help="impressions per event second")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--publish-interval", type=float, default=60.0)
    ap.add_argument("--fit-from-h", type=float, default=12.0,
                    help="the prefix the refit uses starts here (hours of event time)")
    ap.add_argument("--eval-from-h", type=float, default=24.0,
                    help="coverage is reported from here to the end (hours)")
    ap.add_argument("--prior-var", type=float, default=None,
                    help="every field's prior variance, replacing the defaults (s_f^2)")
    ap.add_argument("--scale", type=float, default=None)
    ap.add_argument("--half-life-h", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/coverage"))
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = PosteriorConfig()
    posterior = PosteriorConfig(
        prior_var=base.prior_var if args.prior_var is None else args.prior_var,
        field_prior_var=base.field_prior_var if args.prior_var is None else {},
        scale=base.scale if args.scale is None else args.scale,
        half_life_s=base.half_life_s if args.half_life_h is None else args.half_life_h * 3600)
    t0 = time.perf_counter()
    world, sim = simulate(args, out)
    print(f"simulated {sim['impressions']:,} impressions in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    replay, evidence, ids = run_replay(args, out, posterior)
    print(f"replayed in {replay['seconds']:.0f} s ({replay['events_per_s']:,.0f} events/s)",
          file=sys.stderr, flush=True)
    d = load_rows(out, ids, world)
    m = np.log(d["pctr"]) - np.log1p(-d["pctr"])
    t_rel = (d["ts"] - d["ts"].min()) / 3600.0
    fit_mask = (t_rel >= args.fit_from_h) & (t_rel < args.eval_from_h)
    ev_mask = t_rel >= args.eval_from_h
    result: dict[str, Any] = {
        "command": "python -m benchmarks.coverage " + " ".join(argv or sys.argv[1:]),
        "world": {"seed": args.seed, "rate": args.rate, "hours": args.hours},
        "simulation": sim, "replay": replay,
        "posterior": {"prior_var": posterior.prior_var,
                      "field_prior_var": posterior.field_prior_var,
                      "scale": posterior.scale, "half_life_s": posterior.half_life_s},
        "cohorts": [c[0] for c in AGE_COHORTS],
        "eval_impressions": int(ev_mask.sum()),
    }
    for target in ("marginal", "ctr"):
        result[f"served_vs_{target}"] = interval_coverage(
            m[ev_mask], d["std"][ev_mask], d[target][ev_mask], d["age"][ev_mask])
    z = np.log(d["marginal"]) - np.log1p(-d["marginal"])
    s2, c = fit(evidence[fit_mask], (z - m)[fit_mask])
    var = c * (1.0 / (1.0 / s2 + np.clip(evidence, 0, None))).sum(1)
    result["refit"] = {"field_prior_var": dict(zip(replay["fields"], s2.tolist(), strict=True)),
                       "scale": c, "fit_impressions": int(fit_mask.sum())}
    result["refit_vs_marginal"] = interval_coverage(
        m[ev_mask], np.sqrt(var[ev_mask]), d["marginal"][ev_mask], d["age"][ev_mask])
    # How far the mean alone is off (the error the posterior must account for).
    result["abs_logit_error"] = {
        name: float(np.mean(np.abs(z - m)[ev_mask & (d["age"] >= lo) & (d["age"] < hi)]))
        for name, lo, hi in AGE_COHORTS}
    (out / "coverage.json").write_text(json.dumps(result, indent=2))
    print_table(result)
    return 0


def print_table(result: dict[str, Any]) -> None:
    for key in ("served_vs_marginal", "served_vs_ctr", "refit_vs_marginal"):
        print(f"\n{key}")
        print(f"  {'cohort':<7} {'imps':>9} {'cov50':>6} {'cov90':>6} {'width50':>8} "
              f"{'width90':>8} {'logit std':>9}")
        for name in ("all", *result["cohorts"]):
            r = result[key][name]
            if "coverage_90" not in r:
                continue
            print(f"  {name:<7} {r['impressions']:>9,} {r['coverage_50']:>6.3f} "
                  f"{r['coverage_90']:>6.3f} {r['width_50']:>8.4f} {r['width_90']:>8.4f} "
                  f"{r['mean_logit_std']:>9.3f}")
    print("\nrefit:", json.dumps({k: round(v, 4) for k, v in
                                  result["refit"]["field_prior_var"].items()}),
          "scale", round(result["refit"]["scale"], 4))
    print("mean |logit(true) - logit(pctr)|:",
          {k: round(v, 3) for k, v in result["abs_logit_error"].items()})


if __name__ == "__main__":
    sys.exit(main())
