"""One ingestion job: walk -> hash -> load -> split -> embed -> record -> publish.

Contract:
- A file whose sha256 equals the recorded one is *unchanged* and not read again (whatever
  its earlier outcome: a corrupt file stays failed until its content changes).
- New and changed files are loaded, split and embedded off the event loop. Their old
  chunks are replaced in the same transaction that records the new ones, together with
  the job's counters, so a crash (even ``kill -9``) leaves the database at a batch
  boundary; the job is then claimed again and the files already recorded are unchanged.
- A file that fails (corrupt, encrypted, binary, empty, too large, over a limit such as a zip
  bomb or a huge sheet) is recorded as ``failed`` with the reason and the batch goes on.
- Every loaded file's extraction report (pages read, pages OCR'd, characters, warnings) is
  stored with its document; the job keeps the totals and the reports of the files that were
  OCR'd or warned about (:func:`add_report`), written with the batch that loaded them.
- With ``prune``, documents under a folder root that are no longer on disk are deleted.
- A collection's chunks all come from one index recipe (``retrieval.recipe``): the first chunks
  of a collection record the configured recipe on its row, and a job for a collection whose
  recorded recipe differs from the configured one fails at once with :class:`RecipeMismatchError`
  (run ``rag reindex`` first) instead of adding chunks cut or embedded another way. Each indexed
  document's extracted text and layout are stored with it, so a reindex never reads files.
- The index is published by reconciling it with the database (see ``ingest.indexer``),
  during long jobs every ``publish_every`` seconds and always at the end.
- A cancel request (``queue.request_cancel``) is seen at the next batch boundary, or within
  ``check_seconds`` while unchanged files stream by: the batch being embedded is still
  committed, the files after it are left for the next job, nothing is pruned, the index is
  published and the job ends ``cancelled``.
- Progress leaves the process as ``file`` event rows (``IngestJobEvent``: started, indexed,
  unchanged, failed, deleted), written with the batch that records them (or within
  ``check_seconds`` for those that write nothing), so the API's event streams never show a
  file before the counters that include it.
Memory stays bounded: files are prepared a few at a time and embedded in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.base import utcnow
from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document, IngestJob, IngestJobEvent
from core.pgindex.writer import IndexedChunk, PgIndexWriter
from ingest import queue
from ingest.indexer import reconcile, vector_to_bytes
from ingest.loaders import LoaderError, LoaderLimits, loader_for
from ingest.loaders.base import LoadedDocument
from ingest.splitter import Piece, Splitter
from ingest.stored import layout_of
from retrieval.chunk_context import embedded_text
from retrieval.recipe import IndexRecipe, recipe_from_json
from retrieval.types import Embedder, IndexCatalog

logger = logging.getLogger(__name__)

MAX_RECORDED_ERRORS = 1000
MAX_RECORDED_REPORTS = 1000
_TOTALS = ("files", "pages", "pages_ocr", "characters", "ocr_seconds", "warnings")


def add_report(extraction: dict[str, Any] | None, path: str, report: dict[str, Any]) -> dict[str, Any]:
    """A job's ``extraction`` with one more file's report (a new dict; the argument is not changed).

    Totals: ``files`` (loaded), ``pages`` (sections read: pages, slides, sheets), ``pages_ocr``,
    ``characters``, ``ocr_seconds``, ``warnings`` (their number). ``reports`` lists, up to
    :data:`MAX_RECORDED_REPORTS`, the reports (with their ``path``) of files that were OCR'd or
    had warnings: the ones worth a look; every document keeps its own report.
    """
    out: dict[str, Any] = {name: 0 for name in _TOTALS}
    out.update({k: v for k, v in (extraction or {}).items() if k in _TOTALS})
    out["files"] += 1
    out["pages"] += int(report.get("pages") or 0)
    out["pages_ocr"] += int(report.get("pages_ocr") or 0)
    out["characters"] += int(report.get("characters") or 0)
    out["ocr_seconds"] = round(float(out["ocr_seconds"]) + float(report.get("ocr_seconds") or 0.0), 3)
    out["warnings"] += len(report.get("warnings") or ())
    notable = list((extraction or {}).get("reports") or [])
    if (report.get("pages_ocr") or report.get("warnings")) and len(notable) < MAX_RECORDED_REPORTS:
        notable.append({"path": path, **report})
    out["reports"] = notable
    return out


class ProgressCallback(Protocol):
    """Called after every file: files done, files total, the file's path, its outcome, and the
    chunks it added (0 for unchanged and failed files). Changed files are reported when their
    batch is written, so ``done`` moves in steps; a reporter that must speak at fixed intervals
    (:class:`core.progress.Progress`) repeats the last state in between."""

    def __call__(self, done: int, total: int, path: str, outcome: str, *, chunks: int = 0) -> None: ...


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file found under the job's root."""

    path: Path
    size: int
    mtime: float


@dataclass(slots=True)
class Prepared:
    """A file after hashing and (when new or changed) loading and splitting."""

    entry: FileEntry
    sha256: str
    outcome: str  # unchanged | new | changed
    document: LoadedDocument | None = None
    pieces: list[Piece] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class JobSummary:
    """The result of a job, as ``rag ingest --json`` prints it."""

    job_id: int
    status: str
    collection: str
    files: dict[str, int]
    chunks: dict[str, int]
    errors: list[dict[str, str]]
    seconds: float = 0.0
    extraction: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The documented JSON shape (scripts rely on these keys)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "collection": self.collection,
            "files": self.files,
            "chunks": self.chunks,
            "errors": self.errors,
            "extraction": self.extraction,
            "seconds": round(self.seconds, 3),
        }


class JobCancelled(Exception):
    """Raised inside a job when its cancel request is seen (the job then ends ``cancelled``)."""


class RecipeMismatchError(Exception):
    """The collection's chunks were made with another index recipe than the configured one."""

    def __init__(self, collection: str, recorded: IndexRecipe, configured: IndexRecipe) -> None:
        changes = "; ".join(recorded.differences(configured))
        super().__init__(
            f"collection {collection!r} was indexed with another recipe ({changes}); adding chunks made with "
            f"the configured one would mix them. Run `rag reindex -c {collection}` first (its index keeps "
            "answering meanwhile), or configure the recorded recipe again"
        )
        self.collection = collection


async def check_recipe(session: AsyncSession, collection: Collection, recipe: IndexRecipe | None) -> None:
    """Before a job adds chunks: record ``recipe`` on a collection without chunks, refuse a collection
    whose recorded recipe differs (flushes, never commits).

    A collection whose recipe is unknown (chunks from before recipes were recorded) is let through:
    nothing is known to differ; ``rag reindex`` records one.

    Raises:
        RecipeMismatchError: The recorded recipe differs and the collection has chunks.
    """
    if recipe is None:
        return
    has_chunks = (
        await session.scalar(select(ChunkRow.id).where(ChunkRow.collection_id == collection.id).limit(1))
    ) is not None
    recorded = recipe_from_json(collection.recipe)
    if not has_chunks:
        if recorded != recipe:
            collection.recipe = recipe.to_json()
            await session.flush()
    elif recorded is not None and recorded != recipe:
        raise RecipeMismatchError(collection.name, recorded, recipe)


class PathChangedError(Exception):
    """A job's folder resolves somewhere else than when the job was queued (a symlink swap)."""


def _is_utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # os.walk hands undecodable bytes over as lone surrogates
        return False
    return True


def _printable(path: Path) -> str:
    """``path`` for messages: undecodable bytes shown as U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def iter_files(root: Path) -> Iterator[FileEntry]:
    """Regular files under ``root`` (or ``root`` itself), sorted, skipping hidden names.

    Symlinks are not followed (a link could lead outside the folder an operator named).
    """
    if root.is_file():
        st = root.stat()
        yield FileEntry(root, st.st_size, st.st_mtime)
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            st = path.stat()
            yield FileEntry(path, st.st_size, st.st_mtime)


def without_stem_title(document: LoadedDocument, path: Path) -> LoadedDocument:
    """``document`` for the splitter: its title dropped when it is only the file stem.

    Loaders fall back to the file stem as a display title; as chunk context (what is embedded
    before each chunk) a file name is noise as often as not: hash-like names cost 0.03
    nDCG@10 on the FAQ dev set (``bench/chunk_recipes.py``, recipe ``title-or-stem``).
    """
    return replace(document, title=None) if document.title == path.stem else document


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Streamed sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


async def insert_chunk_rows(
    session: AsyncSession,
    *,
    collection_id: int,
    document_id: int,
    path: str,
    pieces: Sequence[Piece],
    vectors: npt.NDArray[np.float32],
    index_writer: PgIndexWriter | None,
) -> int:
    """Insert one document's chunk rows (``vectors[i]`` is ``pieces[i]``'s) and, with the postgres
    backend, its index rows in the same transaction; return how many chunks were written.

    The one place a chunk row is shaped: ingestion and reindexing both write through it.
    """
    values = [
        {
            "document_id": document_id,
            "collection_id": collection_id,
            "ordinal": piece.ordinal,
            "text": piece.text,
            "start": piece.start,
            "end": piece.end,
            "page": piece.page,
            "token_count": piece.token_count,
            "heading": piece.heading,
            "location": piece.location,
            "embedding": vector_to_bytes(vectors[i]),
        }
        for i, piece in enumerate(pieces)
    ]
    if values and index_writer is not None:
        ids = await session.scalars(insert(ChunkRow).returning(ChunkRow.id, sort_by_parameter_order=True), values)
        await index_writer.add(
            session,
            collection_id=collection_id,
            chunks=[
                IndexedChunk(chunk_id, document_id, path, piece.text, vectors[i], piece.heading, piece.ordinal)
                for i, (chunk_id, piece) in enumerate(zip(ids.all(), pieces, strict=True))
            ],
        )
    elif values:
        await session.execute(insert(ChunkRow), values)
    return len(values)


async def beat_while_running(
    sessionmaker: async_sessionmaker[AsyncSession], job_id: int, worker_id: str, seconds: float
) -> None:
    """Record ``worker_id``'s heartbeat on the job every ``seconds`` until cancelled (run it as a task)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            async with sessionmaker() as session:
                await queue.heartbeat(session, job_id, worker_id)
        except Exception:  # a missed beat is not fatal; the next one retries
            logger.warning("heartbeat failed", exc_info=True, extra={"job_id": job_id})


class IngestPipeline:
    """Runs ingestion jobs. One instance per process; jobs run one at a time per instance."""

    def __init__(
        self,
        *,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: IndexCatalog,
        embedder: Embedder,
        splitter: Splitter,
        worker_id: str,
        max_file_bytes: int,
        limits: LoaderLimits | None = None,
        batch_chunks: int = 256,
        prefetch: int = 8,
        heartbeat_seconds: float = 5.0,
        publish_every: float = 30.0,
        check_seconds: float = 1.0,
        executor: Executor | None = None,
        index_writer: PgIndexWriter | None = None,
        recipe: IndexRecipe | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        # The configured index recipe (None: not checked, for tests of other parts).
        self._recipe = recipe
        self._store = store
        # The postgres backend's index is written in each batch's transaction, with the chunk rows.
        self._index_writer = index_writer
        self._embedder = embedder
        self._splitter = splitter
        self._worker_id = worker_id
        self._max_file_bytes = max_file_bytes
        # What a loader may spend on one file (sizes, zip bombs, sheet rows and cells, OCR).
        self._limits = limits or LoaderLimits(max_bytes=max_file_bytes)
        self._batch_chunks = batch_chunks
        self._prefetch = prefetch
        self._heartbeat_seconds = heartbeat_seconds
        self._publish_every = publish_every
        self._check_seconds = check_seconds
        # File events waiting to be written (the prep thread appends "started"; list.append is atomic).
        self._events: list[dict[str, Any]] = []
        # Preparation (hash, parse, split) runs on its own thread so it overlaps with
        # embedding, which releases the GIL inside torch.
        self._prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-prep")
        self._embed_executor = executor

    def close(self) -> None:
        """Stop the preparation thread."""
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    # -- preparation (runs on the prep thread) -------------------------------------------------

    def _prepare(self, entry: FileEntry, known_sha: str | None) -> Prepared:
        try:
            sha = sha256_file(entry.path)
        except OSError as e:
            return Prepared(entry, "", "new" if known_sha is None else "changed", error=f"unreadable: {e}")
        if sha == known_sha:
            return Prepared(entry, sha, "unchanged")
        outcome = "new" if known_sha is None else "changed"
        self._events.append({"path": str(entry.path), "status": "started"})
        loader = loader_for(entry.path, limits=self._limits)
        if loader is None:  # filtered before, but a race with a rename must not crash the job
            return Prepared(entry, sha, outcome, error="unsupported file type")
        try:
            document = loader.load(entry.path)
            pieces = self._splitter.split(without_stem_title(document, entry.path))
        except LoaderError as e:
            return Prepared(entry, sha, outcome, error=str(e))
        except Exception as e:  # a parser bug on one file must not stop the batch
            logger.exception("unexpected error while loading", extra={"path": str(entry.path)})
            return Prepared(entry, sha, outcome, error=f"unexpected error: {type(e).__name__}: {e}")
        if not pieces:
            return Prepared(entry, sha, outcome, document=document, error="no text to index")
        return Prepared(entry, sha, outcome, document=document, pieces=pieces)

    # -- the job --------------------------------------------------------------------------------

    async def run(self, job_id: int, *, on_progress: ProgressCallback | None = None) -> JobSummary:
        """Run a claimed job to completion and return its summary.

        The job must already be ``running`` and owned by this worker (see ``queue.claim``).
        """
        started = time.monotonic()
        async with self._sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            if job is None:
                raise ValueError(f"no ingest job {job_id}")
            collection = await session.get(Collection, job.collection_id)
            assert collection is not None
            collection_name, collection_id = collection.name, collection.id
            root = Path(job.root_path)
            prune = job.prune
        heartbeat = asyncio.create_task(
            beat_while_running(self._sessionmaker, job_id, self._worker_id, self._heartbeat_seconds)
        )
        self._events.clear()
        try:
            await self._run(job_id, collection_id, collection_name, root, prune, on_progress)
            status, error = "succeeded", None
        except JobCancelled:
            logger.info("ingest job cancelled", extra={"job_id": job_id})
            status, error = "cancelled", "cancelled by request"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("ingest job failed", extra={"job_id": job_id})
            status, error = "failed", f"{type(e).__name__}: {e}"
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        # Publish even after a failure: whatever was committed becomes searchable.
        await reconcile(self._sessionmaker, self._store, collection_name)
        async with self._sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.status = status
            job.error = error
            job.finished_at = utcnow()
            self._add_events(session, job_id)
            job.progress = 1.0 if status == "succeeded" else job.progress
            total = await session.scalar(
                select(func.count()).select_from(ChunkRow).where(ChunkRow.collection_id == collection_id)
            )
            await session.commit()
            return summarize(job, collection_name, int(total or 0), time.monotonic() - started)

    async def _run(
        self,
        job_id: int,
        collection_id: int,
        collection_name: str,
        root: Path,
        prune: bool,
        on_progress: ProgressCallback | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        # The path was resolved (and, for the API, checked against the allowed roots) when the job
        # was queued. If it resolves elsewhere now, something was swapped for a symbolic link in
        # between: never follow it out.
        real = await loop.run_in_executor(self._prep_pool, root.resolve)
        if real != root:
            raise PathChangedError(
                f"{root} now resolves to {real}: a symbolic link was put in its place after the job was "
                "queued; it is not followed"
            )
        listed = await loop.run_in_executor(self._prep_pool, lambda: list(iter_files(root)))
        # A name that is not valid UTF-8 cannot be stored or shown; that file fails, the rest goes on.
        entries = [e for e in listed if _is_utf8_name(e.path)]
        misnamed = [e for e in listed if not _is_utf8_name(e.path)]
        prefix = str(root) if root.is_file() else str(root).rstrip(os.sep) + os.sep
        async with self._sessionmaker() as session:
            rows = await session.execute(
                select(Document.path, Document.sha256, Document.last_job_id).where(
                    Document.collection_id == collection_id
                )
            )
            known = {p: (s, j) for p, s, j in rows if p == str(root) or p.startswith(prefix)}
            collection = await session.get(Collection, collection_id)
            assert collection is not None
            await check_recipe(session, collection, self._recipe)
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.files_total = len(listed)
            if misnamed and job.attempts <= 1:  # a retried job counted them in its first attempt
                job.files_failed = len(misnamed)
                job.errors = [
                    {"path": _printable(e.path), "reason": "the file name is not valid UTF-8; rename the file"}
                    for e in misnamed[:MAX_RECORDED_ERRORS]
                ]
            await session.commit()

        if await self._tick(job_id):  # cancelled between the claim and now
            raise JobCancelled
        last_check = time.monotonic()
        supported = [e for e in entries if loader_for(e.path) is not None]
        skipped = len(entries) - len(supported)
        seen = {str(e.path) for e in supported}
        batch: list[Prepared] = []
        batch_pieces = 0
        done = skipped
        last_publish = time.monotonic()
        # On a retried job, files recorded by the earlier attempt are already counted.
        async with self._sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            assert job is not None
            resumed = job.attempts > 1
            job.files_skipped = skipped
            job.files_seen = len(entries)
            # Unchanged files are counted afresh by every attempt (they are not written).
            job.files_unchanged = 0
            await session.commit()
        unchanged = 0

        async for prepared in self._prepared(supported, known):
            done += 1
            if prepared.outcome == "unchanged":
                counted_before = resumed and known.get(str(prepared.entry.path), ("", None))[1] == job_id
                if not counted_before:
                    unchanged += 1
                self._events.append({"path": str(prepared.entry.path), "status": "unchanged"})
                if on_progress:
                    on_progress(done, len(entries), str(prepared.entry.path), "unchanged")
                if time.monotonic() - last_check >= self._check_seconds:
                    if await self._tick(job_id, done / len(entries)):
                        raise JobCancelled
                    last_check = time.monotonic()
                continue
            batch.append(prepared)
            batch_pieces += len(prepared.pieces)
            if batch_pieces >= self._batch_chunks:
                cancel = await self._flush(job_id, collection_id, batch, done, len(entries), unchanged)
                last_check = time.monotonic()
                if on_progress:
                    for p in batch:
                        on_progress(done, len(entries), str(p.entry.path), _outcome(p), chunks=_added(p))
                batch, batch_pieces, unchanged = [], 0, 0
                if cancel:
                    raise JobCancelled
                if time.monotonic() - last_publish > self._publish_every:
                    await reconcile(self._sessionmaker, self._store, collection_name)
                    last_publish = time.monotonic()
        if batch or unchanged:
            cancel = await self._flush(job_id, collection_id, batch, done, len(entries), unchanged)
            if on_progress:
                for p in batch:
                    on_progress(done, len(entries), str(p.entry.path), _outcome(p), chunks=_added(p))
            if cancel:  # everything is recorded; only the prune is left undone
                raise JobCancelled
        if prune and root.is_dir():
            gone = [path for path in known if path not in seen]
            await self._prune(job_id, collection_id, gone)

    async def _prepared(
        self, entries: list[FileEntry], known: dict[str, tuple[str, int | None]]
    ) -> AsyncIterator[Prepared]:
        """Yield prepared files in order, keeping up to ``prefetch`` in flight on the prep thread."""
        pending: list[Future[Prepared]] = []
        it = iter(entries)
        try:
            while True:
                while len(pending) < self._prefetch:
                    entry = next(it, None)
                    if entry is None:
                        break
                    sha = known.get(str(entry.path), (None, None))[0]
                    pending.append(self._prep_pool.submit(self._prepare, entry, sha))
                if not pending:
                    return
                yield await asyncio.wrap_future(pending.pop(0))
        finally:
            for fut in pending:
                fut.cancel()

    def _add_events(self, session: AsyncSession, job_id: int) -> None:
        """Move the buffered file events into ``session`` (written when it commits)."""
        # Take a prefix and delete exactly it: an event the prep thread appends meanwhile stays queued.
        taken = len(self._events)
        events = self._events[:taken]
        del self._events[:taken]
        session.add_all(IngestJobEvent(job_id=job_id, type="file", data=data) for data in events)

    async def _tick(self, job_id: int, progress: float | None = None) -> bool:
        """Write the buffered file events (and ``progress``); return whether the job was asked to stop."""
        async with self._sessionmaker() as session, session.begin():
            self._add_events(session, job_id)
            if progress is not None:
                await session.execute(update(IngestJob).where(IngestJob.id == job_id).values(progress=progress))
            return await queue.cancel_requested(session, job_id)

    async def _flush(
        self, job_id: int, collection_id: int, batch: list[Prepared], done: int, total: int, unchanged: int
    ) -> bool:
        """Embed a batch and record it, with the job's counters and file events, in one transaction.

        Returns:
            Whether the job was asked to stop (read in the same transaction).
        """
        # What is embedded carries the piece's context (title, headings); what is stored is its text.
        texts = [embedded_text(piece.text, piece.context) for p in batch for piece in p.pieces]
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(self._embed_executor, self._embedder.embed_documents, texts)
        row = 0
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(IngestJob, job_id)
            assert job is not None
            job.files_unchanged += unchanged
            errors = list(job.errors or [])
            for p in batch:
                path = str(p.entry.path)
                document = await session.scalar(
                    select(Document).where(Document.collection_id == collection_id, Document.path == path)
                )
                if document is not None:
                    removed = await session.execute(delete(ChunkRow).where(ChunkRow.document_id == document.id))
                    job.chunks_removed += int(getattr(removed, "rowcount", 0) or 0)
                else:
                    document = Document(collection_id=collection_id, path=path, meta={})
                    session.add(document)
                loaded = p.document
                document.sha256 = p.sha256
                document.size = p.entry.size
                document.mtime = p.entry.mtime
                document.last_job_id = job_id
                document.format = loaded.format if loaded else p.entry.path.suffix.lstrip(".").lower()
                document.title = loaded.title if loaded else None
                document.page_count = loaded.page_count if loaded else None
                document.meta = dict(loaded.metadata) if loaded else {}
                document.report = loaded.report() if loaded else None
                # Kept for reindexing without the file (only what chunks were cut from).
                document.text = loaded.text if loaded and p.error is None else None
                document.layout = layout_of(loaded) if loaded and p.error is None else None
                if loaded is not None:
                    job.extraction = add_report(job.extraction, path, loaded.report())
                document.chunk_count = len(p.pieces) if p.error is None else 0
                self._events.append(
                    {"path": path, "status": "failed" if p.error else "indexed", "chunks": _added(p), "error": p.error}
                )
                if p.error is not None:
                    document.status, document.error = "failed", p.error
                    job.files_failed += 1
                    if len(errors) < MAX_RECORDED_ERRORS:
                        errors.append({"path": path, "reason": p.error})
                else:
                    document.status, document.error = "indexed", None
                    if p.outcome == "new":
                        job.files_new += 1
                    else:
                        job.files_changed += 1
                await session.flush()
                if p.error is None:
                    job.chunks_added += await insert_chunk_rows(
                        session,
                        collection_id=collection_id,
                        document_id=document.id,
                        path=path,
                        pieces=p.pieces,
                        vectors=vectors[row : row + len(p.pieces)],
                        index_writer=self._index_writer,
                    )
                row += len(p.pieces)
            job.errors = errors
            job.progress = done / total if total else 1.0
            job.heartbeat_at = utcnow()
            self._add_events(session, job_id)
            return job.cancel_requested_at is not None

    async def _prune(self, job_id: int, collection_id: int, paths: list[str]) -> None:
        if not paths:
            return
        async with self._sessionmaker() as session, session.begin():
            job = await session.get(IngestJob, job_id)
            assert job is not None
            for start in range(0, len(paths), 500):
                part = paths[start : start + 500]
                removed = await session.scalar(
                    select(func.coalesce(func.sum(Document.chunk_count), 0)).where(
                        Document.collection_id == collection_id, Document.path.in_(part)
                    )
                )
                deleted = await session.execute(
                    delete(Document).where(Document.collection_id == collection_id, Document.path.in_(part))
                )
                job.files_deleted += int(getattr(deleted, "rowcount", 0) or 0)
                job.chunks_removed += int(removed or 0)
                self._events.extend({"path": path, "status": "deleted"} for path in part)
            self._add_events(session, job_id)


def _outcome(p: Prepared) -> str:
    return "failed" if p.error is not None else p.outcome


def _added(p: Prepared) -> int:
    return 0 if p.error is not None else len(p.pieces)


def summarize(job: IngestJob, collection: str, total_chunks: int, seconds: float) -> JobSummary:
    """Turn a job row into the documented summary."""
    return JobSummary(
        job_id=job.id,
        status=job.status,
        collection=collection,
        files=job.file_counts(),
        chunks={"added": job.chunks_added, "removed": job.chunks_removed, "total": total_chunks},
        errors=list(job.errors or []),
        seconds=seconds,
        extraction=dict(job.extraction or {}),
    )


def default_worker_id() -> str:
    """host:pid, unique enough to tell workers apart in the jobs table."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"
