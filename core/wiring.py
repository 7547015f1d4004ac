"""The one place where :class:`~core.settings.Settings` become constructed objects.

Every composition root — the API lifespan (``app/resources.py``), the ingestion worker
(``ingest/worker.py``), the CLI commands (``app/cli/``) and the evaluations (``evaluation/``) —
builds its database, embedder, index store, retriever, model-server client and answer defaults
through these functions, so the processes cannot drift apart. Library packages below
(``retrieval``, ``generation``) never see Settings: they get the constructor arguments made here.

Nothing here runs at import time; heavy imports (torch, FAISS) happen inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core.db.engine import create_engine, create_sessionmaker
from core.db.migrate import aupgrade
from core.settings import Settings
from generation.flare import FlareParams, default_flare_params
from generation.guard import GroundingParams
from generation.types import GenerationParams
from retrieval.types import Embedder, SearchOptions

if TYPE_CHECKING:
    from core.pgindex.index import PgIndex, PgRetriever
    from generation.backends.openai_compat import OpenAICompatClient
    from retrieval.embedders import SentenceTransformerEmbedder
    from retrieval.hybrid import HybridRetriever
    from retrieval.recipe import IndexRecipe
    from retrieval.store import IndexStore

logger = logging.getLogger(__name__)


# --- database ------------------------------------------------------------------------------------


@dataclass
class Database:
    """A migrated database's engine and session factory; ``aclose`` disposes of the pool."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


async def open_database(settings: Settings, *, migrate: bool = True) -> Database:
    """Create the data directory, bring the schema to head (unless ``migrate`` is false), connect."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if migrate:
        await aupgrade(settings.database_url)
    engine = create_engine(settings.database_url, echo=settings.database.echo, pool_size=settings.database.pool_size)
    return Database(engine, create_sessionmaker(engine))


# --- retrieval -----------------------------------------------------------------------------------


def load_embedder(settings: Settings, *, threads: int | None = None) -> SentenceTransformerEmbedder:
    """Load the configured embedding model, offline (blocking: call it in a thread from async code)."""
    from retrieval.embedders import SentenceTransformerEmbedder

    # The model ships inside a package; never let transformers try the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return SentenceTransformerEmbedder(
        settings.embedding.model,
        device=settings.embedding.device,
        dtype=settings.embedding.dtype,
        batch_size=settings.embedding.batch_size,
        threads=threads,
    )


def load_document_embedder(settings: Settings) -> SentenceTransformerEmbedder:
    """The embedder of a process that embeds passages (the worker, ``rag ingest``, evaluations),
    with the document path ``embedding.document_backend`` asks for (blocking: may export, quantize
    and calibrate on first use).

    ``auto`` keeps PyTorch where it already runs in bfloat16 (native bf16 CPUs) and otherwise
    lets the int8 ONNX path prove itself on this machine (see ``use_int8_documents``).
    """
    embedder = load_embedder(settings)
    backend = settings.embedding.document_backend
    if backend == "onnx-int8" or (
        backend == "auto" and embedder.dtype == "float32" and settings.embedding.device == "cpu"
    ):
        embedder.use_int8_documents(settings.data_dir / "models" / "onnx", require_speedup=backend == "auto")
    return embedder


def load_query_embedder(settings: Settings) -> SentenceTransformerEmbedder:
    """The embedder of a process that embeds queries only: one thread, ONNX Runtime when configured."""
    embedder = load_embedder(settings, threads=settings.embedding.query_threads)
    if settings.embedding.query_backend == "onnx":
        embedder.use_onnx_queries(settings.data_dir / "models" / "onnx", threads=settings.embedding.query_threads)
    return embedder


def index_recipe(settings: Settings, *, model_id: str, dimension: int) -> IndexRecipe:
    """The configured index recipe (the one place it is computed from settings): the embedding model
    the process loaded and the ``chunking`` section. The API, the worker and the CLI all compare a
    collection's recorded recipe with this one (``reindex_needed``)."""
    from retrieval.recipe import IndexRecipe

    c = settings.chunking
    return IndexRecipe(
        model_id=model_id,
        dimension=dimension,
        chunk_tokens=c.chunk_tokens,
        overlap_tokens=c.overlap_tokens,
        min_piece_tokens=c.min_piece_tokens,
        context_tokens=c.context_tokens,
    )


def open_store(settings: Settings, *, model_id: str, dimension: int) -> IndexStore | PgIndex:
    """The index of the configured backend (the worker writes it, the API and the CLI read it).

    ``local``: the snapshot store in the data dir. ``postgres``: the index in the database
    (:class:`core.pgindex.index.PgIndex`, or its sharded form when ``retrieval.shards`` is set),
    checked against the model and tokenizer; blocking (call it in a thread from async code).
    """
    from retrieval.store import IndexStore
    from retrieval.tokenize import TokenizerOptions

    r = settings.retrieval
    if r.backend == "postgres":
        from core.pgindex.index import PgIndex

        kwargs: dict[str, Any] = {
            "model_id": model_id,
            "dimension": dimension,
            "tokenizer": TokenizerOptions(stopwords=r.stopwords, stem=r.stem),
            "ef_search": r.hnsw_ef_search,
            "pool_size": settings.database.pool_size,
        }
        if r.shards:
            from core.pgindex.shards import ShardedPgIndex

            return ShardedPgIndex.open(settings.database_url, shards=list(r.shards), **kwargs)
        return PgIndex.open(settings.database_url, **kwargs)
    return IndexStore(
        settings.index_dir,
        model_id=model_id,
        dimension=dimension,
        tokenizer=TokenizerOptions(stopwords=r.stopwords, stem=r.stem),
        use_gpu=r.faiss_gpu,
        accelerator=None if r.dense_accelerator == "none" else r.dense_accelerator,
        accelerate_from=r.accelerate_from_chunks,
        nprobe=r.nprobe,
    )


def search_defaults(settings: Settings) -> SearchOptions:
    """The configured default search options (each request may override them)."""
    r = settings.retrieval
    return SearchOptions(
        mode=r.mode,
        fusion=r.fusion,
        depth=r.depth,
        rrf_k=r.rrf_k,
        dense_weight=r.dense_weight,
        sparse_weight=r.sparse_weight,
        alpha=r.alpha,
        normalization=r.normalization,
        lead_weight=r.lead_weight,
    )


def build_retriever(
    settings: Settings,
    store: IndexStore | PgIndex,
    embedder: Embedder,
    *,
    executor: Executor | None = None,
    leg_executor: Executor | None = None,
) -> HybridRetriever | PgRetriever:
    """The hybrid retriever over ``store`` (either backend's index) with the configured defaults."""
    from retrieval.dense import set_search_threads
    from retrieval.hybrid import HybridRetriever
    from retrieval.store import IndexStore

    if not isinstance(store, IndexStore):
        return store.retriever(embedder, executor=executor, defaults=search_defaults(settings))

    set_search_threads(settings.retrieval.search_threads)
    return HybridRetriever(
        store, embedder, executor=executor, defaults=search_defaults(settings), leg_executor=leg_executor
    )


# --- generation ----------------------------------------------------------------------------------


def build_llm_client(settings: Settings) -> OpenAICompatClient:
    """The HTTP client of the configured OpenAI-compatible model server (vLLM by default)."""
    import httpx

    from generation.backends.openai_compat import OpenAICompatClient

    llm = settings.llm
    return OpenAICompatClient(
        llm.base_url,
        llm.model,
        api_key=llm.api_key.get_secret_value() if llm.api_key else None,
        timeout=httpx.Timeout(llm.timeout_seconds, connect=llm.connect_timeout_seconds),
        max_retries=llm.max_retries,
        max_connections=settings.api.max_concurrent_answers,
    )


def generation_params(settings: Settings, **overrides: Any) -> GenerationParams:
    """Default sampling parameters from settings, with per-request ``overrides`` (None = default)."""
    llm = settings.llm
    values: dict[str, Any] = {
        "max_tokens": llm.max_tokens,
        "temperature": llm.temperature,
        "top_p": llm.top_p,
        "top_k": llm.top_k,
        "repetition_penalty": llm.repetition_penalty,
        "frequency_penalty": llm.frequency_penalty,
        "presence_penalty": llm.presence_penalty,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "stop" in values:
        values["stop"] = tuple(values["stop"])
    return GenerationParams(**values)


@dataclass(frozen=True, slots=True)
class AnswerDefaults:
    """Keyword arguments of :func:`generation.rag.answer` that come from settings.

    Built once per process (:func:`answer_defaults`): request code never reads files for them.
    """

    k: int
    interval_tokens: int
    max_model_len: int
    history_max_tokens: int
    infer_missing_citations: bool
    stop_on_repetition: bool
    flare: FlareParams = field(default_factory=FlareParams)
    """``flare`` mode defaults of the served model (:func:`flare_defaults`)."""
    grounding: GroundingParams | None = None
    """The grounding guard (:func:`grounding_params`); ``None``: off."""

    def kwargs(self, **overrides: Any) -> dict[str, Any]:
        """As keyword arguments, with ``overrides`` (None = keep the default)."""
        values: dict[str, Any] = {
            "k": self.k,
            "interval_tokens": self.interval_tokens,
            "max_model_len": self.max_model_len,
            "history_max_tokens": self.history_max_tokens,
            "infer_missing_citations": self.infer_missing_citations,
            "stop_on_repetition": self.stop_on_repetition,
            "flare": self.flare,
            "grounding": self.grounding,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return values


def answer_defaults(settings: Settings) -> AnswerDefaults:
    """The configured answer behaviour (reads the calibrated FLARE file once, if there is one)."""
    llm = settings.llm
    return AnswerDefaults(
        k=llm.k,
        interval_tokens=llm.interval_tokens,
        max_model_len=llm.max_model_len,
        history_max_tokens=llm.history_max_tokens,
        infer_missing_citations=llm.infer_citations,
        stop_on_repetition=llm.stop_on_repetition,
        flare=flare_defaults(settings),
        grounding=grounding_params(settings),
    )


def grounding_params(settings: Settings, policy: str | None = None) -> GroundingParams | None:
    """The configured grounding guard (``policy`` overrides the setting); ``None`` when it is ``off``."""
    g = settings.grounding
    chosen = policy or g.policy
    if chosen == "off":
        return None
    # The settings section and GroundingParams share their field names: one list, and a field added
    # to one but not the other fails here (TypeError) the first time any process starts.
    return GroundingParams(policy=chosen, **g.model_dump(exclude={"policy"}))  # type: ignore[arg-type]


def flare_defaults_path(settings: Settings) -> Path:
    """Where ``rag flare calibrate`` stores the served model's FLARE defaults: ``<data_dir>/flare/<model>.json``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.llm.model).strip("._") or "model"
    return settings.data_dir / "flare" / f"{safe}.json"


def flare_defaults(settings: Settings) -> FlareParams:
    """The served model's FLARE defaults: the calibrated file if there is one, else the built-in table.

    A file that cannot be read or holds invalid values is logged and ignored (answers keep working
    with the built-in defaults).
    """
    builtin = default_flare_params(settings.llm.model)
    path = flare_defaults_path(settings)
    if not path.is_file():
        return builtin
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        return FlareParams.from_dict(stored.get("params", {}), base=builtin)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        logger.warning("ignoring unreadable FLARE defaults", extra={"path": str(path), "error": str(e)})
        return builtin


def save_flare_defaults(settings: Settings, params: FlareParams, calibration: dict[str, Any]) -> Path:
    """Store ``params`` as the served model's FLARE defaults (with the calibration that chose them)."""
    path = flare_defaults_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"model": settings.llm.model, "params": params.to_dict(), "calibration": calibration}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


# --- tracing -------------------------------------------------------------------------------------


@dataclass
class Tracing:
    """The process's span pipeline (see :func:`configure_tracing`); :meth:`shutdown` flushes it."""

    provider: Any
    """The ``opentelemetry.sdk.trace.TracerProvider`` spans go to."""
    processor: Any
    """This configuration's span processor (the OTLP export process, or a test's simple processor)."""
    stage_sink: Any = None
    """The stage sink this configuration installed (:func:`retrieval.tracing.set_stage_sink`), if any."""

    def shutdown(self) -> None:
        """Export what is buffered and stop this configuration's exporter."""
        from retrieval import tracing as stage_spans

        if self.stage_sink is not None and stage_spans.current_stage_sink() is self.stage_sink:
            stage_spans.set_stage_sink(None)
        stage_spans.flush()  # the search stages still waiting to become spans
        # The processors' shutdown exports what they hold (the span shipper: bounded by the export
        # timeout), so no separate flush, whose 30 s default would double the wait on a dead collector.
        self.processor.shutdown()


def configure_tracing(settings: Settings, *, exporter: Any = None, service_suffix: str = "") -> Tracing | None:
    """Set up OpenTelemetry tracing for this process, or nothing.

    Off (``None``, nothing imported from the SDK) unless ``telemetry.otlp_endpoint`` is set or a
    test passes ``exporter`` (e.g. the SDK's ``InMemorySpanExporter``, exported synchronously).
    The library floors only use the OpenTelemetry *API*; without this call its tracer is a no-op.
    With an endpoint, spans are encoded and exported by a child process
    (:class:`core.span_export.SpanShipper`), and the search stages reach it as plain tuples.

    One ``TracerProvider`` per process (OpenTelemetry allows the global provider to be set once):
    the first call installs it, later calls (a second app in one test process) add their
    exporter to it; the search stages are then made into SDK spans again, so that every
    processor sees them.
    """
    endpoint = settings.telemetry.otlp_endpoint
    if endpoint is None and exporter is None:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from retrieval import tracing as stage_spans

    processor: Any
    sink: stage_spans.StageSink | None = None
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    else:
        from core.span_export import SpanShipper

        assert endpoint is not None
        processor = SpanShipper(
            f"{endpoint.rstrip('/')}/v1/traces", timeout_seconds=settings.telemetry.export_timeout_seconds
        )
        sink = processor.ship_stages
    current = trace.get_tracer_provider()
    first = not isinstance(current, TracerProvider)  # this call creates the provider: its only processor
    if isinstance(current, TracerProvider):
        provider = current
    else:
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.telemetry.service_name + service_suffix}),
            sampler=ParentBased(TraceIdRatioBased(settings.telemetry.sample_ratio)),
        )
        trace.set_tracer_provider(provider)
    provider.add_span_processor(processor)
    # Stage tuples skip every processor but the shipper: only when it is the provider's only one.
    stage_spans.set_stage_sink(sink if first else None)
    return Tracing(provider=provider, processor=processor, stage_sink=sink if first else None)
