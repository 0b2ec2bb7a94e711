"""Freshness: from a click accepted by /v1/events to the first /v1/score response served by a
model that learned from it, on the local stack (Tansu, redis-server, `ctrloop train`,
`ctrloop serve`), under background simulated traffic.

How "learned from it" is observed, black-box: each probe is a brand-new ad id. The probe ad
and a control ad (another new id, same features) are scored together; only the ad-id rows
differ, and nothing trains them until the probe's click is learned as a positive (Adagrad's
first step moves every touched coordinate by the learning rate, 0.05). So the logit gap
between probe and control jumps exactly when a model that learned the click serves; the
threshold (0.02) is far above the drift of shared weights between polls (~1e-4).

    python -m benchmarks.freshness --probes 30 --out runs/bench/freshness.json

The trainer runs without warm-up (CTRLOOP_WARMUP=false) so probes can start at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.serving import child, wait_http
from ctrloop.dev.localservers import KafkaBroker, RedisServer, free_port
from ctrloop.io.kafka import create_topics
from ctrloop.sim import World, WorldConfig

THRESHOLD = 0.02
POLL_S = 0.02


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def background(url: str, rate: float, stop: threading.Event, seed: int = 0) -> None:
    """Simulated requests with logging and clicks drawn from the true CTR (sent at once)."""
    world = World(WorldConfig(seed=seed, start_ts=time.time()))
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            t0 = time.time()
            req = world.sample_request(t0)
            body = {"user_id": req.user_id, "features": req.features,
                    "candidates": [{"ad_id": a.id, "advertiser_id": a.advertiser_id,
                                    "features": a.features, "bid": a.bid}
                                   for a in req.candidates],
                    "options": {"top_k": req.n_slots, "log": True}}
            r = http.post("/v1/score", json=body)
            if r.status_code == 200:
                by_id = {a.id: a for a in req.candidates}
                clicks = [{"type": "click", "impression_id": c["impression_id"],
                           "ts": time.time()}
                          for c in r.json()["candidates"]
                          if rng.random() < world.true_ctr(req, by_id[c["ad_id"]], c["rank"])]
                if clicks:
                    http.post("/v1/events", json={"events": clicks})
            stop.wait(max(0.0, 1.0 / rate - (time.time() - t0)))


def probe(http: httpx.Client, i: int, template: dict[str, Any]) -> dict[str, Any]:
    ad = dict(template["ad"])
    probe_ad = {**ad, "ad_id": f"probe-{i}-{os.getpid()}"}
    control_ad = {**ad, "ad_id": f"control-{i}-{os.getpid()}"}
    base = {"user_id": template["user_id"], "features": template["features"]}
    r = http.post("/v1/score", json={**base, "candidates": [probe_ad],
                                     "options": {"top_k": 1, "log": True}})
    r.raise_for_status()
    imp_id = r.json()["candidates"][0]["impression_id"]

    def gap() -> tuple[float, str]:
        s = http.post("/v1/score", json={**base, "candidates": [probe_ad, control_ad],
                                         "options": {"rank_by": "pctr"}}).json()
        p = {c["ad_id"]: c["pctr"] for c in s["candidates"]}
        return _logit(p[probe_ad["ad_id"]]) - _logit(p[control_ad["ad_id"]]), s["model_version"]

    time.sleep(0.3)  # let the impression reach the trainer first, as in real traffic
    g0, v0 = gap()
    r = http.post("/v1/events", json={"events": [{"type": "click", "impression_id": imp_id,
                                                   "ts": time.time()}]})
    t_accept = time.perf_counter()
    r.raise_for_status()
    while time.perf_counter() - t_accept < 30:
        g, v = gap()
        if abs(g - g0) > THRESHOLD:
            return {"seconds": time.perf_counter() - t_accept, "version_before": v0,
                    "version_learned": v, "gap_change": g - g0}
        time.sleep(POLL_S)
    return {"seconds": None, "version_before": v0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--rate", type=float, default=20.0, help="background requests/s")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/freshness.json"))
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ctrloop-bench-fresh-"))
    world = World(WorldConfig(seed=7))
    req = world.sample_request(world.config.start_ts + 1)
    a = req.candidates[0]
    template = {"user_id": req.user_id, "features": req.features,
                "ad": {"advertiser_id": a.advertiser_id, "features": a.features, "bid": 1.0}}
    with KafkaBroker(work) as kafka, RedisServer(work) as redis_server:
        create_topics(kafka.bootstrap, ["impressions", "clicks", "conversions",
                                        "ctrloop.dead-letter"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "CTRLOOP_KAFKA_BOOTSTRAP": kafka.bootstrap,
               "CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_WARMUP": "false",
               "CTRLOOP_CHECKPOINT_DIR": str(work / "ckpt")}
        serve = [sys.executable, "-m", "ctrloop.cli", "serve", "--port", str(port),
                 "--workers", str(args.workers)]
        train = [sys.executable, "-m", "ctrloop.cli", "train"]
        with child(train, env, work / "trainer.log"), child(serve, env, work / "service.log"):
            wait_http(url + "/readyz")
            stop = threading.Event()
            bg = threading.Thread(target=background, args=(url, args.rate, stop), daemon=True)
            bg.start()
            wait_http(url + "/v1/models", lambda d: d["serving"]["status"] != "prior", 120)
            results = []
            with httpx.Client(base_url=url, timeout=10) as http:
                for i in range(args.probes):
                    res = probe(http, i, template)
                    results.append(res)
                    print(f"probe {i}: {res}", flush=True)
                    time.sleep(0.5)
            stop.set()
            bg.join(10)
    secs = sorted(r["seconds"] for r in results if r["seconds"] is not None)
    summary = {"date": time.strftime("%Y-%m-%d"), "probes": len(results),
               "learned": len(secs), "background_rps": args.rate, "workers": args.workers,
               "p50_s": float(np.percentile(secs, 50)) if secs else None,
               "p99_s": float(np.percentile(secs, 99)) if secs else None,
               "max_s": secs[-1] if secs else None, "results": results}
    args.out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))


if __name__ == "__main__":
    main()
