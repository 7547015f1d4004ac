"""The FastAPI application: ``create_app(settings)`` wires routes, middleware and error mapping;
its lifespan builds :class:`~app.resources.Resources` and closes them. Nothing happens at import.

``rag serve`` runs it under uvicorn; tests call ``create_app(test_settings, embedder=..., llm=...)``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from app.api import errors, mcp_server
from app.api.middleware import BodyLimit, InFlightLimit, RequestContext
from app.api.routes import ask, chat, collections, conversations, documents, health, jobs, openai, search
from app.observability import watch_loop_lag
from app.resources import LLMProbe, build_resources
from app.schemas.events import ANSWER_EVENT_ADAPTER, JOB_EVENT_ADAPTER
from app.schemas.openai import ChatCompletionChunk
from app.web import mount_api_docs, mount_chat_page
from core.settings import Settings
from core.wiring import configure_tracing
from generation.client import LLMClient
from retrieval.types import Embedder

DESCRIPTION = """\
Question answering over your own documents: hybrid (dense + BM25) retrieval and a local
model that cites its sources.

* **Collections** hold documents; upload files or queue a server folder, then **search** or **ask**.
* `POST /v1/ask/stream` streams `AnswerEvent`s as Server-Sent Events; the websocket `/v1/chat`
  sends the same events (see `docs/websocket.md`).
* `GET /v1/jobs/{id}/events` streams an ingestion job's `JobEvent`s (per-file progress, counters,
  rate, ETA) as Server-Sent Events; the websocket's `watch_job` sends the same events.
* `POST /v1/chat/completions` lets OpenAI clients use the service as the model `rag:<collection>`.
* `/mcp` is an MCP server (streamable HTTP): tools `search`, `ask`, `list_collections`,
  `get_document_chunk`, and document resources.
* Authenticate with `Authorization: Bearer rag_...` (keys from `rag keys create`) when auth is on.
"""


def package_version() -> str:
    """The installed ``ragsvc`` version (``0.0.0`` from a source tree that was never installed)."""
    try:
        return importlib.metadata.version("ragsvc")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _add_schema(schema: dict[str, Any], name: str, adapter: TypeAdapter[Any]) -> None:
    generated = adapter.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for def_name, definition in generated.pop("$defs", {}).items():
        components.setdefault(def_name, definition)
    components.setdefault(name, generated)


def _clean_event_streams(schema: dict[str, Any]) -> None:
    """An SSE response's schema is the event model alone (FastAPI adds ``type: string`` for text)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for response in operation.get("responses", {}).values():
                stream = response.get("content", {}).get("text/event-stream")
                if stream and "$ref" in stream.get("schema", {}):
                    stream["schema"] = {"$ref": stream["schema"]["$ref"]}


def create_app(
    settings: Settings | None = None,
    *,
    embedder: Embedder | None = None,
    llm: LLMClient | None = None,
    llm_probe: LLMProbe | None = None,
    span_exporter: Any = None,
) -> FastAPI:
    """Build the application.

    Args:
        settings: The configuration (default: from the environment, read now).
        embedder: Query embedder to use instead of loading the configured model (tests).
        llm: Model-server client to use instead of the configured one (tests).
        llm_probe: Readiness probe of the model server (tests).
        span_exporter: Trace into this OpenTelemetry exporter (tests: the SDK's in-memory one);
            otherwise tracing is on only with ``RAG_TELEMETRY__OTLP_ENDPOINT``.
    """
    settings = settings or Settings()
    tracing = configure_tracing(settings, exporter=span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        resources = await build_resources(settings, embedder=embedder, llm=llm, llm_probe=llm_probe)
        app.state.resources = resources
        app.state.metrics = resources.metrics
        lag = asyncio.create_task(watch_loop_lag(resources.metrics), name="loop-lag")
        try:
            async with mcp.run():
                yield
        finally:
            lag.cancel()
            await resources.aclose()
            if tracing is not None:
                tracing.shutdown()

    app = FastAPI(
        title="ragsvc",
        version=package_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own pages load Swagger UI from a CDN (blank offline); mount_api_docs serves it.
        docs_url=None,
        redoc_url=None,
    )
    errors.install(app, retry_after_seconds=settings.api.retry_after_seconds)
    for module in (health, collections, documents, jobs, search, ask, openai, conversations, chat):
        app.include_router(module.router)
    mcp = mcp_server.mount(app, host=settings.server.host, version=package_version())  # run by the lifespan
    mount_chat_page(app)
    if settings.api.docs:
        mount_api_docs(app)

    # Added last = outermost: the request id and the access log cover everything below; CORS
    # wraps the body limit so a browser can read a 413.
    app.add_middleware(BodyLimit, max_upload_mb=settings.api.max_upload_mb)
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.api.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContext)
    # Outside everything of ours: a shed request costs this check and a fixed 503, no request id,
    # no access line (counted in rag_http_shed_total; InFlightLimit says why).
    app.add_middleware(InFlightLimit, limit=settings.api.max_in_flight)
    if tracing is not None:
        # Outermost, so the request's span covers everything; per-message send/receive spans are
        # left out (an SSE answer would get one per token).
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider, exclude_spans=["send", "receive"])

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _add_schema(schema, "AnswerEvent", ANSWER_EVENT_ADAPTER)
            _add_schema(schema, "JobEvent", JOB_EVENT_ADAPTER)
            _add_schema(schema, "ChatCompletionChunk", TypeAdapter(ChatCompletionChunk))
            _clean_event_streams(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
