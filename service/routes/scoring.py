"""POST /v1/score: rank one request's candidates and, with options.log, log the shown ones.

The handler reads the raw body and validates it with the schema's own TypeAdapter
(`SCORE_REQUEST.validate_json`, the one definition the OpenAPI also documents); `FastRoute`
serves it ahead of FastAPI's router. The ranking itself is `ctrloop.service.ranking` (pure);
this module decides what may be done (limits, logging, exploring), and turns the ranking into
the response and the logged impressions.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ctrloop.core.errors import InvalidEvent
from ctrloop.core.events import (
    MAX_FEATURES,
    Impression,
    check_encoded_size,
    check_not_ahead,
    to_dict,
)
from ctrloop.core.exploration import expected_pctr, generator, rank_weights
from ctrloop.service.asgi import BodyHandler
from ctrloop.service.ranking import Explore, Ranking, rank
from ctrloop.service.responses import error, invalid_body, json_response
from ctrloop.service.routes.common import ERRORS, body_doc, timed
from ctrloop.service.schemas import (
    SCORE_REQUEST,
    RankBy,
    ScoreRequest,
    ScoreResponse,
    check_feature_names,
    duplicate_key_in_request,
)
from ctrloop.service.scoring import Prediction, ServedModel
from ctrloop.service.state import ServiceState

# Ids: a random prefix per process plus a counter. Unique across workers and restarts with
# overwhelming probability, and ~1 us instead of uuid4's ~3 (measured on the request path).
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count()
REMEMBER_EVERY = 64  # keep every 64th request's rows as warm-up inputs for the next model
# Decisions where the request asked to explore and the model could: they count toward the
# running cost that CTRLOOP_EXPLORE_COST_CAP bounds.
_ELIGIBLE = frozenset({"explored", "cost_cap", "share_cap"})
Cands = list[tuple[str, str, dict[str, Any]]]


def _new_id() -> str:
    return f"{_ID_PREFIX}{next(_ids):x}"


def install(app: FastAPI, state: ServiceState) -> BodyHandler:
    """Declares POST /v1/score and returns its handler, which `FastRoute` serves directly."""
    topic = state.settings.topic_impressions
    by_status = {s: state.metrics.scores_by_model.labels(s)
                 for s in ("prior", "trained", "pinned")}

    @timed(state, "/v1/score")
    async def handle(read_body: Callable[[], Awaitable[bytes]]) -> Response:
        req = read_request(await read_body())
        if isinstance(req, Response):
            return req
        return score(state, req, topic, by_status)

    @app.post("/v1/score", response_model=ScoreResponse, responses=ERRORS,
              openapi_extra=body_doc("ScoreRequest"), tags=["scoring"],
              summary="Rank candidate ads for one request")
    async def score_route(request: Request) -> Response:
        """pCTR for every candidate, ranked by `score` (bid × pCTR by default). With
        `options.log`, each of the `top_k` is logged to Kafka as an impression with the exact
        features scored, and its `impression_id` is returned for reporting clicks."""
        # FastRoute answers first; this route documents the endpoint and is its fallback.
        return await handle(request.body)

    return handle


def read_request(body: bytes) -> ScoreRequest | Response:
    """The validated request, or the 4xx that says what is wrong with the body."""
    try:
        req = SCORE_REQUEST.validate_json(body)
    except ValidationError as e:
        return invalid_body(e, body)
    if (problem := check_feature_names(req)) is not None:
        return error(422, problem)
    # pydantic keeps a repeated key's last value; the service refuses to guess (400).
    if (problem := duplicate_key_in_request(body, req)) is not None:
        return error(400, problem)
    return req


def score(state: ServiceState, req: ScoreRequest, topic: str,
          by_status: dict[str, Any]) -> Response:
    """One validated request, scored, ranked and (with options.log) logged."""
    served = state.holder.served  # read once: this request finishes on this model
    opts = req.get("options") or {}
    shared = req.get("features") or {}
    cands: Cands = [(c["ad_id"], c["advertiser_id"], c.get("features") or {})
                    for c in req["candidates"]]
    if (problem := _refusal(state, req, served, shared, cands)) is not None:
        return error(422, problem)
    pred = served.predict_full(shared, req["user_id"], cands,
                               with_variance=served.posterior is not None,
                               conversion_type=opts.get("conversion_type"))
    rank_by = opts.get("rank_by", "bid_pctr")
    if rank_by == "bid_pctr_pcvr" and pred.pcvr is None:
        return error(422, f"rank_by bid_pctr_pcvr needs a pCVR model, and version "
                          f"{served.version} has none; use bid_pctr")
    weights = _weights(rank_by, req, pred)
    ranking, info = _rank(state, opts, pred, weights)
    request_id = req.get("request_id") or _new_id()
    out = _candidates_out(ranking, pred, served, cands)
    logged = False
    if opts.get("log", False):
        records = _impressions(req, request_id, out, ranking, served, shared, cands, topic)
        if isinstance(records, str):
            return error(422, records)
        logged = _log(state, records, out)
    _count(state, served, by_status, shared, req["user_id"], cands)
    return json_response(200, {"request_id": request_id, "model_version": served.version,
                               "model_status": served.status, "explored": ranking.explored,
                               "exploration": info, "logged": logged, "candidates": out},
                         state.worker_header)


def _refusal(state: ServiceState, req: ScoreRequest, served: ServedModel,
             shared: dict[str, Any], cands: Cands) -> str | None:
    """Why this request cannot be served as asked (a 422), or None; before any scoring."""
    settings = state.settings
    opts = req.get("options") or {}
    if len(cands) > settings.max_candidates:
        return (f"{len(cands)} candidates, at most {settings.max_candidates} per request "
                "(CTRLOOP_MAX_CANDIDATES); split the request")
    if opts.get("log", False):
        if opts.get("top_k") is None:
            return ("options.log needs options.top_k: the number of ads shown, which are the "
                    "ones logged as impressions")
        if not settings.log_impressions:
            return ("impression logging is off on this service (CTRLOOP_LOG_IMPRESSIONS=false);"
                    " send options.log=false")
        if problem := _loggable(req, shared, cands, settings.max_event_ahead_s):
            return problem
    ctype = opts.get("conversion_type")
    if ctype is not None and ctype not in served.cvr_types:
        return _conversion_type_error(served, ctype)
    return None


def _conversion_type_error(served: ServedModel, ctype: str) -> str:
    if served.cvr is None:
        return (f"options.conversion_type {ctype!r} needs a pCVR model, and version "
                f"{served.version} has none; omit it")
    if not served.cvr_types:
        return (f"version {served.version}'s pCVR model learns one task for every conversion "
                f"type; omit options.conversion_type")
    return (f"unknown conversion type {ctype!r}; version {served.version}'s pCVR model "
            f"learns {', '.join(served.cvr_types)}")


def _loggable(req: ScoreRequest, shared: dict[str, Any], cands: Cands,
              max_ahead_s: float) -> str | None:
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


def _weights(rank_by: RankBy, req: ScoreRequest, pred: Prediction) -> np.ndarray | None:
    """What multiplies pCTR in the score (None: pCTR itself): bid, or bid x pCVR."""
    if rank_by == "pctr":
        return None
    bids = np.array([c.get("bid") or 1.0 for c in req["candidates"]])
    return rank_weights(rank_by, bids, pred.pcvr)


def _rank(state: ServiceState, opts: Any, pred: Prediction, weights: np.ndarray | None
          ) -> tuple[Ranking, dict[str, Any]]:
    """The ranking, explored when asked and allowed; and the response's `exploration`."""
    decision = _explore_decision(state, opts.get("explore", False), pred)
    info: dict[str, Any] = {"reason": decision}
    explore = None
    seed = opts.get("seed")
    if decision == "explored":
        settings = state.settings
        explore = Explore(settings.explore_temperature, settings.explore_draws,
                          state.rng if seed is None else generator(seed))
    ranking = rank(pred.pctr, weights, opts.get("top_k"), explore=explore, logit=pred.logit,
                   rows=pred.rows, row_var=pred.row_var)
    metrics = state.metrics
    if ranking.cost is not None:
        state.budget.record(ranking.cost)
        metrics.explore_cost.observe(ranking.cost)
        info.update(draws=ranking.draws, seed=seed, cost=ranking.cost)
    metrics.explore_decision(decision).inc()
    if decision in _ELIGIBLE:
        metrics.explore_cost_avg.set(state.budget.avg_cost)
    return ranking, info


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


def _candidates_out(ranking: Ranking, pred: Prediction, served: ServedModel,
                    cands: Cands) -> list[dict[str, Any]]:
    """The response's candidates, in rank order."""
    order = ranking.order
    # Columns in rank order first, then one dict per candidate from a zip: indexing lists per
    # item and adding keys afterwards cost ~60 us of a 100-candidate request.
    columns: dict[str, list[Any]] = {
        "ad_id": [cands[j][0] for j in order], "rank": list(range(1, len(order) + 1)),
        "pctr": pred.pctr[order].tolist(), "score": ranking.scores,
        "propensity": ranking.propensities}
    if pred.logit_var is not None and pred.logit is not None:
        var = pred.logit_var[order]  # only for the candidates returned
        columns["pctr_mean"] = expected_pctr(pred.logit[order], var).tolist()
        columns["logit_std"] = np.sqrt(var).tolist()
        if ranking.pctr_sample is not None:
            columns["pctr_sample"] = ranking.pctr_sample
    if pred.pcvr is not None:
        columns["pcvr"] = pred.pcvr[order].tolist()
        if pred.pcvr_by_type is not None:
            types = served.cvr_types
            columns["pcvr_by_type"] = [dict(zip(types, row, strict=True))
                                       for row in pred.pcvr_by_type[order].tolist()]
    keys = tuple(columns)
    return [dict(zip(keys, values, strict=True))
            for values in zip(*columns.values(), strict=True)]


def _impressions(req: ScoreRequest, request_id: str, out: list[dict[str, Any]],
                 ranking: Ranking, served: ServedModel, shared: dict[str, Any],
                 cands: Cands, topic: str) -> list[tuple[str, bytes, bytes]] | str:
    """The shown candidates as the contract's Impressions, encoded for Kafka (and their ids
    set in `out`); or why one would break the contract (a 422)."""
    ts = req.get("ts") or time.time()
    serial = request_id if "request_id" not in req else _new_id()
    records = []
    for item, j in zip(out, ranking.order, strict=True):
        _, advertiser_id, features = cands[j]
        imp = Impression(impression_id=f"{serial}.{item['rank']}", ts=ts,
                         user_id=req["user_id"], ad_id=item["ad_id"],
                         advertiser_id=advertiser_id, features={**shared, **features},
                         position=item["rank"], model_version=served.version,
                         propensity=item["propensity"])
        try:
            records.append((topic, imp.impression_id.encode(), _encoded(imp, request_id)))
        except InvalidEvent as e:
            return (f"options.log: the impression of candidate {item['ad_id']!r} would break "
                    f"the event contract, so it is not logged: {e.reason}")
        item["impression_id"] = imp.impression_id
    return records


def _encoded(imp: Impression, request_id: str) -> bytes:
    """An impression's Kafka value by the contract's own code, plus the request it belongs to
    (off-policy evaluation groups impressions by it; the contract's parser ignores it).

    Every field is already what the contract's parser accepts: ids, ts and feature values were
    validated by the request's schema (its limits are the contract's constants), the merged
    feature count by `_loggable`, and position, version and propensity are the service's own.
    What remains is the encoded size (test_service_limits decodes whatever is logged with the
    trainer's decode_event)."""
    d = to_dict(imp)
    d["request_id"] = request_id
    return check_encoded_size(orjson.dumps(d))


def _log(state: ServiceState, records: list[tuple[str, bytes, bytes]],
         out: list[dict[str, Any]]) -> bool:
    """Hands the impressions to the producer; whether it took them."""
    logged = bool(records) and state.sink is not None and state.sink.log(records)
    if records and not logged:
        # Not handed to a live producer (Kafka down): no ids, so no click is reported for an
        # impression the trainer will never see.
        for item in out:
            del item["impression_id"]
    return logged


def _count(state: ServiceState, served: ServedModel, by_status: dict[str, Any],
           shared: dict[str, Any], user_id: str, cands: Cands) -> None:
    state.metrics.candidates_scored.inc(len(cands))
    by_status[served.status].inc()
    state.requests += 1
    if served.encoder is not None and state.requests % REMEMBER_EVERY == 0:
        state.holder.remember_rows(served.encoder.encode_request(shared, user_id, cands[:8]))
