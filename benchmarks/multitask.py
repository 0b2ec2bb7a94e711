"""Several conversion types: one multi-task pCVR model against one model per type (issue 4).

Simulates the "funnel" world (signups: ~10% of clicks, minutes, reported live; purchases: ~2%
of clicks, hours to days, uploaded in bursts by bursty advertisers; the two rates correlated),
replays it through the trainer's pipeline with each pCVR variant and each delay policy, and
scores the served pCVR of every click, per type, against the truth:

- `separate`: one FwFM per type, each learning only its type's conversions (today's model,
  run once per type on the stream without the other type's conversions);
- `shared`: one model, shared embeddings, per-type linear weights, field-pair weights and bias
  (STEM with task_dim 0);
- `stem`: shared plus task-specific embeddings, all forward / task-specific backward
  (ctrloop/core/models/stem.py).

    python -m benchmarks.multitask --days 30 --rate 0.3 --advertisers 50 \
        --publish-interval 300 --jobs 2 --out runs/multitask
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ctrloop.core.evaluate import evaluate_cvr
from ctrloop.core.events import Conversion, Event
from ctrloop.core.learner import LearnerConfig
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.replay import PredictionWriter, infer_spec, load_converted_by_type, read_events

TYPES = ("signup", "purchase")
VARIANTS = ("separate", "shared", "stem")


def only_type(events: Path, keep: str) -> Iterator[Event]:
    for e in read_events(events):
        if type(e) is Conversion and e.conversion_type != keep:
            continue
        yield e


def _pipeline_run(events: Iterator[Event], preds: Path, cfg: PipelineConfig, spec: Any,
                  seed: int, converted: Any, types: tuple[str, ...]) -> Pipeline:
    with open(preds, "wb") as pf:
        writer = PredictionWriter(pf, types)
        pipe = Pipeline(spec, cfg, served=writer, seed=seed, served_cvr=writer.pcvr,
                        converted=converted)
        for event in events:
            pipe.process(event)
        pipe.finish()
    return pipe


def run_job(job: tuple[str, str, str, str, str, float, int, int]) -> dict[str, Any]:
    variant, policy, events_s, truth_s, out_s, publish_interval, seed, task_dim = job
    torch.set_num_threads(1)
    events, truth, out = Path(events_s), Path(truth_s), Path(out_s)
    spec = infer_spec(events)
    start = time.perf_counter()
    evaluation: dict[str, Any] = {}
    if variant == "separate":
        for t in TYPES:
            truth_t = load_converted_by_type(truth)[t] if policy == "oracle" else None
            cfg = PipelineConfig(publish_interval=publish_interval, delay_policy=policy)
            preds = out / f"preds_{variant}_{policy.replace(':', '_')}_{t}.jsonl"
            _pipeline_run(only_type(events, t), preds, cfg, spec, seed, truth_t, ())
            evaluation[t] = evaluate_cvr(preds, truth, conversion_type=t)
    else:
        converted = load_converted_by_type(truth) if policy == "oracle" else None
        hp = {"dim": 16, "task_dim": 0 if variant == "shared" else task_dim}
        cfg = PipelineConfig(publish_interval=publish_interval, delay_policy=policy,
                             conversion_types=TYPES,
                             cvr_learner=LearnerConfig(model="stem", hparams=hp))
        preds = out / f"preds_{variant}_{policy.replace(':', '_')}.jsonl"
        _pipeline_run(read_events(events), preds, cfg, spec, seed, converted, TYPES)
        for t in TYPES:
            evaluation[t] = evaluate_cvr(preds, truth, conversion_type=t)
    seconds = time.perf_counter() - start
    print(f"  {variant:<9} {policy:<9} {seconds:7.1f} s", file=sys.stderr, flush=True)
    for ev in evaluation.values():
        ev.pop("per_period", None)
    return {"variant": variant, "policy": policy, "seconds": seconds, "evaluation": evaluation}


def _f(x: Any, fmt: str = "{:.4f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| policy | variant | type | clicks | conv. | AUC | logloss | bias | bias new ads "
             "| bias bursty | oracle AUC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for t in TYPES:
            e = r["evaluation"][t]["after_skip"]
            new = r["evaluation"][t]["new_ads"]
            bursty = r["evaluation"][t]["bursty"]
            lines.append(
                f"| {r['policy']} | {r['variant']} | {t} | {e['clicks']:,} | "
                f"{e['conversions']:,} | {_f(e['auc'])} | {_f(e['logloss'])} | "
                f"{_f(e['bias'], '{:+.1%}')} | {_f(new['bias'], '{:+.1%}')} | "
                f"{_f(bursty['bias'], '{:+.1%}')} | {_f(e['oracle_auc'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=0.3, help="impressions per event second")
    p.add_argument("--advertisers", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=["oracle", "variance"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--task-dim", type=int, default=4, help="stem's task-specific embedding size")
    p.add_argument("--publish-interval", type=float, default=300.0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/multitask"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    events, truth = args.out / "events.jsonl", args.out / "truth.jsonl"
    world = WorldConfig(seed=args.seed, impressions_per_second=args.rate,
                        n_advertisers=args.advertisers, conversion_mix="funnel")
    n = int(args.days * 86_400 * args.rate)
    t0 = time.perf_counter()
    summary = write_files(world, n, events, truth)
    print(f"simulated {n:,} impressions, {summary['clicks']:,} clicks in "
          f"{time.perf_counter() - t0:.0f} s: "
          f"{json.dumps(summary.get('conversion_types', {}))}", file=sys.stderr)
    jobs = [(v, pol, str(events), str(truth), str(args.out), args.publish_interval, args.seed,
             args.task_dim) for pol in args.policies for v in args.variants]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = pool.map(run_job, jobs)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "simulation": summary,
           "results": results}
    (args.out / "multitask.json").write_text(json.dumps(out, indent=1, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
