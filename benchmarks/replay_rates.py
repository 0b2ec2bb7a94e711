"""Replay speed on a dense and a sparse stream of the same size, side by side in one run.

    python -m benchmarks.replay_rates --impressions 200000 --rounds 3

Simulates the same world (seed) twice: at `--dense-rate` impressions per event-second (300, the
simulator's default) and at `--sparse-rate` (0.5: 200k impressions span 4.6 days), then replays
each file `--rounds` times, alternating dense and sparse so that a busy machine slows both
alike, and reports the median events/s of each, the sparse/dense ratio per event (goal: the
sparse stream within 1.5x of the dense rate), and the served quality after the first 20% of each
stream (ctrloop.core.evaluate). `--set NAME=VALUE` passes learning settings (any
`LearningSettings` field, e.g. `--set publish_interval=60`) to both replays.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ctrloop.core.evaluate import evaluate
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.replay import outputs_for, replay
from ctrloop.trainer.settings import LearningSettings


def _log(msg: str) -> None:
    print(f"[replay_rates {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def simulate(n: int, rate: float, seed: int, workdir: Path) -> tuple[Path, Path]:
    stem = workdir / f"sim-n{n}-rate{rate:g}-seed{seed}"
    events, truth = stem.with_suffix(".events.jsonl"), stem.with_suffix(".truth.jsonl")
    done = stem.with_suffix(".done")  # written last: complete files
    if not done.exists():
        _log(f"simulating {n:,} impressions at {rate:g}/s -> {events}")
        write_files(WorldConfig(seed=seed, impressions_per_second=rate), n, events, truth)
        done.touch()
    return events, truth


def _settings(overrides: Sequence[str], seed: int) -> LearningSettings:
    kv: dict[str, Any] = {"seed": seed}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants NAME=VALUE, got {item!r}")
        kv[name] = value
    return LearningSettings(**kv)


def run_once(name: str, events: Path, truth: Path, settings: LearningSettings,
             workdir: Path) -> dict[str, Any]:
    pred = workdir / f"{name}.pred.jsonl"
    summary = replay(events, outputs_for(pred), None, settings.pipeline_config(),
                     settings.seed)
    served = evaluate(pred, truth, settings.click_window, 0.2)["after_skip"]
    st = summary["pipeline"]
    _log(f"  {name}: {summary['events_per_s']:,.0f} events/s ({summary['seconds']:.1f} s, "
         f"{st['publications']:,} versions), served logloss {served['logloss']:.4f} "
         f"AUC {served['auc']:.4f}")
    return {"events": st["events"], "seconds": summary["seconds"],
            "events_per_s": summary["events_per_s"], "publications": st["publications"],
            "learned": st["learned"], "served_after_20pct": served}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impressions", type=int, default=200_000)
    p.add_argument("--dense-rate", type=float, default=300.0)
    p.add_argument("--sparse-rate", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/ctrloop-bench/replay_rates"))
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    settings = _settings(args.set, args.seed)
    files = {"dense": simulate(args.impressions, args.dense_rate, args.seed, args.workdir),
             "sparse": simulate(args.impressions, args.sparse_rate, args.seed, args.workdir)}
    runs: dict[str, list[dict[str, Any]]] = {"dense": [], "sparse": []}
    for r in range(args.rounds):
        _log(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})")
        for name, (events, truth) in files.items():
            runs[name].append(run_once(name, events, truth, settings, args.workdir))
    med = {k: statistics.median(x["events_per_s"] for x in v) for k, v in runs.items()}
    result = {"impressions": args.impressions, "dense_rate": args.dense_rate,
              "sparse_rate": args.sparse_rate, "settings": args.set, "runs": runs,
              "median_events_per_s": med,
              "dense_over_sparse_per_event": med["dense"] / med["sparse"]}
    print(f"dense  {med['dense']:>10,.0f} events/s (median of {args.rounds})")
    print(f"sparse {med['sparse']:>10,.0f} events/s (median of {args.rounds})")
    print(f"dense / sparse per event: {result['dense_over_sparse_per_event']:.2f}x "
          "(goal <= 1.5x)")
    if args.json_out:
        args.json_out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
