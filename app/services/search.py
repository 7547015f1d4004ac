"""Search: turn a request into retriever filters that respect the key's scope, and run it.

Scoping rule (the one place it is decided for search and answers): a key that names no
collection searches only its own collections; naming a collection outside its scope is
``NotFound``. Admins (and the anonymous local user when auth is off) search everything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.observability import Metrics
from app.services.admission import Gate
from app.services.collections import valid_name
from app.services.errors import InvalidInput, NotFound
from app.services.keys import Principal
from core.db.models import Collection
from retrieval.documents import DocumentHit, group_hits
from retrieval.types import (
    FusionMethod,
    IndexCatalog,
    Retriever,
    ScoredChunk,
    SearchFilters,
    SearchMode,
    SearchOptions,
    UnknownCollectionError,
)


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """Hits and how they were found."""

    hits: list[ScoredChunk]
    options: SearchOptions
    collections: tuple[str, ...] | None
    took_ms: float
    unavailable: tuple[str, ...] = ()
    """Collections left out because their index is unreadable (the worker rebuilds them)."""
    documents: list[DocumentHit] | None = None
    """With ``group_by="document"``: the ranked documents, each with its best chunks."""


GroupBy = Literal["chunk", "document"]
CHUNKS_PER_DOCUMENT = 5
"""A grouped search ranks documents from ``k`` x this many chunks: enough for ``k`` documents
with their evidence even when the best documents have several strong chunks each."""
DOCUMENT_DECAY = 0.0
"""How a document's further chunks add to its best one's score (:func:`retrieval.documents.rank_documents`);
the best chunk alone measured best on the dev sets (docs/retrieval.md)."""


def search_options(
    defaults: SearchOptions,
    *,
    mode: SearchMode | None = None,
    fusion: FusionMethod | None = None,
    alpha: float | None = None,
    rrf_k: int | None = None,
    depth: int | None = None,
) -> SearchOptions:
    """``defaults`` with the given overrides."""
    changes: dict[str, object] = {}
    for name, value in (("mode", mode), ("fusion", fusion), ("alpha", alpha), ("rrf_k", rrf_k), ("depth", depth)):
        if value is not None:
            changes[name] = value
    return replace(defaults, **changes)  # type: ignore[arg-type]


async def scope(
    session: AsyncSession, principal: Principal, store: IndexCatalog, requested: Sequence[str] | None
) -> tuple[str, ...] | None:
    """The collections a search may touch: ``None`` (all, admins only) or names that have an index.

    Requested collections that exist but have no index yet are dropped (they have nothing to
    find); missing or out-of-scope ones are ``NotFound``.

    Raises:
        NotFound: A requested collection is missing or outside the principal's scope.
        InvalidInput: An invalid collection name.
    """
    if requested is None and principal.admin:
        return None
    indexed = set(await asyncio.to_thread(store.collections))
    if requested is None:
        # Naming nothing means "what you can read": a collection whose index is broken is left out
        # (and reported) rather than failing the whole request.
        broken = store.unreadable()
        return tuple(sorted(c for c in principal.collections if c in indexed and c not in broken))
    names = list(dict.fromkeys(valid_name(c, field="collections") for c in requested))
    for name in names:
        if not principal.can_read(name):
            raise NotFound(f"collection {name!r} not found")
    unindexed = [n for n in names if n not in indexed]
    if unindexed:
        known = set(await session.scalars(select(Collection.name).where(Collection.name.in_(unindexed))))
        missing = [n for n in unindexed if n not in known]
        if missing:
            raise NotFound(f"collection {missing[0]!r} not found")
    return tuple(n for n in names if n in indexed)


async def search(
    session: AsyncSession,
    principal: Principal,
    *,
    retriever: Retriever,
    store: IndexCatalog,
    metrics: Metrics,
    gate: Gate,
    query: str,
    k: int,
    collections: Sequence[str] | None,
    path_prefix: str | None,
    options: SearchOptions,
    group_by: GroupBy = "chunk",
    evidence: int = 3,
) -> SearchOutcome:
    """Run a scoped search: ``k`` chunks, or with ``group_by="document"`` ``k`` documents with
    up to ``evidence`` chunks each (``hits`` then holds those chunks, document by document).

    Raises:
        NotFound: A requested collection is missing or outside the principal's scope.
        InvalidInput: Invalid options.
        Overloaded: Every search slot is busy and the queue is full.
    """
    allowed = await scope(session, principal, store, collections)
    started = time.perf_counter()
    grouped = group_by == "document"
    if allowed is not None and not allowed:
        return SearchOutcome([], options, allowed, 0.0, documents=[] if grouped else None)
    chunks = k * CHUNKS_PER_DOCUMENT if grouped else k
    try:
        async with gate.slot():  # bounded: beyond the slots and the short queue, refused (503) at once
            hits = await retriever.search(
                query, k=chunks, filters=SearchFilters(collections=allowed, path_prefix=path_prefix), options=options
            )
    except UnknownCollectionError as e:  # dropped between the scope check and the search
        raise NotFound(str(e)) from e
    except ValueError as e:
        raise InvalidInput(str(e)) from e
    elapsed = time.perf_counter() - started
    metrics.retrieval_latency.labels(leg=options.mode).observe(elapsed)
    unavailable: tuple[str, ...] = ()
    if collections is None:
        visible = principal.visible(sorted(store.unreadable()))
        unavailable = tuple(visible)
    documents = None
    if grouped:
        documents = group_hits(hits, k, decay=DOCUMENT_DECAY, evidence=evidence)
        hits = [h for doc in documents for h in doc.evidence]
    return SearchOutcome(hits, options, allowed, elapsed * 1000.0, unavailable, documents)
