"""``/v1/collections``."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import PrincipalDep, ResourcesDep, SessionDep
from app.api.errors import RESPONSES
from app.schemas.collections import CollectionCreate, CollectionList, CollectionOut, ReindexRequest
from app.schemas.common import CollectionName, ErrorResponse
from app.schemas.jobs import JobOut
from app.services import collections

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=RESPONSES)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Create a collection",
    responses={
        403: {"model": ErrorResponse, "description": "Outside the key's scope."},
        409: {"model": ErrorResponse, "description": "The name is taken."},
    },
)
async def create_collection(
    body: CollectionCreate, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep
) -> CollectionOut:
    """Create an empty collection; fill it by uploading documents or queueing a folder job."""
    created = await collections.create(session, principal, name=body.name, description=body.description)
    await session.commit()
    return CollectionOut.from_info(await collections.get(session, principal, created.name, configured=resources.recipe))


@router.get("", summary="List collections")
async def list_collections(session: SessionDep, principal: PrincipalDep, resources: ResourcesDep) -> CollectionList:
    """The collections the API key may read, with document and chunk counts, each index's recipe and
    whether it differs from the configured one (`reindex_needed`)."""
    infos = await collections.list_visible(session, principal, configured=resources.recipe)
    return CollectionList(collections=[CollectionOut.from_info(i) for i in infos])


@router.get("/{name}", summary="Get a collection")
async def get_collection(
    name: CollectionName, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep
) -> CollectionOut:
    """One collection with its counts, its index's recipe and `reindex_needed`."""
    return CollectionOut.from_info(await collections.get(session, principal, name, configured=resources.recipe))


@router.post(
    "/{name}/reindex",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Rebuild a collection's index with the configured recipe",
    responses={409: {"model": ErrorResponse, "description": "Already built with the configured recipe, or empty."}},
)
async def reindex_collection(
    name: CollectionName,
    session: SessionDep,
    principal: PrincipalDep,
    resources: ResourcesDep,
    body: ReindexRequest | None = None,
) -> JobOut:
    """Queue a `reindex` job: the worker re-chunks and re-embeds the collection from its stored texts
    (no file is read) with the configured chunking and embedding recipe, and swaps the new chunks in
    at once. Searches keep answering from the existing index until then. A reindex of the collection
    that is already queued or running is returned instead of a second one. Follow it like any job
    (`GET /v1/jobs/{id}`, `/events`, cancel)."""
    force = body.force if body is not None else False
    job, _created = await collections.reindex(session, principal, name, configured=resources.recipe, force=force)
    await session.commit()
    return JobOut.from_row(job, name)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a collection",
    responses={409: {"model": ErrorResponse, "description": "An ingestion job is running."}},
)
async def delete_collection(
    name: CollectionName, session: SessionDep, principal: PrincipalDep, resources: ResourcesDep
) -> None:
    """Delete the collection: documents, chunks, jobs and conversations, then its index and uploads."""
    settings = resources.settings
    await collections.delete(session, principal, name, stale_after=settings.ingest.stale_after_seconds)
    await session.commit()
    await collections.purge_files(resources.store, settings.uploads_dir, name)
