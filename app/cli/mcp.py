"""``rag mcp``: the MCP server over stdio, for desktop clients (Claude Desktop, IDEs, ``mcp`` CLIs).

The client starts ``rag mcp`` and talks JSON-RPC on its stdin/stdout; logs go to stderr only.
The process is its own composition root (database, embedder, index, model-server client through
:func:`app.resources.build_resources`) and serves the same tools and resources as ``/mcp`` in the
API (:mod:`app.api.mcp_server`). It acts for one local user: with an API key (``--key`` or
``RAG_CLI__API_KEY``) it sees exactly that key's collections and counts against its limits; without
one it is the local administrator, like ``rag search --local``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli.common import VerboseOpt, fail, load_settings, setup_logging

if TYPE_CHECKING:
    from app.resources import Resources
    from app.services.keys import Principal
    from core.settings import Settings


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``rag`` app."""
    app.command("mcp")(mcp)


def mcp(
    key: Annotated[
        str | None,
        typer.Option("--key", envvar="RAG_CLI__API_KEY", help="Act as this API key (its collections only)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve the search, ask and document tools over MCP on stdin/stdout (for desktop clients)."""
    from app.services.errors import Unauthorized

    setup_logging(verbose)  # stderr: stdout belongs to the protocol
    settings = load_settings()
    try:
        asyncio.run(_serve(settings, key))
    except Unauthorized as e:
        fail(e.message)


async def _serve(settings: Settings, token: str | None) -> None:
    from app.api.mcp_server import Caller, build_server
    from app.main import package_version
    from app.resources import build_resources
    from core.wiring import configure_tracing

    tracing = configure_tracing(settings)  # each MCP message is a trace (the SDK's own spans)
    resources = await build_resources(settings)
    try:
        caller = Caller(resources, await _principal(resources, token))

        async def resolve(ctx: object) -> Caller:
            # Per call, as every HTTP request is counted: a key's rate limit holds on stdio too.
            resources.admission.keys.hit(caller.principal)
            return caller

        await build_server(resolve, version=package_version()).run_stdio_async()
    finally:
        await resources.aclose()
        if tracing is not None:
            tracing.shutdown()


async def _principal(resources: Resources, token: str | None) -> Principal:
    """The key's principal, or the local administrator without a key.

    Raises:
        Unauthorized: An unknown or revoked key.
    """
    from app.services import keys

    if token is None:
        return keys.ANONYMOUS_ADMIN
    async with resources.sessionmaker() as session:
        principal = await keys.authenticate(session, token, touch_every=resources.settings.auth.touch_every_seconds)
        await session.commit()
    return principal
