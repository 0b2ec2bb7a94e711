"""The floor for the serving benchmark: the least any FastAPI scorer does per request.

Parses the same /v1/score body with orjson, encodes it with the same FeatureEncoder and runs the
same model snapshot (path in CTRLOOP_BENCH_SNAPSHOT); no validation, no ranking, no logging, no
metrics, no hot reload. `benchmarks/serving.py` runs it side by side with `ctrloop serve`.

    CTRLOOP_BENCH_SNAPSHOT=model.safetensors uvicorn benchmarks.minimal_app:app --workers 2
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ctrloop.core.features import FeatureEncoder
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot

torch.set_num_threads(1)
_snap = decode_snapshot(Path(os.environ["CTRLOOP_BENCH_SNAPSHOT"]).read_bytes())
MODEL = build_from_snapshot(_snap, inference=True)
ENCODER = FeatureEncoder(_snap.spec)

app = FastAPI()


@app.post("/score")
async def score(request: Request) -> Response:
    d = orjson.loads(await request.body())
    cands = [(c["ad_id"], c["advertiser_id"], c.get("features", {})) for c in d["candidates"]]
    rows = ENCODER.encode_request(d.get("features", {}), d["user_id"], cands)
    with torch.inference_mode():
        pctr = torch.sigmoid(MODEL(torch.from_numpy(rows))).tolist()
    return Response(orjson.dumps({"pctr": pctr}), media_type="application/json")
