"""``/v1/collections``."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import PrincipalDep, ResourcesDep, SessionDep
from app.api.errors import RESPONSES
from app.schemas.collections import CollectionCreate, CollectionList, CollectionOut
from app.schemas.common import CollectionName, ErrorResponse
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
async def create_collection(body: CollectionCreate, session: SessionDep, principal: PrincipalDep) -> CollectionOut:
    """Create an empty collection; fill it by uploading documents or queueing a folder job."""
    created = await collections.create(session, principal, name=body.name, description=body.description)
    await session.commit()
    return CollectionOut.from_info(await collections.get(session, principal, created.name))


@router.get("", summary="List collections")
async def list_collections(session: SessionDep, principal: PrincipalDep) -> CollectionList:
    """The collections the API key may read, with document and chunk counts."""
    return CollectionList(
        collections=[CollectionOut.from_info(i) for i in await collections.list_visible(session, principal)]
    )


@router.get("/{name}", summary="Get a collection")
async def get_collection(name: CollectionName, session: SessionDep, principal: PrincipalDep) -> CollectionOut:
    """One collection with its counts."""
    return CollectionOut.from_info(await collections.get(session, principal, name))


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
