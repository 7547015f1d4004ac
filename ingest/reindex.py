"""A reindex job: re-chunk and re-embed a collection from its stored texts, then swap it in at once.

When the configured index recipe (``retrieval.recipe``: chunk sizes, context, embedding model)
differs from the one a collection was built with, ``rag reindex`` / ``POST
/v1/collections/{name}/reindex`` queue a job of kind ``reindex`` (``ingest.queue.enqueue_reindex``)
and a worker runs it here:

1. **Read.** The collection's indexed documents, each with its stored text and layout
   (``ingest.stored``; documents from before the text was kept are rebuilt from their chunks).
   No file is read: a document's source may be gone, and its text is what the old chunks cite.
2. **Cut and embed.** In batches, with the configured splitter and embedder, off the event loop.
   The new pieces and vectors are held in memory (about 1.6 KB of vector and the text per chunk:
   100 000 chunks take some 200 MB) and nothing is written yet, so searches keep using the old
   rows and the old index. Each batch writes ``file`` events and the progress, and reads the
   cancel request: a cancelled job writes nothing else (the old index stays, untouched).
3. **Swap.** One transaction deletes each document's old chunk rows, inserts the new ones (on the
   ``postgres`` backend the index rows too, through its writer: the same transaction, so readers
   switch at the commit, by MVCC), updates the documents' chunk counts and records the configured
   recipe on the collection. A document changed by an ingest meanwhile (another sha256) is skipped:
   its rows are already the newer ingest's.
4. **Publish** (``local`` backend): reconciling finds no chunk id in common with the live snapshot
   and builds the new version from scratch (``ingest.indexer``), recording the recipe in its
   manifest. Until ``CURRENT`` switches, the old snapshot answers searches from its own copy of the
   chunks; the old rows are gone from the database for that moment, which only matters to a
   request that fetches a chunk by id (``get_document_chunk``) in those seconds.

Crash safety: before the swap commits nothing changed (the job is claimed again after
``stale_after_seconds`` and starts over); after it, the rows and the recipe agree, and the next
reconcile (the job's own end, the worker's start-up or its periodic check) publishes them. A job
retried after its swap committed re-cuts the rows it made itself, which is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.base import utcnow
from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document, IngestJob, IngestJobEvent
from core.pgindex.writer import PgIndexWriter
from ingest.indexer import reconcile
from ingest.loaders.base import LoadedDocument
from ingest.pipeline import (
    JobCancelled,
    JobSummary,
    ProgressCallback,
    beat_while_running,
    insert_chunk_rows,
    summarize,
    without_stem_title,
)
from ingest.splitter import Piece, Splitter
from ingest.stored import StoredChunk, rebuilt_document, stored_document
from retrieval.chunk_context import embedded_text
from retrieval.recipe import IndexRecipe, recipe_from_json, reindex_needed
from retrieval.types import Embedder, IndexCatalog

logger = logging.getLogger(__name__)

_DELETE_BATCH = 500


@dataclass(slots=True)
class _Redone:
    """One document cut and embedded anew, waiting for the swap."""

    document_id: int
    path: str
    sha256: str
    pieces: list[Piece]
    vectors: np.ndarray


class Reindexer:
    """Runs ``reindex`` jobs (see the module docstring). One instance per worker process."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: IndexCatalog,
        embedder: Embedder,
        splitter: Splitter,
        recipe: IndexRecipe,
        worker_id: str,
        batch_chunks: int = 256,
        heartbeat_seconds: float = 5.0,
        executor: Executor | None = None,
        index_writer: PgIndexWriter | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._store = store
        self._embedder = embedder
        self._splitter = splitter
        self._recipe = recipe
        self._worker_id = worker_id
        self._batch_chunks = batch_chunks
        self._heartbeat_seconds = heartbeat_seconds
        self._executor = executor
        self._index_writer = index_writer

    async def run(self, job_id: int, *, on_progress: ProgressCallback | None = None) -> JobSummary:
        """Run a claimed ``reindex`` job to its end and return its summary (as ``IngestPipeline.run``)."""
        started = time.monotonic()
        async with self._sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            if job is None:
                raise ValueError(f"no job {job_id}")
            collection = await session.get(Collection, job.collection_id)
            assert collection is not None
            name, collection_id = collection.name, collection.id
        heartbeat = asyncio.create_task(
            beat_while_running(self._sessionmaker, job_id, self._worker_id, self._heartbeat_seconds)
        )
        try:
            await self._reindex(job_id, collection_id, name, on_progress)
            status, error = "succeeded", None
        except JobCancelled:
            logger.info("reindex job cancelled", extra={"job_id": job_id})
            status, error = "cancelled", "cancelled by request"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("reindex job failed", extra={"job_id": job_id})
            status, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        # Publishes the swapped rows (local backend); a no-op when nothing was swapped.
        await reconcile(self._sessionmaker, self._store, name)
        async with self._sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.status, job.error, job.finished_at = status, error, utcnow()
            job.progress = 1.0 if status == "succeeded" else job.progress
            total = await session.scalar(
                select(func.count()).select_from(ChunkRow).where(ChunkRow.collection_id == collection_id)
            )
            await session.commit()
            if status == "succeeded":
                logger.info(
                    "collection reindexed",
                    extra={"collection": name, "recipe": self._recipe.describe(), "chunks": int(total or 0)},
                )
            return summarize(job, name, int(total or 0), time.monotonic() - started)

    async def _reindex(self, job_id: int, collection_id: int, name: str, on_progress: ProgressCallback | None) -> None:
        async with self._sessionmaker() as session:
            documents = (
                await session.execute(
                    select(Document.id, Document.path, Document.sha256, Document.format, Document.title)
                    .where(Document.collection_id == collection_id, Document.status == "indexed")
                    .order_by(Document.id)
                )
            ).all()
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.files_total = job.files_seen = len(documents)
            job.files_changed = job.files_skipped = job.chunks_added = job.chunks_removed = 0
            await session.commit()
        loop = asyncio.get_running_loop()
        redone: list[_Redone] = []
        batch: list[_Redone] = []
        pending = 0
        for done, (document_id, path, sha, fmt, title) in enumerate(documents, start=1):
            loaded = await self._source(document_id, path, fmt, title)
            pieces = await loop.run_in_executor(self._executor, self._splitter.split, loaded)
            batch.append(_Redone(document_id, path, sha, pieces, np.zeros((0, 0), dtype=np.float32)))
            pending += len(pieces)
            if pending >= self._batch_chunks or done == len(documents):
                await self._embed(batch)
                redone += batch
                if await self._record_progress(job_id, batch, done / max(len(documents), 1) * 0.9):
                    raise JobCancelled
                if on_progress is not None:
                    for item in batch:
                        on_progress(done, len(documents), item.path, "indexed", chunks=len(item.pieces))
                batch, pending = [], 0
        await self._swap(job_id, collection_id, redone)

    async def _source(self, document_id: int, path: str, fmt: str | None, title: str | None) -> LoadedDocument:
        """The loaded form of a stored document, ready for the splitter (title rule as at ingest)."""
        async with self._sessionmaker() as session:
            row = (
                await session.execute(select(Document.text, Document.layout).where(Document.id == document_id))
            ).one()
            text, layout = row
            if text is not None:
                loaded = stored_document(text, layout, format=fmt or "text", title=title)
            else:
                chunks: Sequence[StoredChunk] = [
                    (t, s, e, p)
                    for t, s, e, p in await session.execute(
                        select(ChunkRow.text, ChunkRow.start, ChunkRow.end, ChunkRow.page)
                        .where(ChunkRow.document_id == document_id)
                        .order_by(ChunkRow.start)
                    )
                ]
                loaded = rebuilt_document(chunks, format=fmt or "text", title=title)
        return without_stem_title(loaded, Path(path))

    async def _embed(self, batch: list[_Redone]) -> None:
        texts = [embedded_text(piece.text, piece.context) for item in batch for piece in item.pieces]
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._executor, self._embedder.embed_documents, texts)
        row = 0
        for item in batch:
            item.vectors = np.asarray(vectors[row : row + len(item.pieces)], dtype=np.float32)
            row += len(item.pieces)

    async def _record_progress(self, job_id: int, batch: list[_Redone], progress: float) -> bool:
        """Write the batch's ``file`` events and the progress; return whether a cancel was requested."""
        async with self._sessionmaker() as session, session.begin():
            session.add_all(
                IngestJobEvent(
                    job_id=job_id,
                    type="file",
                    data={"path": item.path, "status": "indexed", "chunks": len(item.pieces)},
                )
                for item in batch
            )
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.progress = progress
            job.heartbeat_at = utcnow()
            return job.cancel_requested_at is not None

    async def _swap(self, job_id: int, collection_id: int, redone: list[_Redone]) -> None:
        """Replace every re-cut document's chunk rows and record the recipe, in one transaction."""
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(IngestJob, job_id)
            assert job is not None
            if job.cancel_requested_at is not None:  # the last chance to leave everything as it was
                raise JobCancelled
            current = {
                document_id: sha
                for document_id, sha in await session.execute(
                    select(Document.id, Document.sha256).where(Document.collection_id == collection_id)
                )
            }
            for item in redone:
                if current.get(item.document_id) != item.sha256:  # re-ingested or deleted meanwhile
                    job.files_skipped += 1
                    continue
                removed = await session.execute(delete(ChunkRow).where(ChunkRow.document_id == item.document_id))
                job.chunks_removed += int(getattr(removed, "rowcount", 0) or 0)
                written = await insert_chunk_rows(
                    session,
                    collection_id=collection_id,
                    document_id=item.document_id,
                    path=item.path,
                    pieces=item.pieces,
                    vectors=item.vectors,
                    index_writer=self._index_writer,
                )
                document = await session.get(Document, item.document_id)
                assert document is not None
                document.chunk_count = written
                job.chunks_added += written
                job.files_changed += 1
            collection = await session.get(Collection, collection_id)
            assert collection is not None
            collection.recipe = self._recipe.to_json()
            job.progress = 0.95
            job.heartbeat_at = utcnow()


@dataclass(frozen=True, slots=True)
class RecipeStatus:
    """A collection's recorded recipe against the configured one."""

    collection: str
    recorded: IndexRecipe | None
    """``None``: unknown (chunks from before recipes were recorded) or no chunks yet."""
    chunks: int
    reindex_needed: bool


async def recipe_statuses(
    session: AsyncSession, configured: IndexRecipe, names: Sequence[str] | None = None
) -> list[RecipeStatus]:
    """Every collection's (or the named ones') recipe status, by name."""
    counts = (
        select(ChunkRow.collection_id.label("cid"), func.count(ChunkRow.id).label("n"))
        .group_by(ChunkRow.collection_id)
        .subquery()
    )
    stmt = (
        select(Collection.name, Collection.recipe, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.cid == Collection.id)
        .order_by(Collection.name)
    )
    if names is not None:
        stmt = stmt.where(Collection.name.in_(list(names)))
    out = []
    for name, raw, n in await session.execute(stmt):
        recorded = recipe_from_json(raw)
        out.append(RecipeStatus(name, recorded, int(n), reindex_needed(recorded, configured, has_chunks=int(n) > 0)))
    return out


async def warn_recipe_mismatches(sessionmaker: async_sessionmaker[AsyncSession], configured: IndexRecipe) -> int:
    """Log one warning per collection whose index needs a reindex (process start-up); return how many."""
    async with sessionmaker() as session:
        statuses = await recipe_statuses(session, configured)
    stale = [s for s in statuses if s.reindex_needed]
    for s in stale:
        was = (
            s.recorded.describe()
            if s.recorded is not None
            else "an unknown recipe (indexed before recipes were recorded)"
        )
        logger.warning(
            "collection %s was indexed with %s, but the configured recipe is %s: its index keeps answering "
            "with the old chunks until you run `rag reindex -c %s`",
            s.collection,
            was,
            configured.describe(),
            s.collection,
            extra={"collection": s.collection},
        )
    return len(stale)
