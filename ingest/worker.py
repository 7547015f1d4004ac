"""Composition root of the ingestion worker process.

``build_ingest_context(settings)`` turns Settings into the objects the pipeline needs
(engine, store, embedding model, splitter); ``run_worker`` claims and runs queued jobs
until stopped, and queues jobs for the watched folders (``ingest.watch``) as their files
change; ``run_job`` runs one job in this process (``rag ingest``).
At start-up the worker migrates the database and reconciles every collection's index with
the database, which repairs whatever a crash left half-published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from core.settings import Settings
from core.wiring import configure_tracing, index_recipe, load_document_embedder, open_database, open_store
from ingest import queue
from ingest.indexer import reconcile_all
from ingest.loaders import LoaderLimits
from ingest.pipeline import IngestPipeline, JobSummary, ProgressCallback, default_worker_id
from ingest.reindex import Reindexer, warn_recipe_mismatches
from ingest.splitter import Splitter
from ingest.watch import watch_folders
from retrieval.embedders import SentenceTransformerEmbedder
from retrieval.recipe import IndexRecipe
from retrieval.store import IndexStore

if TYPE_CHECKING:
    from core.pgindex.index import PgIndex

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


@dataclass
class IngestContext:
    """Everything a worker process holds; ``aclose`` releases it."""

    settings: Settings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    store: IndexStore | PgIndex
    embedder: SentenceTransformerEmbedder
    pipeline: IngestPipeline
    worker_id: str
    reindexer: Reindexer
    recipe: IndexRecipe

    async def aclose(self) -> None:
        """Stop threads and close database connections."""
        self.pipeline.close()
        if not isinstance(self.store, IndexStore):
            await asyncio.to_thread(self.store.close)
        await self.engine.dispose()


async def build_ingest_context(
    settings: Settings,
    *,
    worker_id: str | None = None,
    embedder: SentenceTransformerEmbedder | None = None,
) -> IngestContext:
    """Migrate the database and build the worker's objects (loads the embedding model unless given)."""
    db = await open_database(settings)
    engine, sessionmaker = db.engine, db.sessionmaker
    if embedder is None:
        embedder = await asyncio.to_thread(load_document_embedder, settings)
    store = await asyncio.to_thread(open_store, settings, model_id=embedder.model_id, dimension=embedder.dimension)
    splitter = Splitter(
        embedder.tokenizer,
        chunk_tokens=settings.chunking.chunk_tokens,
        overlap_tokens=settings.chunking.overlap_tokens,
        context_tokens=settings.chunking.context_tokens,
        window_tokens=embedder.max_seq_length - 2,  # [CLS] and [SEP]
        min_piece_tokens=settings.chunking.min_piece_tokens,
    )
    worker_id = worker_id or default_worker_id()
    recipe = index_recipe(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    index_writer = None if isinstance(store, IndexStore) else store.writer()
    batch_chunks = settings.ingest.batch_chunks or max(settings.embedding.batch_size * 4, 64)
    pipeline = IngestPipeline(
        sessionmaker=sessionmaker,
        store=store,
        index_writer=index_writer,
        recipe=recipe,
        embedder=embedder,
        splitter=splitter,
        worker_id=worker_id,
        max_file_bytes=settings.ingest.max_file_mb * 1024 * 1024,
        limits=loader_limits(settings),
        batch_chunks=batch_chunks,
        heartbeat_seconds=settings.ingest.heartbeat_seconds,
        publish_every=settings.ingest.publish_every_seconds,
    )
    reindexer = Reindexer(
        sessionmaker=sessionmaker,
        store=store,
        embedder=embedder,
        splitter=splitter,
        recipe=recipe,
        worker_id=worker_id,
        batch_chunks=batch_chunks,
        heartbeat_seconds=settings.ingest.heartbeat_seconds,
        index_writer=index_writer,
    )
    return IngestContext(settings, engine, sessionmaker, store, embedder, pipeline, worker_id, reindexer, recipe)


def loader_limits(settings: Settings) -> LoaderLimits:
    """What a loader may spend on one file, from the ``ingest`` settings."""
    ingest = settings.ingest
    return LoaderLimits(
        max_bytes=ingest.max_file_mb * 1024 * 1024,
        max_uncompressed_bytes=ingest.max_uncompressed_mb * 1024 * 1024,
        max_compression_ratio=ingest.max_compression_ratio,
        max_sheet_rows=ingest.max_sheet_rows,
        max_sheet_cells=ingest.max_sheet_cells,
        ocr=ingest.ocr,
        ocr_language=ingest.ocr_language,
        ocr_dpi=ingest.ocr_dpi,
        ocr_timeout_seconds=ingest.ocr_timeout_seconds,
    )


async def enqueue_path(
    sessionmaker: async_sessionmaker[AsyncSession], path: Path, *, collection: str, prune: bool = True
) -> tuple[int, str]:
    """Queue an ingest of ``path`` (a folder, recursively, or a file). Returns (job id, collection)."""
    resolved = path.expanduser().resolve()
    if not resolved.exists():
        raise FileNotFoundError(f"{path} does not exist")
    async with sessionmaker() as session:
        coll = await queue.get_or_create_collection(session, collection)
        job = await queue.enqueue(session, collection=coll, root_path=str(resolved), prune=prune)
        await session.commit()
        return job.id, coll.name


async def run_job(ctx: IngestContext, job_id: int, *, on_progress: ProgressCallback | None = None) -> JobSummary | None:
    """Claim ``job_id`` for this process and run it; None if another worker holds it."""
    async with ctx.sessionmaker() as session:
        job = await queue.claim(
            session,
            worker_id=ctx.worker_id,
            stale_after=ctx.settings.ingest.stale_after_seconds,
            job_id=job_id,
        )
    if job is None:
        return None
    return await _run_traced(ctx, job.id, job.root_path, kind=job.kind, on_progress=on_progress)


async def _run_traced(
    ctx: IngestContext, job_id: int, root: str, *, kind: str = "ingest", on_progress: ProgressCallback | None = None
) -> JobSummary:
    """Run a claimed job (an ingest, or a reindex) as its own trace (a no-op span unless the process
    configured tracing)."""
    with _tracer.start_as_current_span(
        f"{kind} job",
        context=otel_context.Context(),
        attributes={"rag.job_id": job_id, "rag.root": root, "rag.kind": kind},
    ) as span:
        runner = ctx.reindexer if kind == "reindex" else ctx.pipeline
        summary = await runner.run(job_id, on_progress=on_progress)
        span.set_attribute("rag.status", summary.status)
        return summary


async def _repair(ctx: IngestContext, message: str) -> None:
    """Reconcile every collection with the database (rebuilding unreadable ones); log what changed.

    The sharded postgres index has its own repair: the shards made equal to the coordinator
    (PL/Proxy commits each shard on its own, so a crash can leave them apart).
    """
    repair = getattr(ctx.store, "repair", None)
    if repair is not None:
        put, removed = await asyncio.to_thread(repair)
        if put or removed:
            logger.warning(message, extra={"collection": "*shards*", "added": put, "removed": removed})
    for r in await reconcile_all(ctx.sessionmaker, ctx.store, verify=True):
        if r.added or r.removed:
            logger.warning(message, extra={"collection": r.collection, "added": r.added, "removed": r.removed})


def _watched(settings: Settings) -> list[tuple[Path, str, bool]]:
    """The watched folders as (path, collection, prune), checked before the model loads.

    Raises:
        FileNotFoundError: A watched folder does not exist.
        QueueError: A watched folder names an invalid collection.
    """
    folders = [(f.path.expanduser(), queue.check_collection_name(f.collection), f.prune) for f in settings.ingest.watch]
    for path, _collection, _prune in folders:
        if not path.exists():
            raise FileNotFoundError(f"watched folder {path} does not exist (RAG_INGEST__WATCH)")
    return folders


async def run_worker(
    settings: Settings,
    *,
    once: bool = False,
    stop: asyncio.Event | None = None,
    worker_id: str | None = None,
    embedder: SentenceTransformerEmbedder | None = None,
) -> int:
    """Claim and run jobs until ``stop`` is set (or, with ``once``, until the queue is empty).

    Unless ``once``, the watched folders (``settings.ingest.watch``) are ingested at start and
    again after every burst of changes (see :mod:`ingest.watch`).

    Returns the number of jobs run.

    Raises:
        FileNotFoundError: A watched folder does not exist.
    """
    folders = [] if once else _watched(settings)
    tracing = configure_tracing(settings, service_suffix="-worker")
    ctx = await build_ingest_context(settings, worker_id=worker_id, embedder=embedder)
    stop = stop or asyncio.Event()
    wake = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    ran = 0
    try:
        await _repair(ctx, "index repaired at start-up")
        await warn_recipe_mismatches(ctx.sessionmaker, ctx.recipe)
        if folders:
            watcher = asyncio.create_task(
                watch_folders(
                    ctx.sessionmaker,
                    folders,
                    quiet=settings.ingest.watch_debounce_seconds,
                    force_polling=settings.ingest.watch_force_polling,
                    stop=stop,
                    wake=wake,
                )
            )
            watcher.add_done_callback(_log_watch_end)
        checked = time.monotonic()
        while not stop.is_set():
            async with ctx.sessionmaker() as session:
                job = await queue.claim(
                    session,
                    worker_id=ctx.worker_id,
                    stale_after=settings.ingest.stale_after_seconds,
                )
            if job is None:
                if once:
                    break
                if time.monotonic() - checked >= settings.ingest.check_indexes_seconds:
                    # A snapshot corrupted while the worker idles (disk, operator) is rebuilt
                    # without waiting for a restart or a job of that collection.
                    await _repair(ctx, "index repaired")
                    checked = time.monotonic()
                await _idle(stop, wake, settings.ingest.poll_seconds)
                continue
            logger.info("job claimed", extra={"job_id": job.id, "root": job.root_path, "kind": job.kind})
            summary = await _run_traced(ctx, job.id, job.root_path, kind=job.kind)
            ran += 1
            logger.info("job finished", extra={"job_id": job.id, "status": summary.status})
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        await ctx.aclose()
        if tracing is not None:
            tracing.shutdown()
    return ran


def _log_watch_end(task: asyncio.Task[None]) -> None:
    """A watcher that dies (a folder removed, the inotify limit reached) must not go unnoticed."""
    if not task.cancelled() and task.exception() is not None:
        logger.error("watching folders stopped; queued jobs still run", exc_info=task.exception())


async def _idle(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    """Wait up to ``seconds``, less if the worker is stopped or a watched folder queued a job."""
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
    wake.clear()
