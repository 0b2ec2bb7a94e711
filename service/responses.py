"""Response helpers every route shares: orjson bodies, and 4xx errors whose `detail` says what is
wrong (pydantic's errors without echoing inputs, the contract's JSON messages)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import ValidationError

from ctrloop.core.errors import InvalidEvent
from ctrloop.core.events import loads_json

JSON = "application/json"
MAX_ERRORS_SHOWN = 20
_FEATURE_RULE = ("must be a string (at most 1024 characters), a boolean, null, or a finite "
                 "number within ±1e12")


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=JSON, headers=headers)


def error(status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"detail": detail}, headers)


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


def invalid_body(e: ValidationError, body: bytes | None = None) -> Response:
    """400 for a body that is not JSON, else 422 listing where it breaks the schema."""
    errors = e.errors(include_url=False, include_input=False, include_context=False)
    if errors and errors[0]["type"] == "json_invalid":
        if body is not None:
            # The contract's decoder names NaN/Infinity and invalid UTF-8 (pydantic says
            # "expected value at column 62"): one wording for every entry point.
            try:
                loads_json(body)
            except InvalidEvent as ie:
                return error(400, f"request body is {ie.reason}")
        return error(400, f"request body is not valid JSON: {errors[0]['msg']}")
    return error(422, validation_detail(e))
