"""The scoring service's app: builds its state and composes the routes and ASGI pieces.

Routes (service/routes/): POST /v1/score (scoring.py), POST /v1/events (events.py),
GET /v1/models (models.py), GET /healthz, /readyz, /metrics (health.py), POST
/v1/admin/{pin,unpin,rollback} behind a bearer token (admin.py), /docs (docs.py),
/dashboard (dashboard.py). The body
limit, the fast route for /v1/score and the error handlers are service/asgi.py; the ranking is
service/ranking.py. Every error is a 4xx whose `detail` says what is wrong; a 5xx would be a bug.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from ctrloop import __version__
from ctrloop.io.registry import ModelRegistry, RedisRegistry
from ctrloop.service.asgi import BodyLimit, FastRoute, install_error_handlers
from ctrloop.service.metrics import Metrics
from ctrloop.service.routes import admin, dashboard, docs, events, health, models, scoring
from ctrloop.service.schemas import SCORE_REQUEST, EventsRequest, PinRequest
from ctrloop.service.settings import ServiceSettings
from ctrloop.service.sink import EventSink
from ctrloop.service.state import ServiceState

log = logging.getLogger(__name__)


def _install_openapi(app: FastAPI, bodies: dict[str, TypeAdapter[Any]]) -> None:
    """Documents the bodies the raw-body routes validate themselves, from the same schemas."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version,
                             description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, adapter in bodies.items():
            body = adapter.json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[name] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: ServiceSettings | None = None, *,
               registry: ModelRegistry | None = None,
               sink: EventSink | None = None) -> FastAPI:
    """The ASGI app. Tests pass an in-memory registry and/or their own sink; by default both
    are built from settings (Redis registry, Kafka sink)."""
    settings = settings or ServiceSettings()
    metrics = Metrics()
    if registry is None:
        registry = RedisRegistry.from_url(settings.redis_url, settings.registry_namespace)
    if sink is None:
        sink = EventSink(settings.kafka_bootstrap, settings.topic_impressions,
                         settings.produce_timeout_s, topics=list(settings.topic_of.values()),
                         on_logged=metrics.impressions_logged.inc,
                         on_log_failed=metrics.impressions_log_failed.inc,
                         on_state=lambda up: metrics.kafka_available.set(1 if up else 0))
    state = ServiceState(settings, registry, sink, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(1)  # batch-100 inference; workers, not threads, use the cores
        try:  # serve the current model from the start
            await run_in_threadpool(state.reloader.check)
        except Exception:
            # Whatever the registry holds, start: the prior (or nothing better) is served and
            # the reloader keeps trying; exiting would crash-loop the pod (issue 10, E).
            log.exception("first model load failed; serving the prior until one loads")
        state.reloader.start()
        state.ready = True
        log.info("scoring service ready, serving model %s", state.holder.served.version)
        try:
            yield
        finally:
            state.ready = False
            state.reloader.stop()
            if state.sink is not None:
                await run_in_threadpool(state.sink.close)

    app = FastAPI(
        title="ctrloop scoring service",
        version=__version__,
        docs_url=None,  # routes/docs.py serves Swagger UI from the package, not a CDN
        redoc_url=None,  # ReDoc would load from a CDN too; Swagger UI covers the same
        description="Scores candidate ads with the latest online-trained model, logs what it "
                    "served, and accepts click/conversion events. See README.md.",
        lifespan=lifespan,
    )
    app.state.service = state
    _install_openapi(app, {"ScoreRequest": SCORE_REQUEST,
                           "EventsRequest": TypeAdapter(EventsRequest),
                           "PinRequest": TypeAdapter(PinRequest)})
    install_error_handlers(app)
    score_handler = scoring.install(app, state)
    events.install(app, state)
    models.install(app, state)
    health.install(app, state)
    admin.install(app, state)
    docs.install(app)
    dashboard.install(app, state)
    # Added last, so outermost: the body limit applies to FastRoute's reads as to any route's.
    app.add_middleware(FastRoute, path="/v1/score", handler=score_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory (`ctrloop serve`): settings from CTRLOOP_* in each worker."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every failed reconnect (several lines a second while Kafka is down);
    # service/sink.py logs one line per outage and /readyz and /metrics show the state.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    app = create_app(ServiceSettings())
    # Everything imported and built so far (torch, pydantic, FastAPI: ~200k objects) lives as
    # long as the process: freezing it keeps the collector from rescanning it. A full
    # collection over it took ~150 ms here, a stall every few thousand requests that queued
    # every request behind it. Per process, after startup: tests' apps are not frozen.
    gc.collect()
    gc.freeze()
    return app
