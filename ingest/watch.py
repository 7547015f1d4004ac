"""Watched folders: file changes become ingestion jobs within seconds.

:func:`changes` turns a folder's file events into debounced bursts: it yields once a burst
of additions, modifications and deletions has been quiet for ``quiet`` seconds (or has gone
on for ``longest``, so that a copy of a thousand files starts being indexed before it ends).
Changes that arrive while the caller is busy with the previous burst (running its job) are
kept by the watcher and come out as the next burst: nothing is missed.

It watches with `watchfiles <https://watchfiles.helpmanual.io>`_ (Rust ``notify``: inotify on
Linux, FSEvents on macOS; one thread, no polling cost while idle), or, with
``force_polling``, by listing the folder every 0.3 s: the way to watch network and FUSE
filesystems, where inotify reports nothing. ``bench/watch.py`` measures both.

What a burst triggers is the ordinary job for the whole folder (``ingest.pipeline``): the
same incremental rules as ``rag ingest`` (unchanged files are recognised by their hash and
skipped, deleted ones pruned). :func:`enqueue_unless_pending` queues it for the worker unless
an identical job is already waiting, so a burst during a long job adds at most one more.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.models import IngestJob
from ingest import queue

logger = logging.getLogger(__name__)

POLL_DELAY_MS = 300


def _visible(root: Path, raw: str) -> bool:
    """Whether a changed path is one the pipeline would read (no hidden file or folder on its way)."""
    path = Path(raw)
    try:
        parts = path.relative_to(root).parts if root.is_dir() else (path.name,)
    except ValueError:
        return False
    return not any(part.startswith(".") for part in parts)


async def changes(
    root: Path,
    *,
    quiet: float = 1.0,
    longest: float | None = None,
    force_polling: bool = False,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[set[Path]]:
    """Yield the set of changed paths under ``root``, one debounced burst at a time.

    Args:
        root: A folder (watched recursively) or a file.
        quiet: Seconds without a new change that end a burst.
        longest: Seconds after which a burst is yielded even if changes keep coming
            (default: 5 x ``quiet``, at least 1.6 s).
        force_polling: List the folder every 0.3 s instead of using inotify.
        stop: Ends the iteration when set.

    Hidden files and folders (names starting with ``.``, which ingestion skips) are ignored.
    """
    from watchfiles import awatch

    real = root.expanduser().resolve()
    longest = max(1.6, 5 * quiet) if longest is None else max(longest, quiet)
    async for burst in awatch(
        real,
        watch_filter=lambda _change, path: _visible(real, path),
        step=max(1, int(quiet * 1000)),
        debounce=int(longest * 1000),
        stop_event=stop,
        force_polling=force_polling,
        poll_delay_ms=POLL_DELAY_MS,
    ):
        paths = {Path(p) for _change, p in burst}
        if paths:
            logger.info("files changed", extra={"root": str(real), "changed": len(paths)})
            yield paths


async def enqueue_unless_pending(
    sessionmaker: async_sessionmaker[AsyncSession], root: Path, *, collection: str, prune: bool
) -> int | None:
    """Queue a job for ``root`` unless one for the same folder and collection is already queued.

    A *running* job does not count: it may have listed the folder before the change.

    Returns:
        The new job's id, or None when a queued one will pick the change up.
    """
    resolved = str(root.expanduser().resolve())
    async with sessionmaker() as session:
        coll = await queue.get_or_create_collection(session, collection)
        pending = await session.scalar(
            select(IngestJob.id).where(
                IngestJob.collection_id == coll.id,
                IngestJob.root_path == resolved,
                IngestJob.status == "queued",
            )
        )
        if pending is not None:
            await session.commit()
            return None
        job = await queue.enqueue(session, collection=coll, root_path=resolved, prune=prune)
        await session.commit()
        return job.id


async def watch_folders(
    sessionmaker: async_sessionmaker[AsyncSession],
    folders: Sequence[tuple[Path, str, bool]],
    *,
    quiet: float,
    force_polling: bool,
    stop: asyncio.Event,
    wake: asyncio.Event | None = None,
) -> None:
    """Keep ``folders`` (path, collection, prune) ingested until ``stop`` is set.

    Queues one job per folder at once (changes made while nothing watched are caught up), then
    one per burst of changes. ``wake`` is set after each enqueue, so an idle worker claims the
    job without waiting for its next poll. The folders must exist (the worker checks them at
    start, before it loads the model).
    """

    async def one(path: Path, collection: str, prune: bool) -> None:
        await _enqueue(path, collection, prune)
        async for _burst in changes(path, quiet=quiet, force_polling=force_polling, stop=stop):
            await _enqueue(path, collection, prune)

    async def _enqueue(path: Path, collection: str, prune: bool) -> None:
        try:
            job_id = await enqueue_unless_pending(sessionmaker, path, collection=collection, prune=prune)
        except Exception:  # the database blinked: the next burst (or restart) queues it
            logger.warning("could not queue a job for a watched folder", exc_info=True, extra={"root": str(path)})
            return
        if job_id is not None:
            logger.info("watched folder queued", extra={"root": str(path), "job_id": job_id})
            if wake is not None:
                wake.set()

    await asyncio.gather(*(one(p, c, pr) for p, c, pr in folders))
