"""Keeps the on-disk indexes equal to the database.

The database is the source of truth: every chunk row carries its embedding. Publishing a
collection's index means *reconciling* it: chunk ids present in the database but not in
the current snapshot are added (with their stored vectors), ids in the snapshot but gone
from the database are removed, and the store switches to the new version atomically.
Because reconciliation only looks at the two id sets, it repairs any crash between a
database commit and an index publish: run it again and the sets are equal.

The collection's recipe (``collections.recipe``: how its chunk rows were cut and embedded) is
recorded in the manifest of every version published here, so a snapshot always names the recipe
of the rows it was built from. A reindex swaps all of a collection's rows at once; the next
reconcile then finds no id in common and builds the new version from scratch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document
from retrieval.recipe import recipe_from_json
from retrieval.store import IndexStore, Snapshot
from retrieval.types import Chunk, IndexCatalog, IndexCorruptError, IndexMismatchError

logger = logging.getLogger(__name__)

_FETCH = 2000  # rows per query when loading missing chunks (bounded memory, few round trips)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What a reconciliation changed."""

    collection: str
    added: int
    removed: int
    total: int
    version: str | None


def vector_from_bytes(blob: bytes) -> np.ndarray:
    """Decode a stored embedding (little-endian float32)."""
    return np.frombuffer(blob, dtype="<f4")


def vector_to_bytes(vector: np.ndarray) -> bytes:
    """Encode an embedding for storage (little-endian float32)."""
    return np.asarray(vector, dtype="<f4").tobytes()


async def _db_ids(session: AsyncSession, collection_id: int) -> set[int]:
    rows = await session.scalars(select(ChunkRow.id).where(ChunkRow.collection_id == collection_id))
    return set(rows)


async def _load_chunks(
    session: AsyncSession, collection: Collection, ids: Sequence[int]
) -> tuple[list[Chunk], np.ndarray]:
    chunks: list[Chunk] = []
    vectors: list[np.ndarray] = []
    ordered = sorted(ids)
    for start in range(0, len(ordered), _FETCH):
        batch = ordered[start : start + _FETCH]
        rows = await session.execute(
            select(ChunkRow, Document.path, Document.title)
            .join(Document, Document.id == ChunkRow.document_id)
            .where(ChunkRow.id.in_(batch))
        )
        for row, path, title in rows:
            chunks.append(row.as_chunk(collection=collection.name, path=path, title=title))
            vectors.append(vector_from_bytes(row.embedding))
    matrix = np.vstack(vectors).astype(np.float32) if vectors else np.zeros((0, 0), dtype=np.float32)
    return chunks, matrix


async def reconcile(
    sessionmaker: async_sessionmaker[AsyncSession], store: IndexCatalog, collection_name: str, *, verify: bool = False
) -> ReconcileResult:
    """Make the collection's current index snapshot hold exactly the database's chunks.

    A transactional index (the ``postgres`` backend's, written with the chunk rows) is already
    equal to the database: nothing is done.

    A snapshot that cannot be read (:class:`~retrieval.types.IndexCorruptError`) is replaced by a
    new version built from scratch from the database, which holds every chunk and its vector:
    one corrupt file never stops ingestion, and searches of the collection work again once the
    new version is published.

    A snapshot of another embedding model (:class:`~retrieval.types.IndexMismatchError`) is rebuilt
    the same way when the database's rows are of the configured model (a reindex committed its
    rows and the process stopped before publishing); when the rows are of the old model too, it is
    left alone (searches of it fail until ``rag reindex`` rebuilds it) and nothing is published.
    """
    if store.transactional or not isinstance(store, IndexStore):
        return ReconcileResult(collection_name, 0, 0, 0, None)
    try:
        if verify:  # the files on disk, not the copy this process loaded earlier
            await asyncio.to_thread(store.check, collection_name)
        snapshot: Snapshot | None = await asyncio.to_thread(store.load, collection_name)
    except IndexCorruptError as e:
        logger.error(
            "index unreadable; rebuilding it from the database", extra={"collection": collection_name, "error": str(e)}
        )
        return await rebuild(sessionmaker, store, collection_name)
    except IndexMismatchError as e:
        async with sessionmaker() as session:
            recipe = recipe_from_json(
                await session.scalar(select(Collection.recipe).where(Collection.name == collection_name))
            )
        if recipe is not None and recipe.model_id == store.model_id and recipe.dimension == store.dimension:
            return await rebuild(sessionmaker, store, collection_name)
        logger.warning(
            "index built with another embedding model; run `rag reindex -c %s`",
            collection_name,
            extra={"collection": collection_name, "error": str(e)},
        )
        return ReconcileResult(collection_name, 0, 0, 0, None)
    have = {int(i) for i in snapshot.ids} if snapshot is not None else set()
    async with sessionmaker() as session:
        collection = await session.scalar(select(Collection).where(Collection.name == collection_name))
        if collection is None:
            if snapshot is not None:
                await asyncio.to_thread(store.drop, collection_name)
            return ReconcileResult(collection_name, 0, len(have), 0, None)
        recipe = recipe_from_json(collection.recipe)
        wanted = await _db_ids(session, collection.id)
        missing = wanted - have
        extra = have - wanted
        if snapshot is not None and not missing and not extra and snapshot.manifest.recipe == recipe:
            return ReconcileResult(collection_name, 0, 0, len(wanted), snapshot.version)
    if have and wanted and not have & wanted:
        # Every row was replaced (a reindex): a fresh index beats removing every id from a copy.
        return await rebuild(sessionmaker, store, collection_name)
    async with sessionmaker() as session:
        chunks, vectors = await _load_chunks(session, collection, list(missing))
    if vectors.size == 0:
        vectors = np.zeros((0, store.dimension), dtype=np.float32)
    new = await asyncio.to_thread(
        store.publish, collection_name, add=chunks, vectors=vectors, remove=extra, recipe=recipe
    )
    logger.info(
        "index published",
        extra={"collection": collection_name, "added": len(chunks), "removed": len(extra), "version": new.version},
    )
    return ReconcileResult(collection_name, len(chunks), len(extra), len(wanted), new.version)


async def rebuild(
    sessionmaker: async_sessionmaker[AsyncSession], store: IndexStore, collection_name: str
) -> ReconcileResult:
    """Publish a version of the collection built from scratch from the database's chunks and vectors."""
    async with sessionmaker() as session:
        collection = await session.scalar(select(Collection).where(Collection.name == collection_name))
        if collection is None:
            await asyncio.to_thread(store.drop, collection_name)
            return ReconcileResult(collection_name, 0, 0, 0, None)
        recipe = recipe_from_json(collection.recipe)
        wanted = await _db_ids(session, collection.id)
        chunks, vectors = await _load_chunks(session, collection, list(wanted))
    if vectors.size == 0:
        vectors = np.zeros((0, store.dimension), dtype=np.float32)
    new = await asyncio.to_thread(
        store.publish, collection_name, add=chunks, vectors=vectors, from_scratch=True, recipe=recipe
    )
    logger.warning(
        "index rebuilt from the database",
        extra={"collection": collection_name, "chunks": len(chunks), "version": new.version},
    )
    return ReconcileResult(collection_name, len(chunks), 0, len(wanted), new.version)


async def reconcile_all(
    sessionmaker: async_sessionmaker[AsyncSession], store: IndexCatalog, *, verify: bool = False
) -> list[ReconcileResult]:
    """Reconcile every collection known to the database or the store (worker start-up repair).

    With ``verify``, each live version's files are checked on disk first (:meth:`IndexStore.check`).
    """
    async with sessionmaker() as session:
        names = set(await session.scalars(select(Collection.name)))
    names |= set(await asyncio.to_thread(store.collections))
    return [await reconcile(sessionmaker, store, name, verify=verify) for name in sorted(names)]
