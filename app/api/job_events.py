"""An ingestion job's progress as wire events, for ``GET /v1/jobs/{id}/events`` and the websocket.

How progress crosses from the worker process to the API: the worker appends ``file`` rows to
``ingest_job_events`` in the transaction that records their batch, and updates the job's
counters; :func:`job_events` polls both every ``api.job_events_poll_seconds`` in a short
transaction of its own (no connection is held between polls). Rows in the database were chosen
over PostgreSQL ``LISTEN/NOTIFY`` and Redis pub/sub because they work the same on the embedded
SQLite default and on PostgreSQL with no other component, survive a restart of either process,
and let a client that reconnects resume where it stopped (``Last-Event-ID`` is the row id); a
poll costs one indexed query per stream and half a second of delay at most, against a file that
takes hundreds of milliseconds to embed.

The stream: every ``file`` event, a ``progress`` event whenever the counters moved (and once at
the start), and ``job_end`` with the final job record once the job ended and every event was
sent. A job the principal cannot see is ``NotFound`` before the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from app.resources import Resources
from app.schemas.events import JobEndEvent, JobFileEvent, JobProgressEvent, JobWireEvent
from app.schemas.jobs import JobFiles, JobOut
from app.services import jobs
from app.services.keys import Principal
from core.db.base import utcnow
from core.db.models import IngestJob, IngestJobEvent
from ingest.queue import TERMINAL

PAGE = 500


def file_event(row: IngestJobEvent) -> JobFileEvent:
    """The wire form of one ``file`` row."""
    data = row.data or {}
    return JobFileEvent(
        event_id=row.id,
        job_id=row.job_id,
        path=str(data.get("path", "")),
        status=data.get("status", "started"),
        chunks=int(data.get("chunks") or 0),
        error=data.get("error"),
    )


def progress_event(job: IngestJob) -> JobProgressEvent:
    """Counters, rates (averages since the worker started the job) and the ETA they imply."""
    total = job.files_total
    done = min(total, round(job.progress * total)) if job.status == "running" else 0
    elapsed = (utcnow() - job.started_at).total_seconds() if job.started_at is not None else 0.0
    elapsed = max(0.0, elapsed)
    files_rate = done / elapsed if done and elapsed > 0 else None
    chunks_rate = job.chunks_added / elapsed if job.chunks_added and elapsed > 0 else None
    eta = (total - done) / files_rate if files_rate else None
    return JobProgressEvent(
        job_id=job.id,
        status=job.status,
        cancel_requested=job.cancel_requested_at is not None,
        done=done,
        total=total,
        files=JobFiles(**job.file_counts()),
        chunks_added=job.chunks_added,
        elapsed_seconds=round(elapsed, 3),
        files_per_second=None if files_rate is None else round(files_rate, 3),
        chunks_per_second=None if chunks_rate is None else round(chunks_rate, 3),
        eta_seconds=None if eta is None else round(eta, 1),
    )


async def check_visible(resources: Resources, principal: Principal, job_id: int) -> None:
    """Raise ``NotFound`` unless the job exists and its collection is the principal's to read."""
    async with resources.sessionmaker() as session:
        await jobs.get_job(session, principal, job_id)


async def job_events(
    resources: Resources, principal: Principal, job_id: int, *, after: int = 0
) -> AsyncIterator[tuple[int | None, JobWireEvent]]:
    """Yield ``(event id, event)`` until the job's ``job_end`` (``file`` events carry their row id).

    Args:
        after: Skip ``file`` events up to this id (a reconnecting client's ``Last-Event-ID``).

    Raises:
        NotFound: The job is missing or not the principal's to see (also if it is deleted meanwhile).
    """
    poll = resources.settings.api.job_events_poll_seconds
    wakeup = resources.job_wakeups.subscribe(job_id)
    try:
        async with contextlib.aclosing(_poll(resources, principal, job_id, after, poll, wakeup)) as events:
            async for item in events:
                yield item
    finally:
        resources.job_wakeups.unsubscribe(job_id, wakeup)


async def _poll(
    resources: Resources, principal: Principal, job_id: int, after: int, poll: float, wakeup: asyncio.Event
) -> AsyncGenerator[tuple[int | None, JobWireEvent], None]:
    last: tuple[object, ...] | None = None
    while True:
        async with resources.sessionmaker() as session:
            job, collection, rows = await jobs.job_progress(session, principal, job_id, after=after, limit=PAGE)
        for row in rows:
            after = row.id
            yield row.id, file_event(row)
        ended = job.status in TERMINAL
        if not ended:
            progress = progress_event(job)
            state = (progress.status, progress.cancel_requested, progress.done, progress.total, progress.files)
            if state != last:
                last = state
                yield None, progress
        if ended and len(rows) < PAGE:
            yield None, JobEndEvent(job=JobOut.from_row(job, collection))
            return
        if len(rows) < PAGE:
            # Until the next poll, or until a change made through this process wakes us.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), poll)
            wakeup.clear()
