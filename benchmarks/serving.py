"""/v1/score throughput and latency with wrk, side by side with the minimal FastAPI endpoint.

One run starts redis-server and (for impression logging) a Tansu broker, publishes an FwFM
snapshot over the simulator's feature spec, then starts `ctrloop serve` and
`benchmarks/minimal_app.py` with the same number of uvicorn workers (uvloop + httptools) and
drives each with `wrk` (apt install wrk) at each concurrency, alternating targets so machine
noise hits both alike. The body is one simulated request with 100 candidates.

    python -m benchmarks.serving --duration 15 --workers 2 --out runs/bench/serving.json

Targets: `minimal` (orjson parse + encode + model), `service` (validation, ranking, metrics,
no logging), `service+log` (also logs the top k, default 3, as impressions to Kafka), and the
exploration pair `explore-off` / `explore-on`: the same logged request with `options.explore`
false / true (Thompson sampling plus Monte Carlo propensities of the top k; the service runs
with CTRLOOP_EXPLORE_COST_CAP=1 so every explore-on request explores). The published model
carries a GP posterior (ctrloop/core/posterior.py) that learned from simulated impressions, so
every target also pays for the posterior variances it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from ctrloop.core.events import parse_event
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.models import CTRModel, build_model
from ctrloop.core.posterior import LogitPosterior
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer, free_port
from ctrloop.io.kafka import create_topics
from ctrloop.io.registry import RedisRegistry
from ctrloop.sim import World, WorldConfig, generate

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("CTRLOOP_BENCH_BODY"), "rb")
wrk.body = f:read("*a")
f:close()
"""


def sim_spec(n: int = 5000) -> FeatureSpec:
    imps = [parse_event(ev, "impression") for ev, truth in generate(WorldConfig(), n)
            if truth is not None]
    return FeatureSpec.infer(imps)


def with_posterior(model: CTRModel, impressions: int = 20_000) -> CTRModel:
    """Attach a posterior that learned `impressions` simulated impressions (p = 3%): narrow
    for popular rows, the prior for new ads, as a served model's would be."""
    enc = FeatureEncoder(model.spec)
    imps = [parse_event(ev, "impression") for ev, truth in generate(WorldConfig(), impressions)
            if truth is not None]
    rows = torch.from_numpy(enc.encode_many(imps))  # type: ignore[arg-type]
    post = LogitPosterior(model.spec)
    post.update(rows, torch.full((rows.shape[0],), 0.03))
    model.posterior = post
    return model


def score_body(n_candidates: int, log: bool, top_k: int = 10, seed: int = 1) -> dict[str, Any]:
    """One simulated request with `n_candidates` ads drawn from the world's active pool."""
    world = World(WorldConfig(seed=seed))
    req = world.sample_request(world.config.start_ts + 60)
    ads = world.active_ads()
    pick = np.random.default_rng(seed).choice(len(ads), n_candidates, replace=False)
    cands = [{"ad_id": ads[i].id, "advertiser_id": ads[i].advertiser_id,
              "features": dict(ads[i].features), "bid": round(ads[i].bid, 4)} for i in pick]
    body: dict[str, Any] = {"user_id": req.user_id, "features": dict(req.features),
                            "candidates": cands}
    if log:
        body["options"] = {"top_k": top_k, "log": True}
    return body


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        raise ValueError(f"cannot parse wrk latency {value!r}")
    return float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]]


def run_wrk(url: str, body: Path, lua: Path, conc: int, seconds: int) -> dict[str, Any]:
    threads = min(conc, 2)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conc}", f"-d{seconds}s", "--latency", "-s", str(lua), url],
        env={**os.environ, "CTRLOOP_BENCH_BODY": str(body)}, capture_output=True, text=True,
        check=True).stdout
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {"rps": rps, "p50_ms": _ms(pct["50"]), "p90_ms": _ms(pct["90"]),
            "p99_ms": _ms(pct["99"]), "non_2xx": int(bad[1]) if bad else 0,
            "socket_errors": errors[1] if errors else None}


def wait_http(url: str, ok: Any = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200 and (ok is None or ok(r.json())):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


@contextmanager
def child(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            yield p
        finally:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--log-top-k", type=int, default=3,
                    help="ads shown (and logged) per request in service+log (the sim shows 1-3)")
    ap.add_argument("--targets", nargs="+", default=["minimal", "service", "service+log",
                                                     "explore-off", "explore-on"])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serving.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ctrloop-bench-serving-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    bodies = {"plain": work / "body.json", "log": work / "body-log.json"}
    bodies["plain"].write_bytes(json.dumps(score_body(args.candidates, False)).encode())
    log_body = score_body(args.candidates, True, args.log_top_k)
    bodies["log"].write_bytes(json.dumps(log_body).encode())
    for on in (False, True):
        body = {**log_body, "options": {**log_body["options"], "explore": on}}
        bodies[f"explore-{'on' if on else 'off'}"] = path = work / f"body-explore-{on}.json"
        path.write_bytes(json.dumps(body).encode())
    spec = sim_spec()
    model = with_posterior(build_model("fwfm", spec, dim=16))
    snap_path = work / "model.safetensors"
    with KafkaBroker(work) as kafka, RedisServer(work) as redis_server:
        create_topics(kafka.bootstrap, ["impressions", "clicks", "conversions"])
        registry = RedisRegistry.from_url(redis_server.url)
        version = registry.next_version()
        data = encode_snapshot(model, version, {"samples_seen": 0})
        registry.publish(version, data, {"samples_seen": 0})
        snap_path.write_bytes(data)
        env = {**os.environ, "CTRLOOP_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_BENCH_SNAPSHOT": str(snap_path),
               "CTRLOOP_EXPLORE_COST_CAP": "1"}
        sport, mport = free_port(), free_port()
        svc_cmd = [sys.executable, "-m", "ctrloop.cli", "serve", "--port", str(sport),
                   "--workers", str(args.workers), "--loop", "uvloop", "--http", "httptools"]
        min_cmd = [sys.executable, "-m", "uvicorn", "benchmarks.minimal_app:app", "--port",
                   str(mport), "--workers", str(args.workers), "--loop", "uvloop", "--http",
                   "httptools", "--log-level", "warning", "--no-access-log"]
        with child(svc_cmd, env, work / "service.log"), \
                child(min_cmd, env, work / "minimal.log"):
            wait_http(f"http://127.0.0.1:{sport}/v1/models",
                       lambda d: d["serving"]["version"] == str(version))
            httpx.post(f"http://127.0.0.1:{mport}/score", content=bodies["plain"].read_bytes(),
                       timeout=30).raise_for_status()
            urls = {"minimal": (f"http://127.0.0.1:{mport}/score", bodies["plain"]),
                    "service": (f"http://127.0.0.1:{sport}/v1/score", bodies["plain"]),
                    "service+log": (f"http://127.0.0.1:{sport}/v1/score", bodies["log"]),
                    "explore-off": (f"http://127.0.0.1:{sport}/v1/score",
                                    bodies["explore-off"]),
                    "explore-on": (f"http://127.0.0.1:{sport}/v1/score", bodies["explore-on"])}
            explored = httpx.post(urls["explore-on"][0], content=bodies["explore-on"].read_bytes(),
                                  timeout=30).json()
            if not explored["explored"]:
                raise RuntimeError(f"explore-on did not explore: {explored['exploration']}")
            for target in args.targets:  # warm every worker's caches
                run_wrk(urls[target][0], urls[target][1], lua, 8, 3)
            results: dict[str, dict[str, Any]] = {}
            for conc in args.concurrency:
                for target in args.targets:
                    r = run_wrk(urls[target][0], urls[target][1], lua, conc, args.duration)
                    results.setdefault(str(conc), {})[target] = r
                    print(f"c={conc:<3} {target:<12} {r['rps']:8.0f} req/s  p50 "
                          f"{r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  non-2xx "
                          f"{r['non_2xx']}", flush=True)
            metrics = httpx.get(f"http://127.0.0.1:{sport}/metrics").text
    logged = re.search(r"^ctrloop_impressions_logged_total (\S+)$", metrics, re.M)
    lost = re.search(r"^ctrloop_impressions_log_failed_total (\S+)$", metrics, re.M)
    summary = {"date": time.strftime("%Y-%m-%d"), "workers": args.workers,
               "candidates": args.candidates, "duration_s": args.duration,
               "results": results,
               "impressions_logged": float(logged[1]) if logged else None,
               "impressions_log_failed": float(lost[1]) if lost else None}
    for row in results.values():
        if "minimal" in row:
            for target in row:
                row[target]["vs_minimal"] = round(row[target]["rps"] / row["minimal"]["rps"], 3)
        if "explore-on" in row and "explore-off" in row:  # the goal: under 1.2 at p99
            on, off = row["explore-on"], row["explore-off"]
            row["explore_on_over_off"] = {"p50": round(on["p50_ms"] / off["p50_ms"], 3),
                                          "p99": round(on["p99_ms"] / off["p99_ms"], 3),
                                          "rps": round(on["rps"] / off["rps"], 3)}
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
