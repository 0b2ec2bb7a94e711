"""POST /v1/events: a batch of impression/click/conversion events, 202 once Kafka acked all."""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ctrloop.core.errors import InvalidEvent
from ctrloop.core.events import (
    Event,
    check_not_ahead,
    encode_checked,
    event_type,
    loads_json,
    parse_event,
)
from ctrloop.service.responses import MAX_ERRORS_SHOWN, error, json_response
from ctrloop.service.routes.common import ERRORS, body_doc, timed
from ctrloop.service.schemas import ErrorBody, EventsAccepted, duplicate_key
from ctrloop.service.sink import SinkUnavailable
from ctrloop.service.state import ServiceState


def install(app: FastAPI, state: ServiceState) -> None:
    settings = state.settings

    @app.post("/v1/events", status_code=202, response_model=EventsAccepted,
              responses={**ERRORS, 503: {"model": ErrorBody,
                                         "description": "Kafka unavailable; retry later"}},
              openapi_extra=body_doc("EventsRequest"), tags=["events"],
              summary="Accept impression/click/conversion events")
    @timed(state, "/v1/events")
    async def events(request: Request) -> Response:
        """A batch of events (docs/events.md). Answers 202 only after Kafka acknowledged every
        one; 503 with Retry-After when Kafka is down (nothing in the batch was acknowledged:
        retry it). An invalid event rejects the whole batch with 422 naming each bad event."""
        body = await request.body()
        raw = _event_list(body, settings.max_events_per_request)
        if isinstance(raw, Response):
            return raw
        parsed, errors = _parse_all(raw, settings.max_event_ahead_s)
        if errors:
            state.metrics.events_rejected.inc(len(errors))
            return error(422, {"message": f"{len(errors)} of {len(raw)} events are invalid; "
                                          "nothing was accepted",
                               "errors": errors[:MAX_ERRORS_SHOWN]})
        return await _produce(state, parsed)


def _event_list(body: bytes, most: int) -> list[Any] | Response:
    """The body's events, or the 4xx that says why it is not a batch of events."""
    try:
        # The contract's decoder: a NaN or invalid UTF-8 is named as such, as Kafka's is.
        doc = loads_json(body)
    except InvalidEvent as e:
        return error(400, f"request body is {e.reason}")
    if (problem := duplicate_key(body, doc)) is not None:
        return error(400, problem)
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        return error(422, 'the body must be an object {"events": [event, ...]}')
    extra = sorted(set(doc) - {"events"})
    if extra:
        return error(422, f"unknown top-level field(s) {extra}; only 'events' is allowed")
    raw: list[Any] = doc["events"]
    if not 1 <= len(raw) <= most:
        return error(422, f"{len(raw)} events; send 1-{most} per request "
                          "(CTRLOOP_MAX_EVENTS_PER_REQUEST)")
    return raw


def _parse_all(raw: list[Any], ahead: float
               ) -> tuple[list[tuple[Event, bytes]], list[dict[str, Any]]]:
    """Every event checked and encoded by the contract, and each bad one's index and reason."""
    # One clock reading for the batch; the bound protects the trainer's event time from a
    # single far-future event (issue 10 B), and encode_checked refuses what the trainer's
    # decoder would dead-letter for its size (G): what is accepted here is learned there.
    now = time.time()
    parsed, errors = [], []
    for i, d in enumerate(raw):
        try:
            ev = parse_event(d)
            check_not_ahead(ev.ts, now, ahead)
            parsed.append((ev, encode_checked(ev)))
        except InvalidEvent as e:
            errors.append({"index": i, "reason": e.reason})
    return parsed, errors


async def _produce(state: ServiceState, parsed: list[tuple[Event, bytes]]) -> Response:
    """Hands the batch to Kafka and waits for its acknowledgement (acks=all)."""
    settings, metrics = state.settings, state.metrics
    records, by_type = [], {}
    for ev, data in parsed:
        kind = event_type(ev)
        by_type[kind] = by_type.get(kind, 0) + 1
        records.append((settings.topic_of[kind], ev.impression_id.encode(), data))
    retry = {"Retry-After": str(settings.retry_after_s)}
    if state.sink is None:
        return error(503, "this service has no event sink configured", retry)
    try:
        await run_in_threadpool(state.sink.produce, records)
    except SinkUnavailable as e:
        metrics.events_unavailable.inc()
        return error(503, f"{e}; nothing in this batch was acknowledged, retry it after "
                          f"{settings.retry_after_s} s", retry)
    for kind, k in by_type.items():
        metrics.events_produced.labels(kind).inc(k)
    return json_response(202, {"accepted": len(records), "by_type": by_type})
