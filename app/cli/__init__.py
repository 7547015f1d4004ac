"""The ``rag`` command line: one module per command group, assembled by :func:`build_app`.

Importing this package (or any module of it) does nothing but define functions: the Typer app is
built when :func:`main` runs, and every command imports its heavy parts (torch, FAISS, the
embedding model, uvicorn) inside its body, so ``rag --help`` is instant. A missing part is an
``ImportError`` with its reason, never a silently absent command.

=================  ==========================================================
module             commands
=================  ==========================================================
``ingest``         ``rag ingest``, ``rag jobs``, ``rag worker``
``search``         ``rag search``
``remote``         (no command) the API client ``ask``/``search``/``jobs`` use when the API is up
``ask``            ``rag ask``
``evaluate``       ``rag eval retrieval``, ``rag eval answers``
``flare``          ``rag flare calibrate``
``keys``           ``rag keys create|list|revoke``
``mcp``            ``rag mcp`` (the MCP server over stdio)
``service``        ``rag serve``, ``rag run``, ``rag db upgrade``
``serving.cli``    ``rag llm prepare|serve|status`` (the embedded model server)
=================  ==========================================================

Adding a command: write a function in the module of its group (or a new module with a
``register(app)`` function) and list the module in :func:`build_app`.
"""

from __future__ import annotations

import sys

import typer


def build_app() -> typer.Typer:
    """The root ``rag`` app with every command group registered."""
    from app.cli import ask, evaluate, flare, ingest, keys, mcp, search, service
    from serving.cli import app as llm_app

    app = typer.Typer(no_args_is_help=True, add_completion=False, help="Self-hosted RAG question answering.")
    for module in (ingest, search, ask, evaluate, flare, keys, mcp, service):
        module.register(app)
    app.add_typer(llm_app, name="llm")
    return app


def main() -> None:
    """Console-script entry point (``rag``)."""
    from app.cli.common import err_console, quiet_model_loading

    quiet_model_loading(not {"--verbose", "-v"} & set(sys.argv[1:]))
    try:
        build_app()()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
