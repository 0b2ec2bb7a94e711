"""GET /v1/models: what is served, the reloader's counters and what the registry holds."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ctrloop.core.errors import RegistryError
from ctrloop.service.responses import json_response
from ctrloop.service.routes.common import example
from ctrloop.service.state import ServiceState

_MODELS_EXAMPLE = {
    "serving": {"version": "42", "status": "trained", "loaded_at": 1767225601.2,
                "load_seconds": 0.031, "model": "fwfm", "spec_hash": "d1d76588fb80d1fe",
                "published_at": 1767225600.9, "samples_seen": 1250000,
                "metrics": {"auc": 0.71, "logloss": 0.118, "calibration": 1.01}},
    "reloader": {"reloads": 41, "reload_failures": {}, "refused_versions": [],
                 "registry_reachable": True, "pinned": None},
    "registry": {"current": 42, "pinned": None, "versions": [38, 39, 40, 41, 42]},
}


def install(app: FastAPI, state: ServiceState) -> None:
    @app.get("/v1/models", tags=["models"], summary="What is served and what the registry has",
             responses={200: example(_MODELS_EXAMPLE)})
    async def models() -> Response:
        """The served version (when published, samples seen, the trainer's progressive
        metrics), reload counters, and the registry's current/pinned/kept versions."""
        registry: dict[str, Any]
        try:
            current = await run_in_threadpool(state.registry.current)
            versions = await run_in_threadpool(state.registry.versions)
            registry = {"current": current.version if current else None,
                        "pinned": state.reloader.pinned, "versions": versions}
        except RegistryError as e:  # unreachable or damaged: what is served is still known
            registry = {"error": str(e)}
        return json_response(200, {"serving": state.holder.served.describe(),
                                   "reloader": state.reloader.describe(),
                                   "registry": registry})
