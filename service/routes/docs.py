"""/docs from the package's own copy of Swagger UI (service/static/swagger-ui, swagger-ui-dist
5.36.0, Apache-2.0): FastAPI's default page loads it from a CDN, so it was blank offline and on
a locked-down network."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent.parent / "static"
SWAGGER = "/static/swagger-ui"


def install(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        root = request.scope.get("root_path", "")  # behind a proxy prefix, as FastAPI does
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{root}{SWAGGER}/favicon-32x32.png")
