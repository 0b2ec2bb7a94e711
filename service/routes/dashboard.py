"""GET /dashboard: a live page of what the service is doing, and /dashboard/data, its feed.

The page (service/static/dashboard/, uPlot 1.6.32 vendored from npm, MIT) polls
/dashboard/data every second and draws the rates, latency quantiles and shares itself, from
the differences between polls 5 s apart, as Prometheus' `rate()` and `histogram_quantile()`
would.

Several uvicorn workers: each poll may land on another worker, so the feed's metrics are those
/metrics shows (`metrics.render`: in multiprocess mode every worker's files summed), never one
process's own counters; a difference between two polls is then the whole service's. Only the
`worker` block (the model that one process serves, when it was loaded) is per process, and says
which pid answered. The per-advertiser delay gauges are per process in /metrics too (they travel
with the served model's record).

Outcomes (clicks against the truth) are not something the service sees. When the simulator
drives it (`ctrloop stack`), the stack writes what it knows (expected CTR served vs the
oracle's and a random ranking's, the served pCTR's AUC against the true CTR on the last 30 s)
to a JSON file and passes its path as CTRLOOP_SIM_STATUS_FILE; the feed includes that file as
it is, with its age. Without it the page says those panels need the simulator.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from ctrloop import __version__
from ctrloop.service.metrics import render
from ctrloop.service.responses import json_response
from ctrloop.service.state import ServiceState

# Set by `ctrloop stack` for its service: where its simulator writes its status.
SIM_STATUS_ENV = "CTRLOOP_SIM_STATUS_FILE"
MAX_SIM_STATUS_BYTES = 2_000_000  # a status of a long run stays far below (the stack caps it)
ASSETS = "/static/dashboard"

# One <section> per panel: the script fills the ones whose data exist and leaves the others
# with their note. Relative to `{root}` (the proxy prefix, as /docs does).
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ctrloop dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{root}{assets}/uPlot.min.css">
<link rel="stylesheet" href="{root}{assets}/dashboard.css">
</head>
<body data-ready="0" data-polls="0" data-errors="0">
<header>
  <h1>ctrloop <span class="muted">{version}</span></h1>
  <div id="status" class="status">connecting&hellip;</div>
</header>
<main id="panels"
      data-feed="{root}/dashboard/data" data-poll-ms="1000" data-window-s="600"
      data-rate-s="5"></main>
<footer class="muted">
  Polled every second from <code>{root}/dashboard/data</code>, which reads what
  <a href="{root}/metrics">/metrics</a> exposes (every worker summed). Rates, shares and
  quantiles are over the last 5 s, as Prometheus' <code>rate(...[5s])</code> and
  <code>histogram_quantile()</code> would take them. Charts keep the last 10 minutes this page
  has seen; the simulator's panels, the whole run.
  <a href="{root}/docs">API docs</a>
</footer>
<script src="{root}{assets}/uPlot.iife.min.js"></script>
<script src="{root}{assets}/dashboard-math.js"></script>
<script src="{root}{assets}/dashboard.js"></script>
</body>
</html>
"""


def page(root: str = "") -> str:
    return _PAGE.format(root=root, assets=ASSETS, version=__version__)


def metric_samples(text: str) -> dict[str, list[list[Any]]]:
    """Prometheus text → {sample name: [[labels, value], ...]} (`_total`, `_bucket`, ... kept
    as their own names, as PromQL sees them).

    The exposition format's sample lines only, by regular expression: prometheus_client's
    parser (character by character) took ~20 ms for the ~350 lines of a running stack, on the
    service's CPU once a second while a page is open; this takes well under 1 ms. Its results
    are the same (tests/unit/test_dashboard.py compares them).
    """
    out: dict[str, list[list[Any]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        name, labels, value = m.groups()
        parsed = {k: _unescape(v) for k, v in _LABEL.findall(labels)} if labels else {}
        out.setdefault(name, []).append([parsed, float(value)])
    return out


# name{labels} value [timestamp]; labels greedy up to the last "}" (a value may hold one).
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?[ \t]+(\S+)(?:[ \t]+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


def _unescape(value: str) -> str:
    """Label values escape backslash, double quote and newline."""
    if "\\" not in value:
        return value
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def read_sim_status(path: str | None, now: float) -> dict[str, Any] | None:
    """The simulator's status file as it is, with its age; None when there is none (yet)."""
    if not path:
        return None
    p = Path(path)
    try:
        st = p.stat()
        if st.st_size > MAX_SIM_STATUS_BYTES:
            return {"error": f"{p} is {st.st_size} bytes; over {MAX_SIM_STATUS_BYTES}"}
        status = orjson.loads(p.read_bytes())
    except FileNotFoundError:
        return None  # the stack writes its first status a few seconds after it starts
    except (OSError, orjson.JSONDecodeError) as e:
        return {"error": f"cannot read {p}: {e}"}
    if not isinstance(status, dict):
        return {"error": f"{p} holds no JSON object"}
    return {"age_s": round(now - st.st_mtime, 3), "status": status}


def _worker(state: ServiceState) -> dict[str, Any]:
    served = state.holder.served.describe()
    keep = ("version", "status", "loaded_at", "published_at", "samples_seen", "load_seconds")
    return {"pid": os.getpid(), **{k: served[k] for k in keep if k in served}}


def feed(state: ServiceState) -> dict[str, Any]:
    """What one poll of the page gets (blocking: file reads and the metrics' aggregation)."""
    now = time.time()
    sim_path = os.environ.get(SIM_STATUS_ENV)
    return {"now": now, "worker": _worker(state),
            "metrics": metric_samples(render(state.metrics).decode("utf-8")),
            "sim": read_sim_status(sim_path, now), "sim_expected": bool(sim_path)}


def install(app: FastAPI, state: ServiceState) -> None:
    # Not in the OpenAPI document, and not counted in ctrloop_requests: an open page polling
    # every second would show up as traffic. /metrics is the API for machines.
    @app.get("/dashboard", include_in_schema=False)
    async def dashboard(request: Request) -> Response:
        return HTMLResponse(page(request.scope.get("root_path", "")),
                            headers={"cache-control": "no-cache"})

    @app.get("/dashboard/data", include_in_schema=False)
    async def dashboard_data() -> Response:
        body = await run_in_threadpool(feed, state)
        return json_response(200, body, headers={"cache-control": "no-store"})
