"""Ingestion jobs through the API: enqueue a server folder, follow its progress, list jobs, cancel.

The API never ingests: it queues a job row and the worker process claims it. A folder may be
ingested only if it resolves (symlinks followed, ``..`` collapsed) to a path under one of the
configured ``ingest.allowed_roots``, themselves resolved; anything else is ``Forbidden``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.services import collections as collections_service
from app.services.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.services.keys import Principal
from core.db.models import Collection, IngestJob, IngestJobEvent
from ingest import queue


def resolve_allowed(raw: str, roots: Sequence[Path]) -> Path:
    """The real path of ``raw`` if it lies under one of ``roots`` (blocking: touches the disk).

    Raises:
        InvalidInput: ``raw`` is not absolute.
        Forbidden: No roots are configured, or the real path is outside all of them (``..``
            tricks and symlinks leading out included).
        NotFound: The path does not exist but would be under a root.
    """
    path = Path(raw)
    if not path.is_absolute():
        raise InvalidInput("the path must be absolute", field="body.path")
    if not roots:
        raise Forbidden(
            "no folder may be ingested through the API: the server has no allowed roots (RAG_INGEST__ALLOWED_ROOTS)"
        )
    real_roots = [r.expanduser().resolve() for r in roots]
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        lexical = Path(os.path.normpath(path))
        if any(lexical.is_relative_to(r) for r in real_roots):
            raise NotFound(f"{raw} does not exist") from None
        raise Forbidden(f"{raw} is not under an allowed ingestion root") from None
    if not any(real.is_relative_to(r) for r in real_roots):
        raise Forbidden(f"{raw} is not under an allowed ingestion root")
    return real


async def enqueue_folder(
    session: AsyncSession,
    principal: Principal,
    *,
    path: str,
    collection: str,
    prune: bool,
    allowed_roots: Sequence[Path],
) -> tuple[IngestJob, str]:
    """Queue an ingestion of ``path`` into an existing collection (flushes, never commits).

    Raises:
        NotFound: The collection is missing or outside the principal's scope; the path is missing.
        Forbidden: The path is outside the allowed roots.
        InvalidInput: A relative path.
    """
    coll = await collections_service.require(session, principal, collection)
    real = await asyncio.to_thread(resolve_allowed, path, allowed_roots)
    job = await queue.enqueue(session, collection=coll, root_path=str(real), prune=prune)
    return job, coll.name


async def get_job(session: AsyncSession, principal: Principal, job_id: int) -> tuple[IngestJob, str]:
    """A job and its collection's name.

    Raises:
        NotFound: Missing, or its collection is outside the principal's scope.
    """
    row = (
        await session.execute(
            select(IngestJob, Collection.name)
            .join(Collection, Collection.id == IngestJob.collection_id)
            .where(IngestJob.id == job_id)
        )
    ).first()
    if row is None or not principal.can_read(row[1]):
        raise NotFound(f"job {job_id} not found")
    return row[0], row[1]


async def cancel_job(session: AsyncSession, principal: Principal, job_id: int) -> tuple[IngestJob, str]:
    """Cancel a queued job, or ask a running one to stop at its next batch boundary (never commits).

    Raises:
        NotFound: Missing, or its collection is outside the principal's scope.
        Conflict: The job already ended.
    """
    _job, collection = await get_job(session, principal, job_id)
    try:
        job = await queue.request_cancel(session, job_id)
    except queue.JobFinished as e:
        raise Conflict(str(e)) from None
    except LookupError:  # deleted with its collection in between
        raise NotFound(f"job {job_id} not found") from None
    return job, collection


async def job_progress(
    session: AsyncSession, principal: Principal, job_id: int, *, after: int = 0, limit: int = 500
) -> tuple[IngestJob, str, list[IngestJobEvent]]:
    """A job, its collection, and its progress events with an id above ``after`` (oldest first).

    The job is read before the events: once it reads as ended, every event of it is visible
    (the worker writes the last ones with the final status).

    Raises:
        NotFound: Missing, or its collection is outside the principal's scope.
    """
    job, collection = await get_job(session, principal, job_id)
    events = await session.scalars(
        select(IngestJobEvent)
        .where(IngestJobEvent.job_id == job_id, IngestJobEvent.id > after)
        .order_by(IngestJobEvent.id)
        .limit(limit)
    )
    return job, collection, list(events)


async def list_jobs(
    session: AsyncSession,
    principal: Principal,
    *,
    collection: str | None = None,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[tuple[IngestJob, str]], int]:
    """Jobs of the visible collections, newest first, and their total count."""
    where = []
    if collection is not None:
        await collections_service.require(session, principal, collection)
        where.append(Collection.name == collection)
    elif not principal.admin:
        where.append(Collection.name.in_(sorted(principal.collections)))
    if status is not None:
        where.append(IngestJob.status == status)
    base = select(IngestJob, Collection.name).join(Collection, Collection.id == IngestJob.collection_id)
    total = await session.scalar(
        select(func.count(IngestJob.id)).join(Collection, Collection.id == IngestJob.collection_id).where(*where)
    )
    rows = await session.execute(base.where(*where).order_by(IngestJob.id.desc()).limit(limit).offset(offset))
    return [(job, name) for job, name in rows], int(total or 0)


async def job_counts(session: AsyncSession) -> tuple[dict[str, int], tuple[int, int, float]]:
    """Jobs per status, and (files seen, files total, mean progress) of running jobs (for /metrics)."""
    by_status = {
        status: int(n)
        for status, n in await session.execute(
            select(IngestJob.status, func.count(IngestJob.id)).group_by(IngestJob.status)
        )
    }
    seen, total, progress = (
        await session.execute(
            select(
                func.coalesce(func.sum(IngestJob.files_seen), 0),
                func.coalesce(func.sum(IngestJob.files_total), 0),
                func.coalesce(func.avg(IngestJob.progress), 0.0),
            ).where(IngestJob.status == "running")
        )
    ).one()
    return by_status, (int(seen), int(total), float(progress))


class JobWakeups:
    """Wakes this process's watchers of a job at once (instead of at their next poll).

    Job events are polled from the database (the worker is another process), every
    ``api.job_events_poll_seconds``. A change made through this API process, such as a cancel
    request, wakes the job's watchers here so that they report it before the worker acts on it:
    a worker that stops within the poll interval used to end the job before any watcher had seen
    ``cancel_requested``. Watchers served by another replica still see it at their next poll.
    """

    def __init__(self) -> None:
        self._events: dict[int, set[asyncio.Event]] = {}

    def subscribe(self, job_id: int) -> asyncio.Event:
        """An event set by :meth:`wake` for ``job_id``; pass it to :meth:`unsubscribe` when done."""
        event = asyncio.Event()
        self._events.setdefault(job_id, set()).add(event)
        return event

    def unsubscribe(self, job_id: int, event: asyncio.Event) -> None:
        watchers = self._events.get(job_id)
        if watchers is not None:
            watchers.discard(event)
            if not watchers:
                del self._events[job_id]

    def wake(self, job_id: int) -> None:
        """Wake every watcher of ``job_id`` in this process."""
        for event in self._events.get(job_id, ()):
            event.set()
