"""The ingestion job queue, kept in the ``ingest_jobs`` table.

Claiming is safe with several workers: on PostgreSQL the candidate row is locked with
``SELECT ... FOR UPDATE SKIP LOCKED``; on every backend the claim itself is a conditional
``UPDATE`` that succeeds for exactly one claimer. A running job whose heartbeat is older
than ``stale_after`` was abandoned (its worker died) and is claimed again; after
``max_attempts`` claims it is failed instead, so a file that kills the worker cannot loop
forever.

Cancelling (:func:`request_cancel`): a queued job is cancelled at once; a running one gets
``cancel_requested_at`` and its worker stops at the next batch boundary (see
``ingest.pipeline``), keeping what it committed. A running job abandoned after a cancel request
is cancelled by the next claim instead of being retried.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from core.db.base import utcnow
from core.db.models import Collection, IngestJob
from retrieval.types import validate_collection_name

TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running", *TERMINAL)


class QueueError(Exception):
    """Base class of job-queue errors."""


class InvalidCollectionName(QueueError):
    """A collection name that is not a safe identifier."""


class JobFinished(QueueError):
    """A cancel request for a job that already ended (``status`` says how)."""

    def __init__(self, job_id: int, status: str) -> None:
        super().__init__(f"job {job_id} already ended ({status}); nothing to cancel")
        self.job_id = job_id
        self.status = status


def check_collection_name(name: str) -> str:
    """Return ``name`` if it is a valid collection name (it is also a directory name on disk).

    Raises:
        InvalidCollectionName: with the rule in the message.
    """
    try:
        return validate_collection_name(name)
    except ValueError as e:
        raise InvalidCollectionName(str(e)) from None


async def get_or_create_collection(session: AsyncSession, name: str) -> Collection:
    """The collection called ``name``, created if missing (flushes, never commits)."""
    check_collection_name(name)
    found = await session.scalar(select(Collection).where(Collection.name == name))
    if found is not None:
        return found
    collection = Collection(name=name)
    session.add(collection)
    await session.flush()
    return collection


async def enqueue(session: AsyncSession, *, collection: Collection, root_path: str, prune: bool) -> IngestJob:
    """Add a queued job (flushes, never commits)."""
    job = IngestJob(collection_id=collection.id, root_path=root_path, prune=prune, status="queued", errors=[])
    session.add(job)
    await session.flush()
    return job


async def enqueue_reindex(session: AsyncSession, *, collection: Collection) -> tuple[IngestJob, bool]:
    """Queue a ``reindex`` job of ``collection`` (flushes, never commits), unless one is already queued
    or running: then that one is returned. Returns ``(job, created)``."""
    existing = await session.scalar(
        select(IngestJob)
        .where(
            IngestJob.collection_id == collection.id,
            IngestJob.kind == "reindex",
            IngestJob.status.in_(("queued", "running")),
        )
        .order_by(IngestJob.id)
        .limit(1)
    )
    if existing is not None:
        return existing, False
    job = IngestJob(collection_id=collection.id, kind="reindex", root_path="", prune=False, status="queued", errors=[])
    session.add(job)
    await session.flush()
    return job, True


async def claim(
    session: AsyncSession,
    *,
    worker_id: str,
    stale_after: float,
    max_attempts: int = 3,
    job_id: int | None = None,
) -> IngestJob | None:
    """Claim the oldest runnable job (or ``job_id``) for ``worker_id`` and commit the claim.

    Returns None when nothing is runnable. Jobs abandoned ``max_attempts`` times are
    marked failed on the way.
    """
    while True:
        now = utcnow()
        stale = now - timedelta(seconds=stale_after)
        runnable = or_(
            IngestJob.status == "queued",
            and_(IngestJob.status == "running", IngestJob.heartbeat_at < stale),
        )
        stmt = select(IngestJob.id, IngestJob.status, IngestJob.attempts, IngestJob.cancel_requested_at).where(runnable)
        if job_id is not None:
            stmt = stmt.where(IngestJob.id == job_id)
        stmt = stmt.order_by(IngestJob.created_at, IngestJob.id).limit(1)
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        row = (await session.execute(stmt)).first()
        if row is None:
            await session.commit()
            return None
        candidate_id, status, attempts, cancel_requested = row
        values: dict[str, Any]
        if cancel_requested is not None:  # abandoned while a cancel was pending: honour it
            values = {"status": "cancelled", "finished_at": now, "error": "cancelled by request"}
        elif attempts >= max_attempts:
            values = {
                "status": "failed",
                "finished_at": now,
                "error": f"abandoned by its worker {attempts} times (crash or kill while ingesting)",
            }
        else:
            values = {"status": "running", "attempts": attempts + 1, "worker_id": worker_id, "heartbeat_at": now}
        # Conditional on the state we read: exactly one concurrent claimer wins.
        result = await session.execute(
            update(IngestJob)
            .where(IngestJob.id == candidate_id, IngestJob.status == status, IngestJob.attempts == attempts)
            .values(**values)
        )
        await session.commit()
        if getattr(result, "rowcount", 0) != 1 or values["status"] != "running":
            continue
        job = await session.get(IngestJob, candidate_id, populate_existing=True)
        if job is not None and job.started_at is None:
            job.started_at = now
            await session.commit()
        return job


async def heartbeat(session: AsyncSession, job_id: int, worker_id: str) -> bool:
    """Refresh a running job's heartbeat; False if this worker no longer owns it."""
    result = await session.execute(
        update(IngestJob)
        .where(IngestJob.id == job_id, IngestJob.worker_id == worker_id, IngestJob.status == "running")
        .values(heartbeat_at=utcnow())
    )
    await session.commit()
    return getattr(result, "rowcount", 0) == 1


async def request_cancel(session: AsyncSession, job_id: int) -> IngestJob:
    """Cancel a queued job now, or ask a running job's worker to stop (flushes; the caller commits).

    Idempotent for a running job (the first request's time is kept).

    Returns:
        The job row as it is after the request (``cancelled``, or ``running`` with
        ``cancel_requested_at`` set).

    Raises:
        LookupError: No such job.
        JobFinished: The job had already ended.
    """
    now = utcnow()
    # Conditional updates, so that a claim racing with the cancel cannot lose it: the queued job
    # is either cancelled here or claimed (and then stopped through cancel_requested_at).
    queued = await session.execute(
        update(IngestJob)
        .where(IngestJob.id == job_id, IngestJob.status == "queued")
        .values(status="cancelled", finished_at=now, cancel_requested_at=now, error="cancelled by request")
    )
    await session.execute(
        update(IngestJob)
        .where(IngestJob.id == job_id, IngestJob.status == "running", IngestJob.cancel_requested_at.is_(None))
        .values(cancel_requested_at=now)
    )
    job = await session.get(IngestJob, job_id, populate_existing=True)
    if job is None:
        raise LookupError(f"no ingest job {job_id}")
    if job.status in TERMINAL and getattr(queued, "rowcount", 0) != 1:
        raise JobFinished(job_id, job.status)
    return job


async def cancel_requested(session: AsyncSession, job_id: int) -> bool:
    """Whether someone asked ``job_id`` to stop (a cheap read the worker makes between batches)."""
    requested = await session.scalar(select(IngestJob.cancel_requested_at).where(IngestJob.id == job_id))
    return requested is not None
