"""The chat page: static files in ``app/static`` (no build step), served at ``/``; and the
OpenAPI docs pages (``/docs``, ``/redoc``) with their assets served locally.

``create_app`` calls :func:`mount_chat_page`; the page itself talks to the API like any client
(``/v1/collections``, ``/v1/conversations``, the websocket ``/v1/chat``), so it needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")


def mount_chat_page(app: FastAPI) -> None:
    """Serve ``app/static`` under ``/static`` and its ``index.html`` at ``/`` (left out of the OpenAPI schema)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        # Revalidated on every load, so a new version of the page is picked up at once.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's files as the ``fastapi-offline`` package ships them.

    Only its ``static/`` folder is used (``swagger-ui-bundle.js``, ``swagger-ui.css``,
    ``redoc.standalone.js``, ``favicon.png``), located without importing the package.

    Raises:
        RuntimeError: The package is not installed (it is a dependency of ragsvc).
    """
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fastapi-offline is not installed: pip install fastapi-offline (a ragsvc dependency)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def mount_api_docs(app: FastAPI, *, openapi_url: str = "/openapi.json") -> None:
    """Serve the interactive docs at ``/docs`` (Swagger UI) and ``/redoc`` with their JavaScript
    and CSS from this server, not a CDN: FastAPI's default pages were blank on an offline machine."""
    assets = "/docs-assets"
    app.mount(assets, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - API docs",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets}/favicon.png",
        )

    @app.get(oauth2_redirect, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets}/favicon.png",
            with_google_fonts=False,
        )
