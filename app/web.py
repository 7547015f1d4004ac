"""The chat page: static files in ``app/static`` (no build step), served at ``/``.

``create_app`` calls :func:`mount_chat_page`; the page itself talks to the API like any client
(``/v1/collections``, ``/v1/conversations``, the websocket ``/v1/chat``), so it needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")


def mount_chat_page(app: FastAPI) -> None:
    """Serve ``app/static`` under ``/static`` and its ``index.html`` at ``/`` (left out of the OpenAPI schema)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        # Revalidated on every load, so a new version of the page is picked up at once.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
