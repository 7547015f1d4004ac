"""Collections: create, list and inspect (with counts and index recipe), queue a reindex, delete
(rows, index, uploaded files).

Every function takes the :class:`~app.services.keys.Principal`; a collection outside its scope
is reported exactly like a missing one (``NotFound``), so keys cannot probe for names.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.services.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.services.keys import Principal
from core.db.base import utcnow
from core.db.models import Collection, Document, IngestJob
from ingest import queue
from ingest.queue import InvalidCollectionName, check_collection_name
from retrieval.recipe import IndexRecipe, recipe_from_json, reindex_needed
from retrieval.types import IndexCatalog


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection with its document and chunk counts and its index recipe."""

    id: int
    name: str
    description: str | None
    created_at: datetime
    documents: int
    failed_documents: int
    chunks: int
    recipe: IndexRecipe | None = None
    """The recipe its chunks were made with (``None``: unknown, or no chunks yet)."""
    reindex_needed: bool = False
    """Its chunks' recipe differs from the configured one (or is unknown): ``rag reindex``."""


def _not_found(name: str) -> NotFound:
    return NotFound(f"collection {name!r} not found")


def valid_name(name: str, *, field: str = "name") -> str:
    """``name`` if it is a valid collection name, else ``InvalidInput`` naming ``field``."""
    try:
        return check_collection_name(name)
    except InvalidCollectionName as e:
        raise InvalidInput(str(e), field=field) from e


async def require(session: AsyncSession, principal: Principal, name: str) -> Collection:
    """The collection called ``name`` if it exists and ``principal`` may read it.

    Raises:
        NotFound: Missing, or outside the principal's scope.
    """
    if not principal.can_read(name):
        raise _not_found(name)
    found = await session.scalar(select(Collection).where(Collection.name == name))
    if found is None:
        raise _not_found(name)
    return found


async def create(
    session: AsyncSession, principal: Principal, *, name: str, description: str | None = None
) -> Collection:
    """Create a collection (flushes, never commits).

    Raises:
        InvalidInput: An invalid name.
        Forbidden: A scoped key creating a collection outside its scope.
        Conflict: The name is taken.
    """
    valid_name(name)
    if not principal.can_read(name):
        raise Forbidden(f"this API key may not create collection {name!r} (it is outside the key's scope)")
    if await session.scalar(select(Collection.id).where(Collection.name == name)) is not None:
        raise Conflict(f"collection {name!r} already exists")
    collection = Collection(name=name, description=description)
    session.add(collection)
    await session.flush()
    return collection


def _info_query() -> Select[tuple[Collection, int, int, int]]:
    docs = (
        select(
            Document.collection_id.label("cid"),
            func.count(Document.id).label("documents"),
            func.coalesce(func.sum(case((Document.status == "failed", 1), else_=0)), 0).label("failed"),
            func.coalesce(func.sum(Document.chunk_count), 0).label("chunks"),
        )
        .group_by(Document.collection_id)
        .subquery()
    )
    return select(
        Collection,
        func.coalesce(docs.c.documents, 0),
        func.coalesce(docs.c.failed, 0),
        func.coalesce(docs.c.chunks, 0),
    ).outerjoin(docs, docs.c.cid == Collection.id)


def _info(row: tuple[Collection, int, int, int], configured: IndexRecipe) -> CollectionInfo:
    c, documents, failed, chunks = row
    recipe = recipe_from_json(c.recipe)
    return CollectionInfo(
        c.id,
        c.name,
        c.description,
        c.created_at,
        int(documents),
        int(failed),
        int(chunks),
        recipe=recipe,
        reindex_needed=reindex_needed(recipe, configured, has_chunks=int(chunks) > 0),
    )


async def list_visible(session: AsyncSession, principal: Principal, *, configured: IndexRecipe) -> list[CollectionInfo]:
    """The collections ``principal`` may see, by name, with counts and recipes (compared with
    ``configured``, the process's :func:`core.wiring.index_recipe`)."""
    stmt = _info_query().order_by(Collection.name)
    if not principal.admin:
        stmt = stmt.where(Collection.name.in_(sorted(principal.collections)))
    return [_info(row.tuple(), configured) for row in await session.execute(stmt)]


async def get(session: AsyncSession, principal: Principal, name: str, *, configured: IndexRecipe) -> CollectionInfo:
    """One collection with counts.

    Raises:
        NotFound: Missing, or outside the principal's scope.
    """
    if not principal.can_read(name):
        raise _not_found(name)
    row = (await session.execute(_info_query().where(Collection.name == name))).first()
    if row is None:
        raise _not_found(name)
    return _info(row.tuple(), configured)


async def reindex(
    session: AsyncSession, principal: Principal, name: str, *, configured: IndexRecipe, force: bool = False
) -> tuple[IngestJob, bool]:
    """Queue a reindex of ``name`` with the configured recipe (flushes, never commits).

    Returns the job and whether it is new (a queued or running reindex of the collection is
    returned instead of a second one).

    Raises:
        NotFound: Missing, or outside the principal's scope.
        Conflict: The collection already has the configured recipe (and not ``force``), or no chunks.
    """
    info = await get(session, principal, name, configured=configured)
    if info.chunks == 0:
        raise Conflict(f"collection {name!r} has no chunks to reindex")
    if not info.reindex_needed and not force:
        raise Conflict(f"collection {name!r} is already indexed with the configured recipe; use force to rebuild it")
    collection = await require(session, principal, name)
    return await queue.enqueue_reindex(session, collection=collection)


async def visible_names(session: AsyncSession, principal: Principal) -> list[str]:
    """Names of the existing collections ``principal`` may see."""
    stmt = select(Collection.name).order_by(Collection.name)
    if not principal.admin:
        stmt = stmt.where(Collection.name.in_(sorted(principal.collections)))
    return list(await session.scalars(stmt))


async def delete(session: AsyncSession, principal: Principal, name: str, *, stale_after: float) -> Collection:
    """Delete the collection's rows (documents, chunks, jobs, conversations cascade); flushes.

    The caller commits, then calls :func:`purge_files` to drop the index and uploaded files.

    Raises:
        NotFound: Missing, or outside the principal's scope.
        Conflict: An ingestion job of the collection is running (its worker still writes).
    """
    collection = await require(session, principal, name)
    fresh = utcnow() - timedelta(seconds=stale_after)
    running = await session.scalar(
        select(func.count(IngestJob.id)).where(
            IngestJob.collection_id == collection.id,
            IngestJob.status == "running",
            IngestJob.heartbeat_at >= fresh,
        )
    )
    if running:
        raise Conflict(f"collection {name!r} is being ingested right now; delete it when the job has finished")
    await session.delete(collection)
    await session.flush()
    return collection


async def purge_files(store: IndexCatalog, uploads_dir: Path, name: str) -> None:
    """Drop a deleted collection's index snapshots and uploaded files (off the event loop)."""
    await asyncio.to_thread(store.drop, name)
    target = uploads_dir / name
    await asyncio.to_thread(shutil.rmtree, target, True)
