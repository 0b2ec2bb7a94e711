"""What Thompson sampling adds to one /v1/score request, in-process (no HTTP, no wrk).

Times the service's own request path — `ctrloop.service.routes.scoring.read_request`
(validation) and `score` (encode, model, posterior variances, ranking, propensities, logged
impressions, response bytes) — on one simulated 100-candidate request, alternating explore
off / on request by request, so a busy machine slows both alike and their ratio stays
meaningful. Then sweeps the number of posterior draws: time per explored request, and how far
its propensities are from a 200,000-draw reference (the accuracy the draws buy).

    python -m benchmarks.explore_overhead --requests 3000 --out runs/bench/explore_overhead.json

The model is an FwFM (dim 16) over the simulator's spec with a posterior that learned from
simulated impressions, so variances range from narrow (popular rows) to the prior (new ads).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from benchmarks.serving import score_body, sim_spec, with_posterior
from ctrloop.core.exploration import JointPosterior, generator, rank_propensities, thompson_rank
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.routes.scoring import read_request, score
from ctrloop.service.settings import ServiceSettings


class NullSink:
    def log(self, records: list[Any]) -> bool:
        return True

    def produce(self, records: Any) -> None:
        pass

    def queued(self) -> int:
        return 0

    def close(self, timeout: float = 2.0) -> None:
        pass


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e6, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="per mode")
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--top-k", type=int, default=3, help="ads shown and logged per request")
    ap.add_argument("--impressions", type=int, default=20_000,
                    help="simulated impressions the posterior learns from")
    ap.add_argument("--draws", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024],
                    help="draw counts of the sampler sweep (cost and propensity error)")
    ap.add_argument("--handler-draws", type=int, nargs="+", default=[1, 64, 128, 256],
                    help="draw counts of the in-handler comparison with explore off")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/explore_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the service does: one core per worker
    spec = sim_spec()
    torch.manual_seed(0)
    model = with_posterior(build_model("fwfm", spec, dim=16), args.impressions)
    registry = InMemoryRegistry()
    registry.publish(1, encode_snapshot(model, 1, {}), {})
    settings = ServiceSettings(reload_poll_s=3600, explore_cost_cap=1.0)
    app = create_app(settings, registry=registry, sink=NullSink())  # type: ignore[arg-type]
    state = app.state.service
    state.reloader.check()
    by_status = {s: state.metrics.scores_by_model.labels(s) for s in ("prior", "trained",
                                                                       "pinned")}
    base = score_body(args.candidates, True, args.top_k)
    body_off = orjson.dumps({**base, "options": {**base["options"], "explore": False}})
    body_on = orjson.dumps({**base, "options": {**base["options"], "explore": True}})
    # mode -> (body, settings): off, and on with each draw count (1: the ranking's draw only,
    # no propensity draws: the fixed cost of exploring).
    modes = {"off": (body_off, settings)}
    for n in args.handler_draws:
        modes[f"on_{n}"] = (body_on, settings.model_copy(update={"explore_draws": n}))

    def one(body: bytes, mode_settings: ServiceSettings) -> tuple[float, float]:
        state.settings = mode_settings
        t0, c0 = time.perf_counter(), time.thread_time()
        req = read_request(body)
        assert isinstance(req, dict), req
        r = score(state, req, "impressions", by_status)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        assert r.status_code == 200, r.body
        return wall, cpu

    for body, mode_settings in modes.values():  # warm caches
        for _ in range(50):
            one(body, mode_settings)
    # Wall time includes waiting for a core that other processes hold; this thread's CPU
    # time does not, so its ratio holds on a busy machine.
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.requests):
        for mode, (body, mode_settings) in modes.items():
            w, c = one(body, mode_settings)
            times[mode].append(w)
            cpu[mode].append(c)
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "candidates": args.candidates,
                               "top_k": args.top_k, "requests_per_mode": args.requests,
                               "handler_us": {}, "handler_cpu_us": {}}
    for key, source in (("handler_us", times), ("handler_cpu_us", cpu)):
        off = summary[key]["off"] = {"p50": pct(source["off"], 50),
                                     "p99": pct(source["off"], 99),
                                     "mean": float(np.mean(source["off"]) * 1e6)}
        print(f"{key} ({args.candidates} candidates, top_k {args.top_k} logged):")
        for mode, ts in source.items():
            row = summary[key][mode] = {"p50": pct(ts, 50), "p99": pct(ts, 99),
                                        "mean": float(np.mean(ts) * 1e6)}
            row["over_off"] = {q: round(row[q] / off[q], 3) for q in ("p50", "p99", "mean")}
            print(f"  {mode:<8} p50 {row['p50']:7.0f} us  p99 {row['p99']:7.0f} us  "
                  f"mean {row['mean']:7.0f} us  /off: {row['over_off']}")

    # The sampler alone, per draw count: cost and propensity error against a reference.
    served = state.holder.served
    cands = [(c["ad_id"], c["advertiser_id"], c["features"]) for c in base["candidates"]]
    pred = served.predict_full(base["features"], base["user_id"], cands, with_variance=True)
    post = JointPosterior.from_rows(pred.logit, pred.rows, pred.row_var)
    weights = np.array([c["bid"] for c in base["candidates"]])
    ref = rank_propensities(post, weights=weights, ranks=args.top_k, draws=200_000,
                            rng=generator(0))
    sweep = []
    for n in args.draws:
        ts, errs = [], []
        for s in range(300):
            t0 = time.thread_time()
            tr = thompson_rank(JointPosterior.from_rows(pred.logit, pred.rows, pred.row_var),
                               weights=weights, propensity_ranks=args.top_k, draws=n,
                               rng=generator(s))
            ts.append(time.thread_time() - t0)
            k = np.arange(args.top_k)
            assert tr.propensities is not None
            errs.extend(np.abs(tr.propensities - ref[k, tr.order[:args.top_k]]).tolist())
        row = {"draws": n, "p50_us": pct(ts, 50), "p99_us": pct(ts, 99),
               "mean_abs_err": float(np.mean(errs)), "p99_abs_err": float(np.percentile(errs, 99))}
        sweep.append(row)
        print(f"  sampler draws {n:5d}: CPU p50 {row['p50_us']:5.0f} us  "
              f"p99 {row['p99_us']:5.0f} us"
              f"  |propensity error| mean {row['mean_abs_err']:.4f}  p99 "
              f"{row['p99_abs_err']:.4f}")
    summary["sampler"] = sweep
    summary["posterior"] = {"logit_std_min": float(np.sqrt(post.variance()).min()),
                            "logit_std_max": float(np.sqrt(post.variance()).max()),
                            "distinct_rows": int(post.row_std.size)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
