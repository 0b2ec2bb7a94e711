"""POST /v1/admin/{pin,rollback,unpin}: operator control of the served version, behind
`Authorization: Bearer $CTRLOOP_ADMIN_TOKEN`."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError

from ctrloop.core.errors import RegistryError, SnapshotError
from ctrloop.io.registry import VersionNotFound
from ctrloop.service.responses import error, invalid_body, json_response
from ctrloop.service.routes.common import ERRORS, body_doc, example
from ctrloop.service.schemas import ErrorBody, PinRequest
from ctrloop.service.state import ServiceState

_AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    200: example({"pinned": 41, "serving": "41", "status": "pinned"}),
    401: {"model": ErrorBody}, 403: {"model": ErrorBody},
    404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 503: {"model": ErrorBody}}


def _denied(token: str | None, request: Request) -> Response | None:
    if token is None:
        return error(403, "admin routes are disabled: start the service with "
                          "CTRLOOP_ADMIN_TOKEN set")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return error(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                     {"WWW-Authenticate": "Bearer"})
    return None


def _unavailable(state: ServiceState, what: str, e: RegistryError) -> Response:
    return error(503, f"{what}: {e}. Nothing was changed; still serving "
                      f"{state.holder.served.version}. Retry once the registry is "
                      "reachable and intact (GET /v1/models shows its state)")


async def _pin_to(state: ServiceState, version: int) -> Response:
    # Loaded and verified before the pin is written (Reloader.pin): a version that cannot
    # be served leaves no pin behind for every other process to follow.
    try:
        served = await run_in_threadpool(state.reloader.pin, version)
    except VersionNotFound as e:
        return error(404, str(e))
    except RegistryError as e:
        return _unavailable(state, f"cannot pin version {version}", e)
    except SnapshotError as e:
        return error(409, f"version {version} was not pinned: it cannot be served ({e}); "
                          f"still serving {state.holder.served.version}")
    return json_response(200, {"pinned": version, "serving": served.version,
                               "status": served.status})


def install(app: FastAPI, state: ServiceState) -> None:
    token = state.settings.admin_token

    @app.post("/v1/admin/pin", tags=["admin"], responses={**ERRORS, **_AUTH_ERRORS},
              openapi_extra=body_doc("PinRequest"), summary="Serve one version everywhere")
    async def pin(request: Request) -> Response:
        """Every service process serves `version` (loaded and verified as usual) until
        unpinned; new publications are ignored meanwhile."""
        if (r := _denied(token, request)) is not None:
            return r
        try:
            body = PinRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return invalid_body(e)
        return await _pin_to(state, body.version)

    @app.post("/v1/admin/rollback", tags=["admin"], responses=_AUTH_ERRORS,
              summary="Pin the newest version older than the one served")
    async def rollback(request: Request) -> Response:
        if (r := _denied(token, request)) is not None:
            return r
        served = state.holder.served.number
        try:
            older = [v for v in await run_in_threadpool(state.registry.versions) if v < served]
        except RegistryError as e:
            return _unavailable(state, "cannot roll back", e)
        if not older:
            return error(409, f"no version older than {served} is kept in the registry")
        return await _pin_to(state, max(older))

    @app.post("/v1/admin/unpin", tags=["admin"], responses=_AUTH_ERRORS,
              summary="Follow the newest published version again")
    async def unpin(request: Request) -> Response:
        if (r := _denied(token, request)) is not None:
            return r
        # The current version is verified before the pin is removed (Reloader.unpin).
        try:
            served = await run_in_threadpool(state.reloader.unpin)
        except RegistryError as e:
            return _unavailable(state, "cannot unpin", e)
        except SnapshotError as e:
            return error(409, f"the pin is kept: the current version cannot be served ({e}); "
                              "pin another version or publish a good one")
        return json_response(200, {"pinned": None, "serving": served.version,
                                   "status": served.status})
