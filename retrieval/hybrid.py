"""Hybrid retrieval over every collection of an :class:`~retrieval.store.IndexStore`.

:class:`HybridRetriever` implements the :class:`~retrieval.types.Retriever` protocol. A
request

1. loads the live snapshot of each collection in the filter (or all of them),
2. embeds the query once (only when the mode has a dense leg),
3. runs each leg in each collection to ``options.depth`` candidates, restricted to the
   chunks matching ``filters.path_prefix`` in both legs; in hybrid mode, given a
   ``leg_executor``, the BM25 leg runs there *while* the query is embedded and searched
   (the embedding is most of a hybrid search's time, and the legs are independent),
4. merges each leg across collections (concatenate, re-rank by raw score) — dense
   scores are comparable across collections (same model); BM25 scores are only roughly
   comparable (per-collection idf), which is accepted here,
5. fuses the two legs per ``options`` (:mod:`retrieval.fusion`), or returns one leg as
   is in ``dense``/``sparse`` mode (score = the leg's raw score).

All CPU work (embedding, FAISS, BM25) runs in the executor, keeping the event loop free.

Tracing: spans ``retrieval.search`` > ``retrieval.embed_query``, ``retrieval.dense``,
``retrieval.bm25`` (on its own thread, same trace), ``retrieval.fusion`` (method and parameters)
come from the OpenTelemetry *API* only. With no SDK configured by the process (the default),
its tracer is a no-op: a span costs a non-recording object and a context switch, about a
microsecond against milliseconds of search, and attributes are only built when recording.
When recording, the search and its four stages are timed inline and become spans later
(:mod:`retrieval.tracing`: on a background thread, or in the span export process): an SDK span
costs 40-60 µs to create, too much to pay five times inside a search of a few milliseconds.

Errors: :class:`~retrieval.types.UnknownCollectionError` when the filter names a
collection without an index; :class:`~retrieval.types.IndexMismatchError` when the
embedder does not match the store; :class:`ValueError` for invalid options.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Sequence
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING

import numpy as np
from opentelemetry import trace

from retrieval.fusion import Fused, Legs, rrf, weighted
from retrieval.store import IndexStore, Snapshot
from retrieval.tracing import Stages
from retrieval.types import (
    Chunk,
    Embedder,
    IndexCorruptError,
    IndexMismatchError,
    LegScore,
    ScoredChunk,
    SearchFilters,
    SearchOptions,
    UnknownCollectionError,
    validate_search_options,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["HybridRetriever"]

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)


class _Leg:
    """One leg's per-collection results, merged into a single ranking."""

    __slots__ = ("ids", "scores", "sources")

    def __init__(self) -> None:
        self.ids: list[npt.NDArray[np.int64]] = []
        self.scores: list[npt.NDArray[np.float64]] = []
        self.sources: list[npt.NDArray[np.int32]] = []

    def extend(self, source: int, ids: npt.NDArray[np.int64], scores: npt.NDArray[np.floating]) -> None:
        self.ids.append(ids)
        self.scores.append(scores.astype(np.float64))
        self.sources.append(np.full(ids.size, source, dtype=np.int32))

    def ranked(self, depth: int, snapshots: Sequence[Snapshot], owner: dict[int, Chunk]) -> list[tuple[int, float]]:
        """Best-first ``(id, score)`` over all collections, cut at ``depth``; fills ``owner``."""
        if not self.ids:
            return []
        ids = np.concatenate(self.ids)
        scores = np.concatenate(self.scores)
        sources = np.concatenate(self.sources)
        order = np.lexsort((ids, -scores))  # score descending, then id: deterministic
        out: list[tuple[int, float]] = []
        seen: set[int] = set()
        for i in order.tolist():
            chunk_id = int(ids[i])
            if chunk_id in seen:
                # Chunk ids are database keys, unique across collections; a repeat means two
                # collections share an id, and the better-scored copy wins.
                log.warning("chunk id %d found in more than one collection", chunk_id)
                continue
            seen.add(chunk_id)
            owner.setdefault(chunk_id, snapshots[int(sources[i])].chunks[chunk_id])
            out.append((chunk_id, float(scores[i])))
            if len(out) == depth:
                break
        return out


class HybridRetriever:
    """Dense + BM25 retrieval with fusion, over the snapshots of an :class:`IndexStore`.

    Thread-safe; snapshots are immutable and reloaded by the store when a new version is
    published, so searches running during a publish see the old or the new version.

    Args:
        store: Where the collections' indexes live.
        embedder: Embeds queries; must be the model the store's indexes were built with.
        executor: Runs the CPU work of :meth:`search` (``None``: the loop's default executor).
        defaults: Options used when a request passes none.
        leg_executor: Runs the BM25 leg of hybrid searches concurrently with the dense leg
            (``None``: one after the other). It must not be ``executor``: a search waits for
            its BM25 leg, and a pool whose every thread waits would deadlock.

    Raises:
        IndexMismatchError: If ``embedder`` has another model id or dimension than ``store``.
        ValueError: If ``leg_executor`` is ``executor``.
    """

    def __init__(
        self,
        store: IndexStore,
        embedder: Embedder,
        *,
        executor: Executor | None = None,
        defaults: SearchOptions | None = None,
        leg_executor: Executor | None = None,
    ) -> None:
        if embedder.model_id != store.model_id or embedder.dimension != store.dimension:
            raise IndexMismatchError(
                f"the embedder is {embedder.model_id!r} ({embedder.dimension} dimensions) but the "
                f"index store expects {store.model_id!r} ({store.dimension} dimensions)"
            )
        if leg_executor is not None and leg_executor is executor:
            raise ValueError("leg_executor must be another executor than executor (a search waits for its leg)")
        self._store = store
        self._embedder = embedder
        self._executor = executor
        self._leg_executor = leg_executor
        self._defaults = defaults or SearchOptions()
        validate_search_options(self._defaults)

    @property
    def defaults(self) -> SearchOptions:
        """Options used when a request passes none."""
        return self._defaults

    async def search(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        """Return at most ``k`` chunks, best first (:meth:`search_sync` in the executor)."""
        loop = asyncio.get_running_loop()
        # The search's own span is timed here and made later with its stages (retrieval.tracing).
        stages = Stages(_tracer, root="retrieval.search")
        if stages.recording:
            opts = options or self._defaults
            stages.root_attributes.update({"rag.k": k, "rag.mode": opts.mode, "rag.depth": opts.depth})
            if filters is not None and filters.collections is not None:
                stages.root_attributes["rag.collections"] = list(filters.collections)
        # run_in_executor does not carry context variables: the thread sees this request's trace.
        call = functools.partial(
            contextvars.copy_context().run, self._search, query, k=k, filters=filters, options=options, stages=stages
        )
        try:
            return await loop.run_in_executor(self._executor, call)
        except BaseException as e:
            stages.fail(e)
            raise
        finally:
            stages.publish()

    def _snapshots(self, filters: SearchFilters | None) -> list[Snapshot]:
        if filters is None or filters.collections is None:
            found: list[Snapshot] = []
            for name in self._store.collections():
                try:
                    snapshot = self._store.load(name)
                except IndexCorruptError as e:
                    # A search of every collection serves the healthy ones; the store remembers the
                    # broken one (IndexStore.unreadable) so the caller can name it.
                    log.warning(
                        "skipping a collection whose index is unreadable", extra={"collection": name, "error": str(e)}
                    )
                    continue
                if snapshot is not None:  # a collection dropped between listing and loading is simply gone
                    found.append(snapshot)
            return found
        snapshots = []
        for name in dict.fromkeys(filters.collections):  # de-duplicated, order kept
            snapshot = self._store.load(name)
            if snapshot is None:
                raise UnknownCollectionError(f"collection {name!r} has no index")
            snapshots.append(snapshot)
        return snapshots

    def search_sync(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        """Blocking search; same contract as :meth:`search`.

        Args:
            query: The user's question.
            k: Maximum number of results (``k <= 0`` returns nothing).
            filters: Collections (``None``: all) and an optional chunk path prefix.
            options: Mode, fusion and parameters (``None``: the retriever's defaults).

        Returns:
            Up to ``k`` chunks, best first, each with its rank (1-based), its final score
            (fused score, or the raw leg score in single-leg modes) and per-leg evidence.

        Raises:
            UnknownCollectionError: If ``filters.collections`` names a collection without
                an index.
            ValueError: For invalid options.
        """
        stages = Stages(_tracer)
        try:
            return self._search(query, k=k, filters=filters, options=options, stages=stages)
        finally:
            stages.publish()

    def _search(
        self,
        query: str,
        *,
        k: int,
        filters: SearchFilters | None,
        options: SearchOptions | None,
        stages: Stages,
    ) -> list[ScoredChunk]:
        """:meth:`search_sync` recording into ``stages`` (published by the caller)."""
        opts = options or self._defaults
        validate_search_options(opts)
        if k <= 0:
            return []
        snapshots = self._snapshots(filters)
        prefix = filters.path_prefix if filters is not None else None
        # Each leg must reach at least k candidates for a single-leg mode to return k.
        depth = max(opts.depth, k)

        allowed: list[npt.NDArray[np.int64] | None] = []
        for snap in snapshots:
            allowed.append(None if prefix is None else snap.ids_with_path_prefix(prefix))
        searchable = [
            (i, snap, ok)
            for i, (snap, ok) in enumerate(zip(snapshots, allowed, strict=True))
            if len(snap) and (ok is None or ok.size)
        ]
        if not searchable:
            return []

        return self._search_legs(query, k, opts, snapshots, searchable, depth, stages)

    def _search_legs(
        self,
        query: str,
        k: int,
        opts: SearchOptions,
        snapshots: list[Snapshot],
        searchable: _Searchable,
        depth: int,
        stages: Stages,
    ) -> list[ScoredChunk]:
        use_dense = opts.mode in ("hybrid", "dense")
        use_sparse = opts.mode in ("hybrid", "sparse")
        pending: Future[_Leg] | None = None
        if use_sparse and use_dense and self._leg_executor is not None:
            pending = self._leg_executor.submit(_sparse_leg, query, searchable, depth, stages)
        dense_leg = _Leg()
        try:
            if use_dense:
                with stages.stage("retrieval.embed_query"):
                    vector = self._embedder.embed_query(query)  # once per request, for all collections
                with stages.stage("retrieval.dense") as attributes:
                    for i, snap, ok in searchable:
                        found: tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]
                        found = snap.dense.search(vector, depth, ok)
                        if opts.lead_weight > 0:
                            found = snap.leads().blend(vector, *found, weight=opts.lead_weight, k=depth, allowed=ok)
                        dense_leg.extend(i, *found)
                    attributes["rag.depth"] = depth
        finally:
            if pending is not None and not pending.done():
                # Wait even when the dense leg failed: the BM25 leg must not outlive its request.
                wait([pending])
        if pending is not None:
            sparse_leg = pending.result()
        else:
            sparse_leg = _sparse_leg(query, searchable, depth, stages) if use_sparse else _Leg()

        owner: dict[int, Chunk] = {}
        dense = dense_leg.ranked(depth, snapshots, owner)
        sparse = sparse_leg.ranked(depth, snapshots, owner)

        if opts.mode == "dense":
            return _single(dense, k, owner, leg="dense")
        if opts.mode == "sparse":
            return _single(sparse, k, owner, leg="sparse")
        legs = Legs(dense=dense, sparse=sparse)
        fused: list[Fused]
        with stages.stage("retrieval.fusion") as attributes:
            if opts.fusion == "rrf":
                fused = rrf(legs, k=opts.rrf_k, weights=(opts.dense_weight, opts.sparse_weight))
            else:
                fused = weighted(legs, alpha=opts.alpha, normalization=opts.normalization)
            if stages.recording:
                attributes.update(
                    {
                        "rag.fusion.method": opts.fusion,
                        "rag.fusion.alpha": opts.alpha,
                        "rag.fusion.normalization": opts.normalization,
                        "rag.fusion.rrf_k": opts.rrf_k,
                        "rag.fusion.dense_weight": opts.dense_weight,
                        "rag.fusion.sparse_weight": opts.sparse_weight,
                        "rag.fusion.dense_candidates": len(dense),
                        "rag.fusion.sparse_candidates": len(sparse),
                    }
                )
        return [
            ScoredChunk(chunk=owner[row.id], score=row.score, rank=rank, dense=row.dense, sparse=row.sparse)
            for rank, row in enumerate(fused[:k], start=1)
        ]


_Searchable = Sequence[tuple[int, "Snapshot", "npt.NDArray[np.int64] | None"]]


def _sparse_leg(query: str, searchable: _Searchable, depth: int, stages: Stages) -> _Leg:
    """The BM25 leg over every searchable snapshot."""
    leg = _Leg()
    with stages.stage("retrieval.bm25"):
        for i, snap, ok in searchable:
            # Tokenized per snapshot: each follows the tokenizer options of its manifest.
            leg.extend(i, *snap.sparse.search(query, depth, ok))
    return leg


def _single(results: list[tuple[int, float]], k: int, owner: dict[int, Chunk], *, leg: str) -> list[ScoredChunk]:
    """Results of one leg as ScoredChunks: score and rank are the leg's own."""
    out = []
    for rank, (chunk_id, score) in enumerate(results[:k], start=1):
        evidence = LegScore(rank=rank, score=score)
        out.append(
            ScoredChunk(
                chunk=owner[chunk_id],
                score=score,
                rank=rank,
                dense=evidence if leg == "dense" else None,
                sparse=evidence if leg == "sparse" else None,
            )
        )
    return out
