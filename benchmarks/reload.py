"""Hot reload cost: /v1/score latency while new model versions are published every second vs
while none are, and the delay from publication to the first response served by the new
version. One run: redis-server, `ctrloop serve` (2 workers), an FwFM over the simulator's
feature spec (23 MB snapshot), wrk at concurrency 8 with the 100-candidate body.

    python -m benchmarks.reload --duration 20 --out runs/bench/reload.json

Snapshots are encoded before the run, so the measured cost is the service's (fetch, SHA-256,
decode, build, warm-up, swap), not the publisher's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from benchmarks.serving import LUA, child, run_wrk, score_body, sim_spec, wait_http
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.dev.localservers import RedisServer, free_port
from ctrloop.io.registry import RedisRegistry


def publisher(registry: RedisRegistry, blobs: list[tuple[int, bytes]], every_s: float,
              published: dict[int, float], stop: threading.Event) -> None:
    for version, data in blobs:
        if stop.is_set():
            return
        published[version] = time.time()
        registry.publish(version, data, {"samples_seen": version})
        stop.wait(every_s)


def watcher(url: str, body: dict[str, Any], seen: dict[int, float],
            stop: threading.Event) -> None:
    with httpx.Client(timeout=10) as http:
        while not stop.is_set():
            v = http.post(url, json=body).json()["model_version"]
            if v.isdigit() and int(v) not in seen:
                seen[int(v)] = time.time()
            time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=float, default=1.0, help="seconds between publications")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/reload.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ctrloop-bench-reload-"))
    lua = work / "post.lua"
    lua.write_text(LUA)
    body_file = work / "body.json"
    body_file.write_bytes(json.dumps(score_body(100, False)).encode())
    small = score_body(1, False)
    spec = sim_spec()
    model = build_model("fwfm", spec, dim=16)
    n_versions = int(args.duration / args.every) + 5
    blobs = []
    for v in range(1, n_versions + 2):
        with torch.no_grad():
            model.bias.fill_(-3.5 + 0.01 * v)
        blobs.append((v, encode_snapshot(model, v, {"samples_seen": v})))
    size_mb = len(blobs[0][1]) / 1e6
    with RedisServer(work) as redis_server:
        registry = RedisRegistry.from_url(redis_server.url, keep=5)
        registry.r.set("ctrloop:seq", n_versions + 10)
        registry.publish(*blobs[0], {"samples_seen": 1})
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/score"
        env = {**os.environ, "CTRLOOP_REDIS_URL": redis_server.url,
               "CTRLOOP_KAFKA_BOOTSTRAP": "127.0.0.1:9"}  # no Kafka needed: no logging
        cmd = [sys.executable, "-m", "ctrloop.cli", "serve", "--port", str(port), "--workers",
               str(args.workers), "--loop", "uvloop", "--http", "httptools"]
        with child(cmd, env, work / "service.log"):
            wait_http(f"http://127.0.0.1:{port}/v1/models",
                       lambda d: d["serving"]["version"] == "1")
            run_wrk(url, body_file, lua, 8, 3)  # warm-up
            steady = run_wrk(url, body_file, lua, 8, args.duration)
            print(f"no reloads:   {steady}", flush=True)
            stop = threading.Event()
            published: dict[int, float] = {}
            seen: dict[int, float] = {}
            threads = [threading.Thread(target=publisher, args=(registry, blobs[1:], args.every,
                                                               published, stop)),
                       threading.Thread(target=watcher, args=(url, small, seen, stop))]
            for t in threads:
                t.start()
            swapping = run_wrk(url, body_file, lua, 8, args.duration)
            stop.set()
            for t in threads:
                t.join(30)
            print(f"with reloads: {swapping}", flush=True)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    delays = sorted(seen[v] - published[v] for v in published if v in seen)
    reload_sum = _metric(metrics, "ctrloop_model_reload_seconds_sum")
    reload_count = _metric(metrics, "ctrloop_model_reload_seconds_count")
    summary = {
        "date": time.strftime("%Y-%m-%d"), "workers": args.workers, "snapshot_mb": size_mb,
        "publish_every_s": args.every, "steady": steady, "during_reloads": swapping,
        "p99_ratio": round(swapping["p99_ms"] / steady["p99_ms"], 3),
        "rps_ratio": round(swapping["rps"] / steady["rps"], 3),
        "versions_published": len(published), "versions_seen": len(delays),
        "publish_to_serving_p50_ms": 1000 * float(np.percentile(delays, 50)) if delays else None,
        "publish_to_serving_p99_ms": 1000 * float(np.percentile(delays, 99)) if delays else None,
        "service_reload_mean_ms": 1000 * reload_sum / reload_count if reload_count else None,
        "reloads": reload_count,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


if __name__ == "__main__":
    main()
