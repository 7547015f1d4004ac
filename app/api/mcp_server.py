"""The service as an MCP server (Model Context Protocol, the official ``mcp`` SDK).

Tools: ``search`` (ranked chunks with locations and per-leg scores), ``ask`` (an answer with
citations; while it streams, every answer event goes out as a progress notification whose
``message`` is the event's wire JSON, exactly what SSE and the websocket send), ``list_collections``
and ``get_document_chunk``. Resources: ``rag://{collection}/documents/{document_id}`` is a
document's extracted text.

Two transports, one server definition (:func:`build_server`):

* **streamable HTTP** at ``/mcp`` inside the API (:func:`mount`, called by ``create_app``). Every
  POST is authenticated like a route (:func:`app.api.deps.admit`: bearer key, per-key rate); the
  principal travels in the request's scope state, so each tool call acts for the key of its own
  HTTP request. Stateless mode: no session lives between requests, so any API replica answers.
* **stdio** (``rag mcp``, :mod:`app.cli.mcp`): one process for one local user, whose principal is
  fixed when the process starts.

Tools never re-implement a rule: requests are validated by the REST request models, scoping is
:mod:`app.services.search` / :mod:`app.services.collections`, admission (gates, per-key streams)
is :mod:`app.api.answering` and the search service, errors are described by
:func:`app.api.errors.error_event`. A refused call (out-of-scope collection, overload, ...) is a
tool result with ``isError`` and the service's message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api import answering
from app.api.deps import admit
from app.api.errors import error_event
from app.resources import Resources
from app.schemas.ask import AskRequest
from app.schemas.collections import CollectionList, CollectionOut
from app.schemas.common import DOCUMENT_URI
from app.schemas.events import ChunkOut, DoneEvent, chunk_out, to_wire, wire_dict
from app.schemas.search import SearchRequest, SearchResponse
from app.services import collections, documents
from app.services import search as search_service
from app.services.errors import AnswerFailed, NotFound
from app.services.keys import Principal
from generation.client import aclosing_iter
from generation.rag import AnswerMode
from generation.types import DoneEvent as DomainDone
from generation.types import ErrorEvent as DomainError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

PATH = "/mcp"
"""Where ``create_app`` mounts the streamable HTTP transport."""

INSTRUCTIONS = """\
Question answering over the user's own documents. `list_collections` shows what you may read;
`search` returns ranked passages with their file, page and character offsets; `ask` answers with
`[n]` citations of those passages; `get_document_chunk` and the `rag://{collection}/documents/{id}`
resources return the source text."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a tool call acts for and the process's objects it uses."""

    resources: Resources
    principal: Principal


CallerResolver = Callable[["Context[Any, Any]"], Awaitable[Caller]]
"""Finds the :class:`Caller` of a tool call (the HTTP request's principal, or stdio's fixed one)."""


def _validated(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as the REST request ``model`` (same limits), or a tool error naming the field."""
    try:
        return model.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "arguments"
        raise ToolError(f"invalid_input: {where}: {first['msg']}") from e


def _refusal(exc: Exception) -> ToolError:
    """The tool error for a service error (the same code and message REST would send)."""
    event = error_event(exc)
    return ToolError(f"{event.code}: {event.message}")


def build_server(resolve: CallerResolver, *, version: str = "") -> MCPServer[Any]:
    """The MCP server with every tool and resource; ``resolve`` tells who each call acts for."""
    server: MCPServer[Any] = _quiet_server(version)

    @server.tool(title="Search passages")
    async def search(
        query: str,
        ctx: Context[Any, Any],
        collections: list[str] | None = None,
        mode: Literal["hybrid", "dense", "sparse"] | None = None,
        k: int = 10,
    ) -> SearchResponse:
        """Hybrid (dense + BM25) search. Returns ranked chunks: their collection, file path,
        page, character offsets, text, fused score and each leg's rank and score. Without
        `collections`, searches every collection you may read."""
        caller = await resolve(ctx)
        body = _validated(SearchRequest, {"query": query, "collections": collections, "mode": mode, "k": k})
        res = caller.resources
        options = search_service.search_options(res.retriever.defaults, mode=body.mode)
        try:
            async with res.sessionmaker() as session:
                outcome = await search_service.search(
                    session,
                    caller.principal,
                    retriever=res.retriever,
                    store=res.store,
                    metrics=res.metrics,
                    gate=res.admission.searches,
                    query=body.query,
                    k=body.k,
                    collections=body.requested(),
                    path_prefix=None,
                    options=options,
                )
        except Exception as e:
            raise _refusal(e) from e
        return SearchResponse.build(
            body.query, outcome.options, outcome.collections, outcome.hits, outcome.took_ms, outcome.unavailable
        )

    @server.tool(title="Answer a question")
    async def ask(
        question: str,
        ctx: Context[Any, Any],
        collections: list[str] | None = None,
        mode: AnswerMode | None = None,
        k: int | None = None,
        max_tokens: int | None = None,
    ) -> DoneEvent:
        """Answer `question` from the documents, citing sources as `[n]`. Returns the answer, its
        citations (chunk, file, page, supporting span), the retrieval rounds, token usage and
        timings. While the answer streams, each event (retrieval, token, citation) is sent as a
        progress notification whose message is the event as JSON."""
        caller = await resolve(ctx)
        request = _validated(
            AskRequest,
            {"question": question, "collections": collections, "mode": mode, "k": k, "max_tokens": max_tokens},
        )
        res = caller.resources
        try:
            plan = await answering.prepare(res, caller.principal, request)
            step = 0
            events = answering.events(res, plan, caller.principal, transport="mcp")
            async with aclosing_iter(events) as stream:
                async for event in stream:
                    step += 1
                    message = json.dumps(wire_dict(event), ensure_ascii=False, separators=(",", ":"))
                    await ctx.report_progress(step, None, message)
                    if isinstance(event, DomainDone):
                        done = to_wire(event)
                        assert isinstance(done, DoneEvent)
                        return done
                    if isinstance(event, DomainError):
                        raise AnswerFailed(event.code, event.message, retryable=event.retryable)
        except Exception as e:
            raise _refusal(e) from e
        raise ToolError("internal_error: the answer ended without a result")

    @server.tool(title="List collections")
    async def list_collections(ctx: Context[Any, Any]) -> CollectionList:
        """The collections you may read, with their document and chunk counts."""
        caller = await resolve(ctx)
        async with caller.resources.sessionmaker() as session:
            infos = await collections.list_visible(session, caller.principal, configured=caller.resources.recipe)
        return CollectionList(collections=[CollectionOut.from_info(i) for i in infos])

    @server.tool(title="Get a chunk")
    async def get_document_chunk(chunk_id: int, ctx: Context[Any, Any]) -> ChunkOut:
        """One chunk (a passage of a document) by its id, as `search` and citations name it:
        text, file path, page, character offsets, heading."""
        caller = await resolve(ctx)
        try:
            async with caller.resources.sessionmaker() as session:
                chunk = await documents.get_chunk(session, caller.principal, chunk_id)
        except Exception as e:
            raise _refusal(e) from e
        return chunk_out(chunk)

    @server.resource(
        DOCUMENT_URI,
        name="document",
        title="Document text",
        description="A document's extracted text, put back together from its chunks.",
        mime_type="text/plain",
    )
    async def document(collection: str, document_id: str, ctx: Context[Any, Any]) -> str:
        caller = await resolve(ctx)
        try:
            async with caller.resources.sessionmaker() as session:
                return await documents.document_text(
                    session, caller.principal, collection=collection, document_id=int(document_id)
                )
        except (NotFound, ValueError) as e:  # an unknown, out-of-scope or non-numeric document
            raise ResourceNotFoundError(f"document {document_id!r} not found in collection {collection!r}") from e
        except Exception as e:
            raise ResourceError(str(_refusal(e))) from e

    return server


def _quiet_server(version: str) -> MCPServer[Any]:
    """An ``MCPServer`` that leaves the process's logging alone.

    Its constructor calls ``logging.basicConfig`` with a rich handler at INFO when the root logger
    has none yet; in the API (configured by ``rag serve``) and in tests that would change every
    logger's output, so the root logger's handlers and level are put back as they were.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return MCPServer("ragsvc", version=version, instructions=INSTRUCTIONS, log_level="WARNING")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


async def _http_caller(ctx: Context[Any, Any]) -> Caller:
    """The caller of a tool called over HTTP: :class:`Authenticated` put the principal in the scope."""
    request = ctx.request_context.request
    if request is None:  # pragma: no cover - this resolver is only installed on the HTTP transport
        raise ToolError("internal_error: a tool call without its HTTP request")
    scope: Scope = request.scope
    return Caller(scope["app"].state.resources, scope["state"]["principal"])


class Authenticated:
    """ASGI wrapper of the MCP endpoint: every HTTP request is admitted like a route's
    (:func:`app.api.deps.admit`). A refusal raises the service error, which the application's
    error handlers turn into the one documented error response (401, 429, ...)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            resources: Resources = scope["app"].state.resources
            token = _bearer(scope)
            scope.setdefault("state", {})["principal"] = await admit(resources, token, scope)
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def mount(app: Starlette, *, host: str, version: str = "") -> StreamableHTTPSessionManager:
    """Add the streamable HTTP transport at :data:`PATH` to ``app``.

    Returns:
        The session manager; the application's lifespan must run it (``async with manager.run()``).
    """
    server = build_server(_http_caller, version=version)
    # host: the SDK turns on its DNS-rebinding protection (Host/Origin checks) for a loopback bind,
    # where a browser page could otherwise reach a local, auth-less API.
    server.streamable_http_app(stateless_http=True, host=host)
    manager = server.session_manager
    app.router.routes.append(
        Route(PATH, endpoint=Authenticated(StreamableHTTPASGIApp(manager)), methods=["GET", "POST", "DELETE"])
    )
    return manager
