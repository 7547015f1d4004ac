"""``/v1/jobs``: queue a server folder for ingestion, follow jobs (JSON or live events), cancel them."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, status

from app.api.deps import PrincipalDep, ResourcesDep, RowId, SessionDep
from app.api.errors import RESPONSES
from app.schemas.common import CollectionName, ErrorResponse, Page
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
async def cancel_job(job_id: RowId, session: SessionDep, principal: PrincipalDep) -> JobOut:
    """Cancel a job. A queued job is `cancelled` at once. A running job gets `cancel_requested`
    and keeps `running` until its worker stops at the next batch boundary (within one embedding
    batch): what it committed stays indexed, the rest of the folder is left for the next job, and
    the job ends `cancelled`. Repeating the request is harmless; a finished job answers 409."""
    job, collection = await jobs.cancel_job(session, principal, job_id)
    return JobOut.from_row(job, collection)
