"""The scoring service's HTTP API (FastAPI).

Routes: POST /v1/score, POST /v1/events, GET /v1/models, GET /healthz, GET /readyz,
GET /metrics, and POST /v1/admin/{pin,unpin,rollback} behind a bearer token.

Hot paths parse the raw body with `model_validate_json` and answer with orjson bytes: FastAPI's
default json.loads + validate + jsonable_encoder costs ~4x more per request
(../shared/docs/measured-here.md). Every error is a 4xx whose `detail` says what is wrong; a 5xx
would be a bug.
"""

from __future__ import annotations

import functools
import gc
import hmac
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import torch
from ctrloop.service.metrics import CONTENT_TYPE, Metrics, render
from ctrloop.service.reloader import ModelHolder, Reloader
from ctrloop.service.schemas import (
    SCORE_REQUEST,
    ErrorBody,
    EventsAccepted,
    EventsRequest,
    PinRequest,
    ScoreRequest,
    ScoreResponse,
    check_feature_names,
    duplicate_key,
    fast_score_request,
)
from ctrloop.service.scoring import Prediction, ServedModel
from ctrloop.service.settings import ServiceSettings
from ctrloop.service.sink import EventSink, SinkUnavailable
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response
from pydantic import TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctrloop import __version__
from ctrloop.core.errors import InvalidEvent, RegistryError, SnapshotError
from ctrloop.core.events import (
    MAX_FEATURES,
    check_encoded_size,
    check_not_ahead,
    encode_checked,
    event_type,
    loads_json,
    parse_event,
    parse_impression,
)
from ctrloop.core.exploration import (
    ExplorationBudget,
    JointPosterior,
    expected_pctr,
    exploration_cost,
    generator,
    thompson_rank,
)
from ctrloop.io.registry import ModelRegistry, RedisRegistry, VersionNotFound

log = logging.getLogger(__name__)

JSON = "application/json"
MAX_ERRORS_SHOWN = 20
# Ids: a random prefix per process plus a counter. Unique across workers and restarts with
# overwhelming probability, and ~1 us instead of uuid4's ~3 (measured on the request path).
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count()


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


REMEMBER_EVERY = 64  # keep every 64th request's rows as warm-up inputs for the next model


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def _error(status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    return _json(status, {"detail": detail}, headers)


# ---------------------------------------------------------------------------- error messages

_FEATURE_RULE = ("must be a string (at most 1024 characters), a boolean, null, or a finite "
                 "number within ±1e12")


def _clean_loc(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """Drop pydantic's union-member tag after `features.<name>`; say whether there was one."""
    for k, part in enumerate(loc):
        if part == "features" and len(loc) > k + 2:
            return loc[:k + 2], True
    return loc, False


def validation_detail(e: ValidationError, limit: int = MAX_ERRORS_SHOWN) -> list[dict[str, Any]]:
    """pydantic errors → [{loc, msg, type}] without echoing inputs, one entry per location."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for err in e.errors(include_url=False, include_input=False, include_context=False):
        loc, tagged = _clean_loc(tuple(err["loc"]))
        if loc in seen:
            continue
        msg = err["msg"]
        if tagged and "features" in loc:
            msg = f"feature value {_FEATURE_RULE}"
        seen[loc] = {"loc": list(loc), "msg": msg, "type": err["type"]}
        if len(seen) >= limit:
            break
    return list(seen.values())


def _invalid_body(e: ValidationError, body: bytes | None = None) -> Response:
    errors = e.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        if body is not None:
            # The contract's decoder names NaN/Infinity and invalid UTF-8 (pydantic says
            # "expected value at column 62"): one wording for every entry point.
            try:
                loads_json(body)
            except InvalidEvent as ie:
                return _error(400, f"request body is {ie.reason}")
        return _error(400, f"request body is not valid JSON: {errors[0]['msg']}")
    return _error(422, validation_detail(e))


# ---------------------------------------------------------------------------- body limit

class BodyLimit:
    """Refuses bodies over `max_bytes` with 413 before they are buffered (pure ASGI: no
    per-request overhead beyond a header scan)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await self._refuse(send)
                    return
        received = 0

        async def limited() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"detail": f"request body exceeds {self.max_bytes} bytes "
                                       "(CTRLOOP_MAX_BODY_BYTES); split the request"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", JSON.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# A route handler that reads its own body: FastRoute and the FastAPI route share one.
BodyHandler = Callable[[Callable[[], Awaitable[bytes]]], Awaitable[Response]]
_Arg = TypeVar("_Arg")


class FastRoute:
    """Serves one POST route straight from ASGI, ahead of FastAPI's router, request object and
    dependency machinery: ~65 us a request measured in-process, ~10% of a 100-candidate
    /v1/score. The route stays declared on the FastAPI app (OpenAPI documents it, and it
    answers the same way if reached); every other request goes on to FastAPI untouched."""

    def __init__(self, app: ASGIApp, path: str, handler: BodyHandler) -> None:
        self.app = app
        self.path = path
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or _route_path(scope) != self.path):
            await self.app(scope, receive, send)
            return
        # Starlette's own body reading (chunks, disconnects), without the rest of the stack.
        response = await self.handler(Request(scope, receive).body)
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router would match: without the app's root_path (Starlette's rule)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path != root and path[len(root)] == "/":
        return path[len(root):]
    return path


# ---------------------------------------------------------------------------- OpenAPI

def _body_doc(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {JSON: {"schema": ref}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Body is not JSON"},
    413: {"model": ErrorBody, "description": "Body too large"},
    422: {"model": ErrorBody, "description": "Body breaks the schema; `detail` lists where"},
}


def _install_openapi(app: FastAPI, bodies: dict[str, TypeAdapter[Any]]) -> None:
    """Documents the bodies the raw-body routes validate themselves."""
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


# ---------------------------------------------------------------------------- the app

class ServiceState:
    def __init__(self, settings: ServiceSettings, registry: ModelRegistry,
                 sink: EventSink | None, metrics: Metrics) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        expected = None
        if settings.feature_spec is not None:
            from ctrloop.core.features import FeatureSpec

            expected = FeatureSpec.load(settings.feature_spec)
        self.holder = ModelHolder(settings.prior_ctr, expected)
        self.reloader = Reloader(registry, self.holder, settings.reload_poll_s,
                                 on_swap=self._swapped, on_failure=self._failed)
        self.holder.on_nonfinite = self._nonfinite
        self.ready = False
        self.started_at = time.time()
        self.requests = 0
        # Per worker: each process bounds its own exploration cost (no shared state to lock).
        self.budget = ExplorationBudget(cost_cap=settings.explore_cost_cap,
                                        max_share=settings.explore_max_share)
        # Draws of unseeded explored requests: one stream per process, seeded once from the
        # OS's entropy (reseeding per request measured ~15-20 us here). Only the event loop's
        # thread uses it.
        self.rng = generator()
        # Which process answered: with several workers, versions only increase per process.
        self.worker_header = {"x-ctrloop-worker": str(os.getpid())}

    def _swapped(self, served: Any) -> None:
        m = self.metrics
        m.reloads.inc()
        m.reload_seconds.observe(served.load_seconds)
        m.model_version.set(served.number)
        if served.record is not None:
            m.model_published.set(served.record.published_at)
            meta = served.record.meta
            m.model_samples.set(meta.get("samples_seen", 0))
            m.trainer_dead_lettered.set(meta.get("trainer", {}).get("dead_lettered", 0))
        cvr_record = getattr(served, "cvr_record", None)
        meta = cvr_record.meta if cvr_record is not None else {}
        m.delays.update(meta.get("delays"), meta.get("delays_by_type"))

    def _failed(self, reason: str) -> None:
        self.metrics.reload_failures.labels(reason).inc()

    def _nonfinite(self, output: str, n: int) -> None:
        self.metrics.nonfinite_predictions.labels(output).inc(n)


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
        docs_url=None,  # _docs_routes serves Swagger UI from the package, not a CDN
        redoc_url=None,  # ReDoc would load from a CDN too; Swagger UI covers the same
        description="Scores candidate ads with the latest online-trained model, logs what it "
                    "served, and accepts click/conversion events. See README.md.",
        lifespan=lifespan,
    )
    app.state.service = state
    _install_openapi(app, {"ScoreRequest": SCORE_REQUEST,
                           "EventsRequest": TypeAdapter(EventsRequest),
                           "PinRequest": TypeAdapter(PinRequest)})
    _install_error_handlers(app)
    score_handler = _score_routes(app, state)
    _event_routes(app, state)
    _model_routes(app, state)
    _admin_routes(app, state)
    _docs_routes(app)
    # Added last, so outermost: the body limit applies to FastRoute's reads as to any route's.
    app.add_middleware(FastRoute, path="/v1/score", handler=score_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app


STATIC_DIR = Path(__file__).parent / "static"
SWAGGER = "/static/swagger-ui"


def _docs_routes(app: FastAPI) -> None:
    """/docs from the package's own copy of Swagger UI (service/static/swagger-ui,
    swagger-ui-dist 5.36.0, Apache-2.0): FastAPI's default page loads it from a CDN, so it was
    blank offline and on a locked-down network."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        root = request.scope.get("root_path", "")  # behind a proxy prefix, as FastAPI does
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""),
                   "type": e.get("type", "")} for e in exc.errors()[:MAX_ERRORS_SHOWN]]
        if errors and errors[0]["type"] == "json_invalid":
            return _error(400, f"request body is not valid JSON: {errors[0]['msg']}")
        return _error(422, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))


def _timed(state: ServiceState, route: str
           ) -> Callable[[Callable[[_Arg], Awaitable[Response]]],
                         Callable[[_Arg], Awaitable[Response]]]:
    hist = state.metrics.request_seconds.labels(route)
    counters = {c: state.metrics.requests.labels(route, c) for c in ("2xx", "4xx", "5xx")}

    def wrap(fn: Callable[[_Arg], Awaitable[Response]]
             ) -> Callable[[_Arg], Awaitable[Response]]:
        async def handler(request: _Arg) -> Response:
            t0 = time.perf_counter()
            try:
                response = await fn(request)
            except _TooLarge:
                counters["4xx"].inc()
                raise  # BodyLimit answers 413 (a chunked body over the limit)
            except Exception:
                counters["5xx"].inc()
                log.exception("unhandled error in %s", route)
                return _error(500, "internal error (a bug): see the service log")
            hist.observe(time.perf_counter() - t0)
            counters[f"{response.status_code // 100}xx"].inc()
            return response

        # Name, docstring and signature (via __wrapped__): FastAPI reads the parameters off
        # the route function to know that `request` is the Request.
        return functools.wraps(fn)(handler)

    return wrap


# ---------------------------------------------------------------------------- /v1/score

def _score_routes(app: FastAPI, state: ServiceState) -> BodyHandler:
    """Declares POST /v1/score and returns its handler, which `FastRoute` serves directly."""
    settings, metrics = state.settings, state.metrics
    topic = settings.topic_impressions
    by_status = {s: metrics.scores_by_model.labels(s) for s in ("prior", "trained", "pinned")}

    @_timed(state, "/v1/score")
    async def handle(read_body: Callable[[], Awaitable[bytes]]) -> Response:
        body = await read_body()
        # The common valid request skips pydantic (its JSON parsing alone costs ~2x orjson's);
        # anything else, invalid bodies included, gets pydantic's validation and messages.
        req = fast_score_request(body)
        if req is None:
            try:
                req = SCORE_REQUEST.validate_json(body)
            except ValidationError as e:
                return _invalid_body(e, body)
            if (problem := check_feature_names(req)) is not None:
                return _error(422, problem)
            # The fast path proved there is none; here pydantic kept a repeated key's last value.
            if (problem := duplicate_key(body, orjson.loads(body))) is not None:
                return _error(400, problem)
        return _score(state, req, topic, by_status)

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS,
              openapi_extra=_body_doc("ScoreRequest"), tags=["scoring"],
              summary="Rank candidate ads for one request")
    async def score(request: Request) -> Response:
        """pCTR for every candidate, ranked by `score` (bid × pCTR by default). With
        `options.log`, each of the `top_k` is logged to Kafka as an impression with the exact
        features scored, and its `impression_id` is returned for reporting clicks."""
        # FastRoute answers first; this route documents the endpoint and is its fallback.
        return await handle(request.body)

    return handle


def _conversion_type_error(served: ServedModel, ctype: str) -> str:
    if served.cvr is None:
        return (f"options.conversion_type {ctype!r} needs a pCVR model, and version "
                f"{served.version} has none; omit it")
    if not served.cvr_types:
        return (f"version {served.version}'s pCVR model learns one task for every conversion "
                f"type; omit options.conversion_type")
    return (f"unknown conversion type {ctype!r}; version {served.version}'s pCVR model "
            f"learns {', '.join(served.cvr_types)}")


def _score(state: ServiceState, req: ScoreRequest, topic: str,
           by_status: dict[str, Any]) -> Response:
    settings = state.settings
    candidates = req["candidates"]
    n = len(candidates)
    if n > settings.max_candidates:
        return _error(422, f"{n} candidates, at most {settings.max_candidates} per request "
                           "(CTRLOOP_MAX_CANDIDATES); split the request")
    opts = req.get("options") or {}
    top_k, log_on = opts.get("top_k"), opts.get("log", False)
    if log_on and top_k is None:
        return _error(422, "options.log needs options.top_k: the number of ads shown, which "
                           "are the ones logged as impressions")
    if log_on and not settings.log_impressions:
        return _error(422, "impression logging is off on this service "
                           "(CTRLOOP_LOG_IMPRESSIONS=false); send options.log=false")
    served = state.holder.served  # read once: this request finishes on this model
    shared = req.get("features") or {}
    user_id = req["user_id"]
    cands = [(c["ad_id"], c["advertiser_id"], c.get("features") or {}) for c in candidates]
    if log_on and (problem := _loggable(req, shared, cands, settings.max_event_ahead_s)):
        return _error(422, problem)
    rank_by = opts.get("rank_by", "bid_pctr")
    ctype = opts.get("conversion_type")
    if ctype is not None and ctype not in served.cvr_types:
        return _error(422, _conversion_type_error(served, ctype))
    pred = served.predict_full(shared, user_id, cands,
                               with_variance=served.posterior is not None,
                               conversion_type=ctype)
    pctr, pcvr = pred.pctr, pred.pcvr
    weights = None
    if rank_by == "pctr":
        value = pctr
    else:
        weights = np.array([c.get("bid") or 1.0 for c in candidates])
        if rank_by == "bid_pctr_pcvr":
            if pcvr is None:
                return _error(422, f"rank_by bid_pctr_pcvr needs a pCVR model, and version "
                                   f"{served.version} has none; use bid_pctr")
            weights = weights * pcvr
        value = pctr * weights
    explore = _explore_decision(state, opts.get("explore", False), pred)
    seed = opts.get("seed")
    info: dict[str, Any] = {"reason": explore}
    tr = None
    if explore == "explored":
        assert pred.logit is not None and pred.rows is not None and pred.row_var is not None
        post = JointPosterior.from_rows(pred.logit, pred.rows,
                                        pred.row_var * settings.explore_temperature)
        tr = thompson_rank(post, weights=weights, propensity_ranks=top_k or 0,
                           draws=settings.explore_draws,
                           rng=state.rng if seed is None else generator(seed))
        order = tr.order
        cost = exploration_cost(value, order, top_k or 1)
        state.budget.record(cost)
        state.metrics.explore_cost.observe(cost)
        info.update(draws=tr.draws, seed=seed, cost=cost)
        scores = tr.scores
    else:
        order = np.argsort(-value, kind="stable")
        scores = value
    state.metrics.explore_decision(explore).inc()
    if explore in _ELIGIBLE:
        state.metrics.explore_cost_avg.set(state.budget.avg_cost)
    if top_k is not None:
        order = order[:top_k]
    request_id = req.get("request_id") or _new_id()
    order_l = order.tolist()
    if tr is None:
        # Deterministic ranking: the ad at each rank was chosen with probability 1.
        props: list[float | None] = [1.0] * len(order_l)
    elif tr.propensities is None:
        props = [None] * len(order_l)  # no top_k: no shown ranks to estimate
    else:
        props = tr.propensities.tolist()
    # Columns in rank order first, then one dict per candidate from a zip: indexing lists per
    # item and adding keys afterwards cost ~60 us of a 100-candidate request.
    ad_ids = [cands[j][0] for j in order_l]
    ranks = range(1, len(order_l) + 1)
    pctr_o = pctr[order].tolist()
    score_o = scores[order].tolist()
    if pred.logit_var is not None and pred.logit is not None:
        # Only for the candidates returned (top_k of them when given), in rank order.
        var = pred.logit_var[order]
        mean_o = expected_pctr(pred.logit[order], var).tolist()
        std_o = np.sqrt(var).tolist()
        if tr is None:
            out = [{"ad_id": a, "rank": r, "pctr": p, "score": sc, "propensity": q,
                    "pctr_mean": m, "logit_std": sd}
                   for a, r, p, sc, q, m, sd in zip(ad_ids, ranks, pctr_o, score_o, props,
                                                    mean_o, std_o, strict=True)]
        else:
            sample_o = (1.0 / (1.0 + np.exp(-tr.logits[order]))).tolist()
            out = [{"ad_id": a, "rank": r, "pctr": p, "score": sc, "propensity": q,
                    "pctr_mean": m, "logit_std": sd, "pctr_sample": ps}
                   for a, r, p, sc, q, m, sd, ps in zip(ad_ids, ranks, pctr_o, score_o, props,
                                                        mean_o, std_o, sample_o, strict=True)]
    else:
        out = [{"ad_id": a, "rank": r, "pctr": p, "score": sc, "propensity": q}
               for a, r, p, sc, q in zip(ad_ids, ranks, pctr_o, score_o, props, strict=True)]
    if pcvr is not None:
        pcvr_l = pcvr.tolist()
        for item, j in zip(out, order_l, strict=True):
            item["pcvr"] = pcvr_l[j]
        if pred.pcvr_by_type is not None:
            types = served.cvr_types
            for item, row in zip(out, pred.pcvr_by_type[order_l].tolist(), strict=True):
                item["pcvr_by_type"] = dict(zip(types, row, strict=True))
    records = []
    if log_on:
        ts = req.get("ts") or time.time()
        serial = request_id if "request_id" not in req else _new_id()
        version = served.version
        for item, j in zip(out, order_l, strict=True):
            _, advertiser_id, features = cands[j]
            imp_id = item["impression_id"] = f"{serial}.{item['rank']}"
            event = {"impression_id": imp_id, "ts": ts, "user_id": user_id,
                     "ad_id": item["ad_id"], "advertiser_id": advertiser_id,
                     "features": {**shared, **features}, "position": item["rank"],
                     "model_version": version, "propensity": item["propensity"],
                     "request_id": request_id}
            try:
                records.append((topic, imp_id.encode(), _impression_record(event)))
            except InvalidEvent as e:
                return _error(422, f"options.log: the impression of candidate "
                                   f"{item['ad_id']!r} would break the event contract, so it "
                                   f"is not logged: {e.reason}")
    logged = bool(records) and state.sink is not None and state.sink.log(records)
    if records and not logged:
        # Not handed to a live producer (Kafka down): no ids, so no click is reported for an
        # impression the trainer will never see.
        for item in out:
            del item["impression_id"]
    state.metrics.candidates_scored.inc(n)
    by_status[served.status].inc()
    state.requests += 1
    if served.encoder is not None and state.requests % REMEMBER_EVERY == 0:
        state.holder.remember_rows(served.encoder.encode_request(shared, user_id, cands[:8]))
    return _json(200, {"request_id": request_id, "model_version": served.version,
                       "model_status": served.status, "explored": tr is not None,
                       "exploration": info, "logged": logged, "candidates": out},
                 state.worker_header)


def _loggable(req: ScoreRequest, shared: dict[str, Any],
              cands: list[tuple[str, str, dict[str, Any]]], max_ahead_s: float) -> str | None:
    """Why a request with options.log cannot be logged (before anything is scored), or None.

    Checked for every candidate, not only the top_k shown: which are shown is only known after
    scoring, and a request whose ads cannot all be logged is a caller's mistake either way."""
    ts = req.get("ts")
    if ts is not None:
        try:
            check_not_ahead(ts, time.time(), max_ahead_s)
        except InvalidEvent as e:
            return f"ts: the logged impressions would carry it: {e.reason}"
    n_shared = len(shared)
    for ad_id, _, features in cands:
        # Merged as logged (candidate features override the request's of the same name).
        if n_shared + len(features) > MAX_FEATURES and len({**shared, **features}) > MAX_FEATURES:
            return (f"candidate {ad_id!r}: its features merged with the request's make "
                    f"{len({**shared, **features})} entries; a logged impression may have at "
                    f"most {MAX_FEATURES} (the event contract), so send fewer or options.log=false")
    return None


def _impression_record(event: dict[str, Any]) -> bytes:
    """A logged impression's Kafka value, refused (InvalidEvent) where the trainer's decoder
    would dead-letter it. parse_impression is the validator decode_event runs on the decoded
    value, and orjson gives back what it wrote, so checking the dict and the encoded size is
    decode_event's verdict without a decode per impression on the request path (a property
    test holds them equal)."""
    parse_impression(event)
    return check_encoded_size(orjson.dumps(event))


# Decisions where the request asked to explore and the model could: they count toward the
# running cost that CTRLOOP_EXPLORE_COST_CAP bounds.
_ELIGIBLE = frozenset({"explored", "cost_cap", "share_cap"})


def _explore_decision(state: ServiceState, asked: bool, pred: Prediction) -> str:
    if not asked:
        return "not_requested"
    if not state.settings.explore:
        return "disabled"
    if pred.row_var is None:
        return "no_posterior"
    decision = state.budget.admit()
    if decision != "explored":
        state.budget.record(0.0)
    return decision


# ---------------------------------------------------------------------------- /v1/events

def _event_routes(app: FastAPI, state: ServiceState) -> None:
    settings, metrics = state.settings, state.metrics
    topic_of = settings.topic_of

    @app.post("/v1/events", status_code=202, response_model=EventsAccepted,
              responses={**_ERRORS, 503: {"model": ErrorBody,
                                          "description": "Kafka unavailable; retry later"}},
              openapi_extra=_body_doc("EventsRequest"), tags=["events"],
              summary="Accept impression/click/conversion events")
    @_timed(state, "/v1/events")
    async def events(request: Request) -> Response:
        """A batch of events (docs/events.md). Answers 202 only after Kafka acknowledged every
        one; 503 with Retry-After when Kafka is down (nothing in the batch was acknowledged:
        retry it). An invalid event rejects the whole batch with 422 naming each bad event."""
        try:
            # The contract's decoder: a NaN or invalid UTF-8 is named as such, as Kafka's is.
            body = await request.body()
            doc = loads_json(body)
        except InvalidEvent as e:
            return _error(400, f"request body is {e.reason}")
        if (problem := duplicate_key(body, doc)) is not None:
            return _error(400, problem)
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            return _error(422, 'the body must be an object {"events": [event, ...]}')
        extra = sorted(set(doc) - {"events"})
        if extra:
            return _error(422, f"unknown top-level field(s) {extra}; only 'events' is allowed")
        raw = doc["events"]
        if not 1 <= len(raw) <= settings.max_events_per_request:
            return _error(422, f"{len(raw)} events; send 1-{settings.max_events_per_request} "
                               "per request (CTRLOOP_MAX_EVENTS_PER_REQUEST)")
        # One clock reading for the batch; the bound protects the trainer's event time from a
        # single far-future event (issue 10 B), and encode_checked refuses what the trainer's
        # decoder would dead-letter for its size (G): what is accepted here is learned there.
        now, ahead = time.time(), settings.max_event_ahead_s
        parsed, errors = [], []
        for i, d in enumerate(raw):
            try:
                ev = parse_event(d)
                check_not_ahead(ev.ts, now, ahead)
                parsed.append((ev, encode_checked(ev)))
            except InvalidEvent as e:
                errors.append({"index": i, "reason": e.reason})
        if errors:
            metrics.events_rejected.inc(len(errors))
            return _error(422, {"message": f"{len(errors)} of {len(raw)} events are invalid; "
                                           "nothing was accepted",
                                "errors": errors[:MAX_ERRORS_SHOWN]})
        records, by_type = [], {}
        for ev, data in parsed:
            kind = event_type(ev)
            by_type[kind] = by_type.get(kind, 0) + 1
            records.append((topic_of[kind], ev.impression_id.encode(), data))
        if state.sink is None:
            return _error(503, "this service has no event sink configured",
                          {"Retry-After": str(settings.retry_after_s)})
        try:
            await run_in_threadpool(state.sink.produce, records)
        except SinkUnavailable as e:
            metrics.events_unavailable.inc()
            return _error(503, f"{e}; nothing in this batch was acknowledged, retry it after "
                               f"{settings.retry_after_s} s",
                          {"Retry-After": str(settings.retry_after_s)})
        for kind, k in by_type.items():
            metrics.events_produced.labels(kind).inc(k)
        return _json(202, {"accepted": len(records), "by_type": by_type})


# ---------------------------------------------------------------------------- models, health

def _example(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": {JSON: {"example": body}}}


_MODELS_EXAMPLE = {
    "serving": {"version": "42", "status": "trained", "loaded_at": 1767225601.2,
                "load_seconds": 0.031, "model": "fwfm", "spec_hash": "d1d76588fb80d1fe",
                "published_at": 1767225600.9, "samples_seen": 1250000,
                "metrics": {"auc": 0.71, "logloss": 0.118, "calibration": 1.01}},
    "reloader": {"reloads": 41, "reload_failures": {}, "refused_versions": [],
                 "registry_reachable": True, "pinned": None},
    "registry": {"current": 42, "pinned": None, "versions": [38, 39, 40, 41, 42]},
}


def _model_routes(app: FastAPI, state: ServiceState) -> None:
    @app.get("/v1/models", tags=["models"], summary="What is served and what the registry has",
             responses={200: _example(_MODELS_EXAMPLE)})
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
        return _json(200, {"serving": state.holder.served.describe(),
                           "reloader": state.reloader.describe(), "registry": registry})

    @app.get("/healthz", tags=["health"], summary="Liveness",
             responses={200: _example({"status": "ok"})})
    async def healthz() -> Response:
        return _json(200, {"status": "ok"})

    @app.get("/readyz", tags=["health"], summary="Readiness",
             responses={200: _example({"ready": True, "model_version": "42",
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
        return _json(200 if state.ready else 503, body)

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics",
             response_class=PlainTextResponse)  # documents text/plain, not JSON
    async def prometheus() -> Response:
        return Response(render(state.metrics), media_type=CONTENT_TYPE)


# ---------------------------------------------------------------------------- admin

def _admin_routes(app: FastAPI, state: ServiceState) -> None:
    token = state.settings.admin_token
    auth_errors: dict[int | str, dict[str, Any]] = {
        200: _example({"pinned": 41, "serving": "41", "status": "pinned"}),
        401: {"model": ErrorBody}, 403: {"model": ErrorBody},
        404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 503: {"model": ErrorBody}}

    def denied(request: Request) -> Response | None:
        if token is None:
            return _error(403, "admin routes are disabled: start the service with "
                               "CTRLOOP_ADMIN_TOKEN set")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": "Bearer"})
        return None

    def unavailable(what: str, e: RegistryError) -> Response:
        return _error(503, f"{what}: {e}. Nothing was changed; still serving "
                           f"{state.holder.served.version}. Retry once the registry is "
                           "reachable and intact (GET /v1/models shows its state)")

    async def pin_to(version: int) -> Response:
        # Loaded and verified before the pin is written (Reloader.pin): a version that cannot
        # be served leaves no pin behind for every other process to follow.
        try:
            served = await run_in_threadpool(state.reloader.pin, version)
        except VersionNotFound as e:
            return _error(404, str(e))
        except RegistryError as e:
            return unavailable(f"cannot pin version {version}", e)
        except SnapshotError as e:
            return _error(409, f"version {version} was not pinned: it cannot be served ({e}); "
                               f"still serving {state.holder.served.version}")
        return _json(200, {"pinned": version, "serving": served.version,
                           "status": served.status})

    @app.post("/v1/admin/pin", tags=["admin"], responses={**_ERRORS, **auth_errors},
              openapi_extra=_body_doc("PinRequest"), summary="Serve one version everywhere")
    async def pin(request: Request) -> Response:
        """Every service process serves `version` (loaded and verified as usual) until
        unpinned; new publications are ignored meanwhile."""
        if (r := denied(request)) is not None:
            return r
        try:
            body = PinRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _invalid_body(e)
        return await pin_to(body.version)

    @app.post("/v1/admin/rollback", tags=["admin"], responses=auth_errors,
              summary="Pin the newest version older than the one served")
    async def rollback(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        served = state.holder.served.number
        try:
            older = [v for v in await run_in_threadpool(state.registry.versions) if v < served]
        except RegistryError as e:
            return unavailable("cannot roll back", e)
        if not older:
            return _error(409, f"no version older than {served} is kept in the registry")
        return await pin_to(max(older))

    @app.post("/v1/admin/unpin", tags=["admin"], responses=auth_errors,
              summary="Follow the newest published version again")
    async def unpin(request: Request) -> Response:
        if (r := denied(request)) is not None:
            return r
        # The current version is verified before the pin is removed (Reloader.unpin).
        try:
            served = await run_in_threadpool(state.reloader.unpin)
        except RegistryError as e:
            return unavailable("cannot unpin", e)
        except SnapshotError as e:
            return _error(409, f"the pin is kept: the current version cannot be served ({e}); "
                               "pin another version or publish a good one")
        return _json(200, {"pinned": None, "serving": served.version, "status": served.status})


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
