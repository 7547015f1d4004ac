"""Composition root of the API process: Settings in, long-lived objects out.

:func:`build_resources` migrates the database and builds, from plain constructor arguments:
the engine and sessionmaker, the query embedder (loaded in a thread, one torch thread), the
index store, the hybrid retriever with its own thread pool, the model-server client and the
metrics registry. :meth:`Resources.aclose` releases them. The lifespan of ``app.main`` is the
only caller in the service; tests pass fakes for the embedder and the LLM.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.observability import Metrics, TimedEmbedder
from app.services.admission import Admission, Gate, KeyLimits
from app.services.jobs import JobWakeups
from core.pgindex.index import PgRetriever
from core.settings import Settings
from core.wiring import (
    AnswerDefaults,
    answer_defaults,
    build_llm_client,
    build_retriever,
    index_recipe,
    load_query_embedder,
    open_database,
    open_store,
)
from generation.client import LLMClient
from ingest.reindex import warn_recipe_mismatches
from retrieval.hybrid import HybridRetriever
from retrieval.recipe import IndexRecipe
from retrieval.types import Embedder, IndexCatalog

logger = logging.getLogger(__name__)

LLMProbe = Callable[[], Awaitable[None]]
"""Raises when the model server cannot be reached (``/readyz``)."""


@dataclass
class Resources:
    """Everything the API process holds for its lifetime."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    embedder: Embedder
    store: IndexCatalog
    """The index of the retrieval backend (snapshot files, or the ``postgres`` backend's tables)."""
    retriever: HybridRetriever | PgRetriever
    executor: ThreadPoolExecutor
    llm: LLMClient
    llm_probe: LLMProbe
    metrics: Metrics
    answer_defaults: AnswerDefaults
    """Answer keyword arguments from settings (the calibrated FLARE file is read once, here)."""
    admission: Admission
    """Concurrency gates and per-key limits (:mod:`app.services.admission`)."""
    recipe: IndexRecipe
    """The configured index recipe (``core.wiring.index_recipe``), compared with each collection's."""
    leg_executor: ThreadPoolExecutor | None = None
    """Runs hybrid searches' BM25 legs (``RAG_RETRIEVAL__PARALLEL_LEGS``)."""
    job_wakeups: JobWakeups = field(default_factory=JobWakeups)
    """Wakes this process's job-event watchers when a job changes through this process."""

    async def aclose(self) -> None:
        """Close the model-server connections, the thread pools and the database pool."""
        try:
            await self.llm.aclose()
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            if self.leg_executor is not None:
                self.leg_executor.shutdown(wait=False, cancel_futures=True)
            close = getattr(self.store, "close", None)  # the postgres index owns a pool and a loop
            if close is not None:
                await asyncio.to_thread(close)
            await self.engine.dispose()


async def build_resources(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    llm: LLMClient | None = None,
    llm_probe: LLMProbe | None = None,
) -> Resources:
    """Migrate the database and build the process's objects.

    Args:
        settings: The configuration.
        embedder: Use this query embedder instead of loading the configured model (tests).
        llm: Use this client instead of the configured server (tests).
        llm_probe: Readiness probe of the model server (default: ``GET /v1/models`` via ``llm``).
    """
    db = await open_database(settings)
    engine = db.engine
    metrics = Metrics()
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="retrieval")
    # Its own pool: a search waits for its BM25 leg, so the leg must never queue behind searches.
    legs = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bm25") if settings.retrieval.parallel_legs else None
    try:
        if embedder is None:
            # One torch thread: steadier query latency when the other core is busy.
            embedder = await asyncio.to_thread(load_query_embedder, settings)
        store = await asyncio.to_thread(open_store, settings, model_id=embedder.model_id, dimension=embedder.dimension)
        timed = TimedEmbedder(embedder, metrics.retrieval_latency)
        retriever = build_retriever(settings, store, timed, executor=executor, leg_executor=legs)
        await asyncio.to_thread(_warm_up, store, embedder)
        recipe = index_recipe(settings, model_id=embedder.model_id, dimension=embedder.dimension)
        # Search keeps answering from the existing indexes; the operator learns what to run.
        await warn_recipe_mismatches(db.sessionmaker, recipe)
    except BaseException:
        executor.shutdown(wait=False)
        if legs is not None:
            legs.shutdown(wait=False)
        await engine.dispose()
        raise
    client = llm if llm is not None else build_llm_client(settings)
    if llm_probe is None:
        llm_probe = _probe_for(client)
    logger.info(
        "resources ready",
        extra={"database": engine.url.get_backend_name(), "embedding_model": embedder.model_id, "llm": client.model},
    )
    return Resources(
        settings=settings,
        engine=engine,
        sessionmaker=db.sessionmaker,
        embedder=embedder,
        store=store,
        retriever=retriever,
        executor=executor,
        leg_executor=legs,
        llm=client,
        llm_probe=llm_probe,
        metrics=metrics,
        answer_defaults=await asyncio.to_thread(answer_defaults, settings),
        admission=build_admission(settings),
        recipe=recipe,
    )


def build_admission(settings: Settings) -> Admission:
    """The API's gates and per-key limits from ``api`` settings."""
    api = settings.api
    retry = float(api.retry_after_seconds)
    return Admission(
        answers=Gate(
            "answers",
            capacity=api.max_concurrent_answers,
            queue=api.answer_queue,
            wait_seconds=api.queue_wait_seconds,
            retry_after=retry,
        ),
        searches=Gate(
            "searches",
            capacity=api.max_concurrent_searches,
            queue=api.search_queue,
            wait_seconds=api.search_queue_wait_seconds,
            retry_after=1.0,
        ),
        keys=KeyLimits(
            per_minute=api.rate_limit_per_minute,
            streams=api.max_streams_per_key,
            storage_uri=api.rate_limit_storage,
        ),
    )


def _warm_up(store: IndexCatalog, embedder: Embedder) -> None:
    """Load every collection's snapshot and run one query embedding, so the first search does not
    pay for them (measured: ~1 s on a busy 2-core machine). Failures are logged, not fatal:
    ``/readyz`` reports a broken index, and searches of other collections still work."""
    embedder.embed_query("warm up")
    for name in store.collections():
        try:
            store.load(name)
        except Exception as e:
            logger.warning("index not loadable at start-up", extra={"collection": name, "error": str(e)})


def _probe_for(client: LLMClient) -> LLMProbe:
    async def probe() -> None:
        # OpenAICompatClient.max_model_len is GET /v1/models; any LLMError means unreachable.
        models = getattr(client, "max_model_len", None)
        if models is None:
            await client.count_tokens("ping")
        else:
            await models()

    return probe
