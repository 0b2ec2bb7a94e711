"""GET /healthz (liveness), /readyz (readiness) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from ctrloop.service.metrics import CONTENT_TYPE, render
from ctrloop.service.responses import json_response
from ctrloop.service.routes.common import example
from ctrloop.service.schemas import ErrorBody
from ctrloop.service.state import ServiceState


def install(app: FastAPI, state: ServiceState) -> None:
    @app.get("/healthz", tags=["health"], summary="Liveness",
             responses={200: example({"status": "ok"})})
    async def healthz() -> Response:
        return json_response(200, {"status": "ok"})

    @app.get("/readyz", tags=["health"], summary="Readiness",
             responses={200: example({"ready": True, "model_version": "42",
                                      "model_status": "trained", "registry_reachable": True,
                                      "impressions_queued": 0, "kafka": "connected"}),
                        503: {"model": ErrorBody, "description": "Starting or stopping"}})
    async def readyz() -> Response:
        """Ready once started: scoring works from the first request (with the prior model
        until one is published). The body says what is served and whether Kafka and the
        registry are reachable."""
        served = state.holder.served
        body = {"ready": state.ready, "model_version": served.version,
                "model_status": served.status,
                "registry_reachable": state.reloader.stats.registry_ok,
                # Present only while a registry entry is malformed: new models cannot load.
                **({"registry_error": e} if (e := state.reloader.stats.registry_error) else {}),
                "impressions_queued": state.sink.queued() if state.sink else 0,
                # Kafka down leaves the service ready: scoring does not need it (docs/service.md)
                "kafka": state.sink.kafka_state() if state.sink else "none"}
        return json_response(200 if state.ready else 503, body)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=PlainTextResponse)  # documents text/plain, not JSON
    async def prometheus() -> Response:
        return Response(render(state.metrics), media_type=CONTENT_TYPE)
