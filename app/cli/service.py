"""``rag serve``, ``rag run`` and ``rag db upgrade``: running the service and its database schema."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from app.cli.common import console, limit_malloc_arenas, load_settings, quiet_model_loading, setup_logging


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``rag`` app."""
    app.command()(serve)
    app.command("run")(run)
    db = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
    db.command("upgrade")(db_upgrade)
    app.add_typer(db, name="db")


def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default: RAG_SERVER__HOST, else 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: RAG_SERVER__PORT, else 8000).")] = None,
) -> None:
    """Run the HTTP API (REST, SSE, websocket, OpenAI-compatible); OpenAPI docs at /docs."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(server=overrides) if overrides else load_settings()
    quiet_model_loading(settings.server.log_level != "debug")
    import uvicorn

    from app.main import create_app
    from app.observability import configure_logging

    configure_logging(settings.server.log_level)
    limit_malloc_arenas()
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        proxy_headers=settings.server.proxy_headers,
        timeout_graceful_shutdown=10,
    )


def run() -> None:
    """Start everything (what `make run` does): migrations, the model server, the ingestion worker and
    the API; prints the URL once /readyz answers ok."""
    from serving.supervisor import run_stack

    setup_logging(False)
    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    raise typer.Exit(run_stack(settings))


def db_upgrade(revision: str = "head") -> None:
    """Apply migrations (SQLite under RAG_DATA_DIR by default, or RAG_DATABASE__URL)."""
    from core.db.migrate import upgrade

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url, revision)
    console.print(f"database at [bold]{revision}[/]")
