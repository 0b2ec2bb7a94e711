"""What the route modules share: timing and status counting, and OpenAPI fragments."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi.responses import Response

from ctrloop.service.asgi import TooLarge
from ctrloop.service.responses import JSON, error
from ctrloop.service.schemas import ErrorBody
from ctrloop.service.state import ServiceState

log = logging.getLogger("ctrloop.service.app")

_Arg = TypeVar("_Arg")
Handler = Callable[[_Arg], Awaitable[Response]]

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Body is not JSON"},
    413: {"model": ErrorBody, "description": "Body too large"},
    422: {"model": ErrorBody, "description": "Body breaks the schema; `detail` lists where"},
}


def body_doc(name: str) -> dict[str, Any]:
    """The request body of a route that validates its own raw body (documented by name)."""
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {JSON: {"schema": ref}}}}


def example(body: dict[str, Any]) -> dict[str, Any]:
    return {"content": {JSON: {"example": body}}}


def timed(state: ServiceState, route: str) -> Callable[[Handler[_Arg]], Handler[_Arg]]:
    """Times a handler and counts its statuses; an exception is a 500 (a bug), logged."""
    hist = state.metrics.request_seconds.labels(route)
    counters = {c: state.metrics.requests.labels(route, c) for c in ("2xx", "4xx", "5xx")}

    def wrap(fn: Handler[_Arg]) -> Handler[_Arg]:
        async def handler(request: _Arg) -> Response:
            t0 = time.perf_counter()
            try:
                response = await fn(request)
            except TooLarge:
                counters["4xx"].inc()
                raise  # BodyLimit answers 413 (a chunked body over the limit)
            except Exception:
                counters["5xx"].inc()
                log.exception("unhandled error in %s", route)
                return error(500, "internal error (a bug): see the service log")
            hist.observe(time.perf_counter() - t0)
            counters[f"{response.status_code // 100}xx"].inc()
            return response

        # Name, docstring and signature (via __wrapped__): FastAPI reads the parameters off
        # the route function to know that `request` is the Request.
        return functools.wraps(fn)(handler)

    return wrap
