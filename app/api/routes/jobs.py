"""``/v1/jobs``: queue a server folder for ingestion, follow jobs (JSON or live events), cancel them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, status

from app.api import job_events
from app.api.deps import PrincipalDep, ResourcesDep, RowId, SessionDep
from app.api.errors import RESPONSES, error_event
from app.api.streaming import EventPump, SSEResponse, sse_event
from app.schemas.common import CollectionName, ErrorResponse, Page
from app.schemas.events import JobWireEvent, wire_dict
from app.schemas.jobs import JobCreate, JobList, JobOut
from app.services import jobs

router = APIRouter(prefix="/v1/jobs", tags=["ingestion jobs"], responses=RESPONSES)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a folder for ingestion",
    responses={403: {"model": ErrorResponse, "description": "The path is not under an allowed root."}},
)
async def create_job(body: JobCreate, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep) -> JobOut:
    """Queue the ingestion of a folder (or file) on the server into a collection; the worker runs it.

    The path must resolve, after following symlinks and `..`, to a place under one of the
    configured roots (`RAG_INGEST__ALLOWED_ROOTS`); anything else is refused with 403.
    """
    job, collection = await jobs.enqueue_folder(
        session,
        principal,
        path=body.path,
        collection=body.collection,
        prune=body.prune,
        allowed_roots=resources.settings.ingest.allowed_roots,
    )
    await session.commit()
    return JobOut.from_row(job, collection)


@router.get("", summary="List jobs")
async def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    collection: CollectionName | None = None,
    status_filter: Annotated[
        Literal["queued", "running", "succeeded", "failed", "cancelled"] | None, Query(alias="status")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobList:
    """Jobs of the collections the key may read, newest first."""
    rows, total = await jobs.list_jobs(
        session, principal, collection=collection, status=status_filter, limit=limit, offset=offset
    )
    return JobList(jobs=[JobOut.from_row(j, c) for j, c in rows], page=Page(total=total, limit=limit, offset=offset))


@router.get("/{job_id}", summary="Get a job")
async def get_job(job_id: RowId, session: SessionDep, principal: PrincipalDep) -> JobOut:
    """A job's status and progress."""
    job, collection = await jobs.get_job(session, principal, job_id)
    return JobOut.from_row(job, collection)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    responses={409: {"model": ErrorResponse, "description": "The job already ended."}},
)
async def cancel_job(job_id: RowId, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep) -> JobOut:
    """Cancel a job. A queued job is `cancelled` at once. A running job gets `cancel_requested`
    and keeps `running` until its worker stops at the next batch boundary (within one embedding
    batch): what it committed stays indexed, the rest of the folder is left for the next job, and
    the job ends `cancelled`. Repeating the request is harmless; a finished job answers 409."""
    job, collection = await jobs.cancel_job(session, principal, job_id)
    await session.commit()
    resources.job_wakeups.wake(job_id)  # this process's watchers report the request before the worker acts
    return JobOut.from_row(job, collection)


def _job_frame(item: tuple[int | None, JobWireEvent]) -> bytes:
    event_id, event = item
    return sse_event(event.type, event.model_dump(mode="json"), event_id=event_id)


def _job_error_frame(exc: BaseException) -> bytes:
    event = error_event(exc)
    return sse_event(event.type, wire_dict(event))


@router.get(
    "/{job_id}/events",
    summary="Follow a job as Server-Sent Events",
    response_class=SSEResponse,
    response_model=None,
    status_code=200,
    responses={
        200: {
            "description": "`file` events (each with an `id:`), `progress` events when the counters move, then "
            "`job_end` (see `JobEvent`). Comment lines (`: ping`) keep idle connections open.",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/JobEvent"}}},
        }
    },
)
async def job_events_stream(
    job_id: RowId,
    principal: PrincipalDep,
    resources: ResourcesDep,
    after: Annotated[int, Query(ge=0, description="Skip `file` events up to this id.")] = 0,
    last_event_id: Annotated[int | None, Header(ge=0, description="Sent by a reconnecting EventSource.")] = None,
) -> SSEResponse[tuple[int | None, JobWireEvent]]:
    """The job's progress as it happens, from any process's worker: per file `started`, `indexed`,
    `unchanged`, `failed` or `deleted`; counters with rate and ETA; the final record in `job_end`
    (also for a job that already ended: its events are replayed first). `Last-Event-ID` (or
    `after`) resumes after the last event received."""
    await job_events.check_visible(resources, principal, job_id)
    start = max(after, last_event_id or 0)
    pump = EventPump(job_events.job_events(resources, principal, job_id, after=start)).start()
    return SSEResponse(
        pump,
        encode=_job_frame,
        ping_seconds=resources.settings.api.sse_ping_seconds,
        on_error=_job_error_frame,
    )
