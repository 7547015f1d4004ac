"""Search the PostgreSQL retrieval index: pgvector HNSW + BM25 postings, fused in Python.

:class:`PgIndex` is the ``postgres`` backend's index: it checks the schema once (the tables of
migration 0005, the vector dimension, the embedding model and BM25 tokenizer recorded on first
use), answers the catalog questions the API asks of an index store (:meth:`PgIndex.collections`
and friends, duck-typing :class:`retrieval.types.IndexCatalog`), and makes retrievers.
:class:`PgRetriever` implements :class:`retrieval.types.Retriever` with the local backend's
contract:

- **dense leg**: ``ORDER BY embedding <#> q LIMIT depth`` on the HNSW index (inner product: the
  vectors are normalized, score = cosine), ``hnsw.ef_search`` from settings and pgvector 0.8's
  iterative scan so the collection/path filters inside the SQL still fill ``depth``; with
  ``lead_weight > 0`` (the default) the local backend's section-lead blend
  (:mod:`retrieval.leads`): the candidates are that top ``depth`` plus the ``depth`` best section
  leads (a partial HNSW index over ``chunk_id = lead_id``, migration 0007), each scored
  ``(1 − w)·cos(q, chunk) + w·cos(q, lead)`` by :func:`retrieval.leads.blend_candidates`;
- **BM25 leg**: rank-bm25's Okapi definition (:mod:`retrieval.sparse`) computed in SQL from the
  postings and the collection statistics: ``idf = ln(N - df + 0.5) - ln(df + 0.5)``, negative
  ones floored to ``epsilon`` × the average idf over the collection's vocabulary (from
  ``rag_index.df_hist``), ``tf·(k1+1) / (tf + k1·(1 − b + b·len/avgdl))`` per posting, query
  terms counted with repeats; per-collection statistics, as the local backend. The exact top
  ``depth`` comes from ``rag_index.bm25_top`` (:mod:`core.pgindex.bm25`: MaxScore pruning, so a
  question's common terms are probed for the candidates rather than summed over every posting);
- **fusion**: :mod:`retrieval.fusion`, the local backend's functions and defaults.

The legs run concurrently on two pooled connections, the BM25 one while the query is embedded,
and both read **one snapshot** with the chunk rows fetched afterwards (:class:`ReadView`: a
REPEATABLE READ transaction exports its snapshot, the second leg's transaction imports it), so a
search that straddles a commit (a reindex swapping a collection's chunks, an ingest, a delete)
answers entirely from before it or entirely from after it: never ids from one side that the
chunk-row fetch can no longer find (which returned ``hits: []`` during a reindex). The sharded
index's shards commit on their own, outside that snapshot: when a hit's chunk row is gone, the
whole search runs once more on a fresh view. All database I/O runs on a private event loop in a
thread of its own, so the blocking :meth:`PgRetriever.search_sync` (CLI, evaluations) and the
async :meth:`PgRetriever.search` (API) share one pool, and the caller's event loop is never
blocked.

Errors: :class:`~retrieval.types.UnknownCollectionError` for a filter naming a collection with no
indexed chunk; :class:`~retrieval.types.IndexMismatchError` when the index was built with another
model, dimension or tokenizer; :class:`PgIndexUnavailableError` when the tables are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from concurrent.futures import Executor, Future
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from core.pgindex.bm25 import PROBE_COST, READ_SHARE
from core.pgindex.writer import PgIndexWriter, vector_literal
from retrieval.fusion import Fused, Legs, rrf, weighted
from retrieval.leads import blend_candidates
from retrieval.sparse import BM25Params
from retrieval.tokenize import Tokenizer, TokenizerOptions
from retrieval.types import (
    Chunk,
    Embedder,
    IndexMismatchError,
    LegScore,
    RetrievalError,
    ScoredChunk,
    SearchFilters,
    SearchOptions,
    UnknownCollectionError,
    validate_search_options,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["PgIndex", "PgIndexUnavailableError", "PgRetriever", "ReadView"]

log = logging.getLogger(__name__)
T = TypeVar("T")

LegRows = list[tuple[int, float]]
_MAX_OVERFLOW = 10
"""Connections the pool opens beyond ``pool_size`` under load (SQLAlchemy's default)."""


class PgIndexUnavailableError(RetrievalError):
    """The ``rag_index`` tables do not exist (pgvector was missing when the database was migrated)."""

    code = "index_unavailable"


class _LoopThread:
    """An event loop running forever on a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


# The dense leg's knobs, transaction-local: a pooled connection carries no setting to the next
# user. asyncpg prepares statements, and a generic plan may not see that the HNSW order-by argument
# is one constant vector and scan the table instead: hence the custom plan.
_SEARCH_KNOBS = """set_config('hnsw.ef_search', :ef, true),
           set_config('hnsw.iterative_scan', 'relaxed_order', true),
           set_config('plan_cache_mode', 'force_custom_plan', true)"""
_SET_SEARCH_KNOBS = text(f"SELECT {_SEARCH_KNOBS}")
# The first statement of a search's view: its snapshot (exported for the other leg's connection),
# the knobs and the indexed collections, in one round trip.
_OPEN_VIEW = text(
    f"""
    SELECT pg_export_snapshot(),
           {_SEARCH_KNOBS},
           ARRAY(SELECT c.name FROM rag_index.stats s JOIN collections c ON c.id = s.collection_id
                 WHERE s.n_docs > 0 ORDER BY c.id),
           ARRAY(SELECT c.id FROM rag_index.stats s JOIN collections c ON c.id = s.collection_id
                 WHERE s.n_docs > 0 ORDER BY c.id)
    """
)
# What pg_export_snapshot() returns (checked before it is spliced into SET TRANSACTION SNAPSHOT,
# which takes no parameters).
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(-[0-9]+)?")


def resolve_collections(indexed: dict[str, int], names: Sequence[str] | None) -> list[int]:
    """Ids of the named collections among the ``indexed`` ones (``None``: all of them, sorted).

    Raises:
        UnknownCollectionError: If a named collection has no indexed chunk.
    """
    if names is None:
        return sorted(indexed.values())
    ids = []
    for name in dict.fromkeys(names):
        if name not in indexed:
            raise UnknownCollectionError(f"collection {name!r} has no index")
        ids.append(indexed[name])
    return ids


class ReadView:
    """One search's consistent read of the index and the chunk rows.

    A REPEATABLE READ, READ ONLY transaction on one pooled connection (:attr:`connection`: the
    dense leg and the chunk-row fetch) whose snapshot other connections join (:meth:`joined`: the
    BM25 leg, concurrently), by ``pg_export_snapshot()`` and ``SET TRANSACTION SNAPSHOT``. Every
    statement of the search then sees the database as of the view's first statement. Made by
    :meth:`PgIndex.view`; the snapshot can be joined only while the view is open.
    """

    def __init__(self, engine: AsyncEngine, connection: AsyncConnection, snapshot: str, indexed: dict[str, int]):
        if not _SNAPSHOT_ID.fullmatch(snapshot):
            raise RetrievalError(f"unexpected snapshot id {snapshot!r}")
        self._engine = engine
        self.connection = connection
        self.snapshot = snapshot
        self.indexed = indexed
        """Names and ids of the collections with indexed chunks, in this view."""

    @contextlib.asynccontextmanager
    async def joined(self) -> AsyncIterator[AsyncConnection]:
        """Another pooled connection in a transaction that reads this view's snapshot."""
        async with self._engine.connect() as conn:
            await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            async with conn.begin():
                await conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{self.snapshot}'")
                yield conn


_DENSE = text(
    """
    SELECT chunk_id, -(embedding <#> CAST(:q AS vector)) AS score
    FROM rag_index.chunks
    WHERE collection_id = ANY(CAST(:cids AS int[])) {prefix}
    ORDER BY embedding <#> CAST(:q AS vector)
    LIMIT :depth
    """
)

# Per (collection, query term): the weight reps · idf, the collection's avgdl, the term's df and the
# upper bound of its contribution to one chunk (core/pgindex/bm25.py). The average idf behind the
# epsilon floor is a sub-plan evaluated only for a term whose idf is negative. MATERIALIZED:
# inlined, the planner moved the CASE (and its sub-plan over df_hist) into the aggregate over the
# postings, evaluating it once per posting (minutes at 100k chunks). All in float8, as
# rank-bm25's math.log (an integer + 0.5 would be numeric).
_WEIGHTS = """
    WITH q AS (
        SELECT term, count(*)::float8 AS reps FROM unnest(CAST(:terms AS text[])) AS u(term) GROUP BY term
    ), st AS (
        SELECT collection_id, n_docs::float8 AS n, total_len::float8 / n_docs AS avgdl
        FROM rag_index.stats WHERE collection_id = ANY(CAST(:cids AS int[])) AND n_docs > 0
    ), w AS (
        SELECT t.collection_id, t.term, q.reps, st.n, st.avgdl, t.df, t.max_tf, t.min_len_per_tf,
               ln(st.n - t.df + 0.5) - ln(t.df::float8 + 0.5) AS x
        FROM q JOIN rag_index.terms t ON t.term = q.term JOIN st ON st.collection_id = t.collection_id
    ), idf AS MATERIALIZED (
        SELECT collection_id, term, avgdl, df, max_tf, min_len_per_tf, reps * CASE WHEN x >= 0 THEN x
            ELSE CAST(:epsilon AS float8) * (
                SELECT sum(h.terms * (ln(w.n - h.df + 0.5) - ln(h.df::float8 + 0.5))) / sum(h.terms)
                FROM rag_index.df_hist h WHERE h.collection_id = w.collection_id
            ) END AS weight
        FROM w
    ), bounded AS (
        SELECT collection_id, term, weight, avgdl, df::bigint AS df,
               weight * CASE WHEN max_tf IS NULL OR min_len_per_tf IS NULL THEN CAST(:k1 AS float8) + 1
                   ELSE (CAST(:k1 AS float8) + 1) / (1 + CAST(:k1 AS float8) * (1 - CAST(:b AS float8)) / max_tf
                       + CAST(:k1 AS float8) * CAST(:b AS float8) * min_len_per_tf / avgdl) END AS bound
        FROM idf
    )
"""

# One call of rag_index.bm25_top (migration 0007, core/pgindex/bm25.py) with the pairs' arrays.
_SPARSE = text(
    _WEIGHTS
    + """
    , a AS (
        SELECT array_agg(collection_id ORDER BY collection_id, term) AS c,
               array_agg(term ORDER BY collection_id, term) AS t,
               array_agg(weight ORDER BY collection_id, term) AS w,
               array_agg(avgdl ORDER BY collection_id, term) AS l,
               array_agg(bound ORDER BY collection_id, term) AS u,
               array_agg(df ORDER BY collection_id, term) AS d
        FROM bounded
    )
    SELECT r.chunk_id, r.score
    FROM a CROSS JOIN LATERAL rag_index.bm25_top(a.c, a.t, a.w, a.l, a.u, a.d, CAST(:k1 AS float8),
        CAST(:b AS float8), CAST(:depth AS integer), CAST(:prefix AS text), CAST(:probe_cost AS float8),
        CAST(:read_share AS float8)) AS r
    """
)

# The dense leg with section leads (retrieval/leads.py): the HNSW top ``depth`` of all chunks
# (hit) and of the leads alone (partial HNSW index of migration 0007), each row with the
# similarity of its section's lead; blended in Python (retrieval.leads.blend_candidates).
_DENSE_LEADS = text(
    """
    WITH h AS (
        SELECT chunk_id, lead_id, -(embedding <#> CAST(:q AS vector)) AS own
        FROM rag_index.chunks
        WHERE collection_id = ANY(CAST(:cids AS int[])) {prefix}
        ORDER BY embedding <#> CAST(:q AS vector)
        LIMIT :depth
    ), l AS (
        SELECT chunk_id, lead_id, -(embedding <#> CAST(:q AS vector)) AS own
        FROM rag_index.chunks
        WHERE chunk_id = lead_id AND collection_id = ANY(CAST(:cids AS int[])) {prefix}
        ORDER BY embedding <#> CAST(:q AS vector)
        LIMIT :depth
    )
    SELECT x.chunk_id, x.own, coalesce(-(ld.embedding <#> CAST(:q AS vector)), x.own), x.hit
    FROM (SELECT h.*, true AS hit FROM h UNION ALL SELECT l.*, false FROM l) x
    LEFT JOIN rag_index.chunks ld ON ld.chunk_id = x.lead_id
    """
)

_CHUNKS = text(
    """
    SELECT c.id, c.document_id, col.name, d.path, c.ordinal, c.text, c.start, c."end", c.page, d.title, c.heading
    FROM chunks c JOIN documents d ON d.id = c.document_id JOIN collections col ON col.id = c.collection_id
    WHERE c.id = ANY(CAST(:ids AS bigint[]))
    """
)


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings that start with ``prefix`` (``\\`` escapes ``%`` and ``_``)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _ranked(rows: Sequence[Any]) -> LegRows:
    """Best first, ties by ascending id (the local backend's order).

    Scores are compared at 12 significant digits: PostgreSQL sums a chunk's postings in whatever
    order its plan reads them, so two chunks with equal BM25 scores can come out one rounding step
    apart, and one node and a set of shards would then order such a tie differently.
    """
    out = [(int(r[0]), float(r[1])) for r in rows]
    out.sort(key=lambda r: (-float(f"{r[1]:.12g}"), r[0]))
    return out


def blend_leads(rows: Sequence[Any], depth: int, weight: float) -> LegRows:
    """The dense leg with section leads from the rows of the two HNSW searches, best first.

    ``rows`` are ``(chunk_id, own similarity, its section lead's similarity, hit)``: ``hit`` rows
    come from the search of all chunks, the others from the search of the leads (one node's, or
    every shard's: each side is cut to its ``depth`` best here, so shards give the candidates of
    one node). The candidates and the formula are the local backend's
    (:meth:`retrieval.leads.DocumentLeads.blend`, :func:`retrieval.leads.blend_candidates`).
    """
    hits = _ranked([(r[0], r[1]) for r in rows if r[3]])[:depth]
    leads = _ranked([(r[0], r[1]) for r in rows if not r[3]])[:depth]
    lead_of = {int(r[0]): float(r[2]) for r in rows}
    candidates = hits + leads
    if not candidates:
        return []
    ids, scores = blend_candidates(
        np.array([c[0] for c in candidates], dtype=np.int64),
        np.array([c[1] for c in candidates], dtype=np.float64),
        np.array([lead_of[c[0]] for c in candidates], dtype=np.float64),
        weight=weight,
        k=depth,
    )
    return list(zip(ids.tolist(), scores.tolist(), strict=True))


class PgIndex:
    """The PostgreSQL retrieval index of one database (see the module docstring).

    Args:
        url: SQLAlchemy URL of the PostgreSQL database (``postgresql+asyncpg://...``).
        model_id: The embedding model; recorded on first use and checked afterwards.
        dimension: The embedding dimension; must equal the ``vector(n)`` column's.
        tokenizer: BM25 tokenizer options; recorded and checked like the model.
        params: BM25 parameters (rank-bm25's defaults).
        ef_search: pgvector's ``hnsw.ef_search`` for the dense leg (higher: better recall, slower).
        pool_size: Pooled connections (two per concurrent hybrid search).
    """

    transactional = True
    """Writes go with the chunk rows (:class:`PgIndexWriter`): there is nothing to reconcile or publish."""

    def __init__(
        self,
        url: str,
        *,
        model_id: str,
        dimension: int,
        tokenizer: TokenizerOptions | None = None,
        params: BM25Params | None = None,
        ef_search: int = 100,
        pool_size: int = 5,
    ) -> None:
        self._url = url
        self._model_id = model_id
        self._dimension = dimension
        self._tokenizer = Tokenizer(tokenizer or TokenizerOptions())
        self._params = params or BM25Params()
        self._ef_search = ef_search
        self._loop = _LoopThread("pgindex")
        self._pool_size = pool_size
        # A search holds its view's connection while it takes a second one for the other leg: at most
        # half the pool's connections are views, so every view can get its second one.
        self._views = asyncio.Semaphore(max(1, (pool_size + _MAX_OVERFLOW) // 2))
        self._engine: AsyncEngine = self._loop.run(self._create_engine())

    async def _create_engine(self) -> AsyncEngine:
        # Created on the private loop: asyncpg connections belong to the loop that opened them.
        return create_async_engine(self._url, pool_size=self._pool_size, max_overflow=_MAX_OVERFLOW, pool_pre_ping=True)

    @classmethod
    def open(cls, url: str, **kwargs: Any) -> PgIndex:
        """An index whose schema, dimension, model and tokenizer were checked (first use records them).

        Raises:
            PgIndexUnavailableError: If the ``rag_index`` tables do not exist.
            IndexMismatchError: If the index was built with another model, dimension or tokenizer.
        """
        index = cls(url, **kwargs)
        try:
            index._loop.run(index._check())
        except BaseException:
            index.close()
            raise
        return index

    async def _check(self) -> None:
        async with self._engine.begin() as conn:
            exists = await conn.scalar(text("SELECT to_regclass('rag_index.chunks') IS NOT NULL"))
            if not exists:
                raise PgIndexUnavailableError(
                    "the postgres retrieval backend's tables (schema rag_index) do not exist: pgvector was not "
                    "installed on the server when the database was migrated. Install it (tools/install-pgvector "
                    "on Debian, or a PostgreSQL image with pgvector), then run `alembic downgrade 0002` and "
                    "`alembic upgrade head`"
                )
            typmod = await conn.scalar(
                text(
                    "SELECT atttypmod FROM pg_attribute "
                    "WHERE attrelid = 'rag_index.chunks'::regclass AND attname = 'embedding'"
                )
            )
            if typmod != self._dimension:
                raise IndexMismatchError(
                    f"the postgres index stores {typmod}-dimensional vectors but the embedder has "
                    f"{self._dimension} dimensions"
                )
            wanted = {
                "model_id": self._model_id,
                "tokenizer": json.dumps(self._tokenizer.options.to_dict(), sort_keys=True),
                "bm25": json.dumps(asdict(self._params), sort_keys=True),
            }
            for key, value in wanted.items():
                await conn.execute(
                    text("INSERT INTO rag_index.meta (key, value) VALUES (:k, :v) ON CONFLICT (key) DO NOTHING"),
                    {"k": key, "v": value},
                )
            stored = dict((await conn.execute(text("SELECT key, value FROM rag_index.meta"))).tuples().all())
            for key, value in wanted.items():
                if stored.get(key) != value and (await self._chunk_count(conn)) > 0:
                    raise IndexMismatchError(
                        f"the postgres index was built with {key} {stored.get(key)!r} but this process is "
                        f"configured with {value!r}; re-ingest into an empty index or change the setting back"
                    )
                if stored.get(key) != value:  # an empty index simply adopts the configuration
                    await conn.execute(
                        text("UPDATE rag_index.meta SET value = :v WHERE key = :k"), {"k": key, "v": value}
                    )

    @staticmethod
    async def _chunk_count(conn: AsyncConnection) -> int:
        return int(await conn.scalar(text("SELECT count(*) FROM (SELECT 1 FROM rag_index.chunks LIMIT 1) x")) or 0)

    # -- catalog (what the API asks of an index store) -------------------------------------------

    @property
    def model_id(self) -> str:
        """The embedding model the index holds vectors of."""
        return self._model_id

    @property
    def dimension(self) -> int:
        """The vector dimension."""
        return self._dimension

    @property
    def tokenizer(self) -> Tokenizer:
        """The BM25 tokenizer of documents and queries."""
        return self._tokenizer

    @property
    def params(self) -> BM25Params:
        """The BM25 parameters."""
        return self._params

    def writer(self) -> PgIndexWriter:
        """The writer the ingestion pipeline calls in its chunk transactions."""
        return PgIndexWriter(self._tokenizer)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the index's loop and wait for it (from any other thread)."""
        return self._loop.run(coro)

    def collections(self) -> list[str]:
        """Names of the collections with at least one indexed chunk, sorted."""
        return self._loop.run(self._collections())

    async def _collections(self) -> list[str]:
        async with self._engine.connect() as conn:
            rows = await conn.scalars(
                text(
                    "SELECT c.name FROM rag_index.stats s JOIN collections c ON c.id = s.collection_id "
                    "WHERE s.n_docs > 0 ORDER BY c.name"
                )
            )
            return list(rows)

    def unreadable(self) -> frozenset[str]:
        """Collections whose index cannot be read: none (the index is tables of the database)."""
        return frozenset()

    def load(self, collection: str) -> str | None:
        """``collection`` if it has indexed chunks, else ``None`` (the store's readability probe)."""
        return collection if collection in self.collections() else None

    def check(self, collection: str) -> None:
        """Nothing to verify on disk: the database's constraints and triggers keep the index whole."""

    def drop(self, collection: str) -> bool:
        """Nothing to drop: a deleted collection's index rows went with its chunk rows."""
        return False

    def close(self) -> None:
        """Close the pool and stop the index's event loop."""
        if not self._loop.loop.is_closed():
            engine = getattr(self, "_engine", None)
            if engine is not None:
                self._loop.run(engine.dispose())
            self._loop.close()

    # -- the legs (overridden by the sharded index) -----------------------------------------------

    @contextlib.asynccontextmanager
    async def view(self) -> AsyncIterator[ReadView]:
        """A :class:`ReadView`: one snapshot for a search's legs and its chunk-row fetch."""
        async with self._views, self._engine.connect() as conn:
            await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            async with conn.begin():
                row = (await conn.execute(_OPEN_VIEW, {"ef": str(self._ef_search)})).one()
                yield ReadView(self._engine, conn, row[0], dict(zip(row[4], row[5], strict=True)))

    async def collection_ids(self, names: Sequence[str] | None) -> list[int]:
        """Ids of the named collections (``None``: every indexed one).

        Raises:
            UnknownCollectionError: If a named collection has no indexed chunk.
        """
        async with self.view() as view:
            return resolve_collections(view.indexed, names)

    @contextlib.asynccontextmanager
    async def _leg_connection(self, view: ReadView | None, *, joined: bool) -> AsyncIterator[AsyncConnection]:
        """The view's own connection, a connection joined to its snapshot, or (no view) a transaction of
        its own with the search knobs set."""
        if view is not None and not joined:
            yield view.connection
            return
        if view is not None:
            async with view.joined() as conn:
                await self._set_search_knobs(conn)
                yield conn
            return
        async with self._engine.begin() as conn:
            await self._set_search_knobs(conn)
            yield conn

    async def dense_leg(
        self,
        cids: list[int],
        vector: str,
        depth: int,
        prefix: str | None,
        lead_weight: float = 0.0,
        *,
        view: ReadView | None = None,
        joined: bool = False,
    ) -> LegRows:
        """Best-first ``(chunk_id, dense score)`` inside the filters: the HNSW search's inner products,
        blended with the section leads' when ``lead_weight > 0`` (:func:`blend_leads`).

        With a ``view``, on its connection (``joined``: on another one, in its snapshot); without, in a
        transaction of its own."""
        condition = "AND path LIKE :prefix ESCAPE '\\'" if prefix is not None else ""
        params: dict[str, Any] = {"q": vector, "cids": cids, "depth": depth}
        if prefix is not None:
            params["prefix"] = like_prefix(prefix)
        sql = (_DENSE_LEADS if lead_weight > 0 else _DENSE).text.format(prefix=condition)
        async with self._leg_connection(view, joined=joined) as conn:
            rows = (await conn.execute(text(sql), params)).all()
        if lead_weight > 0:
            return blend_leads(rows, depth, lead_weight)
        return _ranked(rows)

    async def _set_search_knobs(self, conn: AsyncConnection) -> None:
        await conn.execute(_SET_SEARCH_KNOBS, {"ef": str(self._ef_search)})

    async def sparse_leg(
        self,
        cids: list[int],
        tokens: list[str],
        depth: int,
        prefix: str | None,
        *,
        view: ReadView | None = None,
        joined: bool = False,
    ) -> LegRows:
        """Best-first ``(chunk_id, BM25 score)`` of the chunks holding a query term, inside the filters
        (exact top ``depth``: ``rag_index.bm25_top``, :mod:`core.pgindex.bm25`). ``view`` and ``joined``
        as in :meth:`dense_leg`."""
        if not tokens:
            return []
        # Custom plans (the search knobs): the plan depends on how many postings the query's terms have.
        async with self._leg_connection(view, joined=joined) as conn:
            rows = (await conn.execute(_SPARSE, self.sparse_params(cids, tokens, depth, prefix))).all()
        return _ranked(rows)

    def sparse_params(self, cids: list[int], tokens: list[str], depth: int, prefix: str | None) -> dict[str, Any]:
        """The parameters of the single node's BM25 statement for one search."""
        return {
            "terms": tokens,
            "cids": cids,
            "depth": depth,
            "k1": self._params.k1,
            "b": self._params.b,
            "epsilon": self._params.epsilon,
            "prefix": None if prefix is None else like_prefix(prefix),
            "probe_cost": PROBE_COST,
            "read_share": READ_SHARE,
        }

    async def chunks(self, ids: Sequence[int], *, view: ReadView | None = None) -> dict[int, Chunk]:
        """The chunks with these ids (from the chunk rows, in ``view`` if given; ids that do not exist
        there are absent)."""
        if not ids:
            return {}
        async with contextlib.AsyncExitStack() as stack:
            conn = view.connection if view is not None else await stack.enter_async_context(self._engine.connect())
            rows = (await conn.execute(_CHUNKS, {"ids": list(ids)})).all()
        return {
            int(r[0]): Chunk(
                id=int(r[0]),
                document_id=int(r[1]),
                collection=r[2],
                path=r[3],
                ordinal=r[4],
                text=r[5],
                start=r[6],
                end=r[7],
                page=r[8],
                title=r[9],
                metadata={"heading": r[10]} if r[10] else {},
            )
            for r in rows
        }

    def retriever(
        self, embedder: Embedder, *, executor: Executor | None = None, defaults: SearchOptions | None = None
    ) -> PgRetriever:
        """A retriever over this index (:class:`PgRetriever`)."""
        return PgRetriever(self, embedder, executor=executor, defaults=defaults)


class PgRetriever:
    """Hybrid retrieval over a :class:`PgIndex` (the :class:`~retrieval.types.Retriever` protocol).

    Args:
        index: The index.
        embedder: Embeds queries; must be the index's model.
        executor: Runs the query embedding of :meth:`search` (``None``: the loop's default).
        defaults: Options used when a request passes none.

    Raises:
        IndexMismatchError: If ``embedder`` is another model or dimension than the index's.
    """

    def __init__(
        self,
        index: PgIndex,
        embedder: Embedder,
        *,
        executor: Executor | None = None,
        defaults: SearchOptions | None = None,
    ) -> None:
        if embedder.model_id != index.model_id or embedder.dimension != index.dimension:
            raise IndexMismatchError(
                f"the embedder is {embedder.model_id!r} ({embedder.dimension} dimensions) but the postgres "
                f"index expects {index.model_id!r} ({index.dimension} dimensions)"
            )
        self._index = index
        self._embedder = embedder
        self._executor = executor
        self._defaults = defaults or SearchOptions()
        validate_search_options(self._defaults)

    @property
    def defaults(self) -> SearchOptions:
        """Options used when a request passes none."""
        return self._defaults

    @property
    def index(self) -> PgIndex:
        """The index searched."""
        return self._index

    async def search(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        """Return at most ``k`` chunks, best first (:meth:`search_sync`'s contract)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, lambda: self.search_sync(query, k=k, filters=filters, options=options)
        )

    def search_sync(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        """Blocking search with the contract of :meth:`retrieval.hybrid.HybridRetriever.search_sync`.

        Raises:
            UnknownCollectionError: If ``filters.collections`` names a collection without chunks.
            ValueError: For invalid options.
        """
        opts = options or self._defaults
        validate_search_options(opts)
        if k <= 0:
            return []
        index = self._index
        use_dense = opts.mode in ("hybrid", "dense")
        tokens = index.tokenizer(query) if opts.mode in ("hybrid", "sparse") else None
        # The search runs on the index's loop (the BM25 leg starts at once) while this thread embeds
        # the query and hands the vector over.
        vector: Future[str] = Future()
        done = index._loop.submit(self._search(tokens, vector if use_dense else None, k, filters, opts))
        if use_dense:
            try:
                vector.set_result(vector_literal(self._embed(query)))
            except BaseException as e:
                vector.set_exception(e)
                with contextlib.suppress(BaseException):
                    done.result()
                raise
        return done.result()

    async def _search(
        self,
        tokens: list[str] | None,
        vector: Future[str] | None,
        k: int,
        filters: SearchFilters | None,
        opts: SearchOptions,
    ) -> list[ScoredChunk]:
        """One search in one :class:`ReadView`; once more in a fresh view if a hit's chunk row is gone
        (only shards, which commit outside the view's snapshot, can cause that)."""
        out: list[ScoredChunk] = []
        for attempt in (1, 2):
            out, vanished = await self._search_in_view(tokens, vector, k, filters, opts)
            if not vanished:
                break
            log.info("search: %d hits' chunk rows vanished in attempt %d", vanished, attempt)
        return out

    async def _search_in_view(
        self,
        tokens: list[str] | None,
        vector: Future[str] | None,
        k: int,
        filters: SearchFilters | None,
        opts: SearchOptions,
    ) -> tuple[list[ScoredChunk], int]:
        index = self._index
        names = filters.collections if filters is not None else None
        prefix = filters.path_prefix if filters is not None else None
        depth = max(opts.depth, k)
        async with index.view() as view:
            cids = resolve_collections(view.indexed, names)
            if not cids:
                return [], 0
            sparse_task: asyncio.Task[LegRows] | None = None
            if tokens is not None:
                # Hybrid: on a second connection in the view's snapshot, concurrently with the dense leg.
                sparse_task = asyncio.ensure_future(
                    index.sparse_leg(cids, tokens, depth, prefix, view=view, joined=vector is not None)
                )
            dense: LegRows = []
            try:
                if vector is not None:
                    literal = await asyncio.wrap_future(vector)
                    dense = await index.dense_leg(cids, literal, depth, prefix, opts.lead_weight, view=view)
            finally:
                sparse = await sparse_task if sparse_task is not None else []
            if opts.mode == "dense":
                fused = [Fused(i, s, LegScore(r, s), None) for r, (i, s) in enumerate(dense, start=1)]
            elif opts.mode == "sparse":
                fused = [Fused(i, s, None, LegScore(r, s)) for r, (i, s) in enumerate(sparse, start=1)]
            elif opts.fusion == "rrf":
                fused = rrf(Legs(dense, sparse), k=opts.rrf_k, weights=(opts.dense_weight, opts.sparse_weight))
            else:
                fused = weighted(Legs(dense, sparse), alpha=opts.alpha, normalization=opts.normalization)
            top = fused[: k + 8]  # spare rows for the retry's sake: an attempt that lost a few still answers
            chunks = await index.chunks([row.id for row in top], view=view)
        out: list[ScoredChunk] = []
        vanished = 0
        for row in top:
            chunk = chunks.get(row.id)
            if chunk is None:
                vanished += 1
                continue
            out.append(ScoredChunk(chunk=chunk, score=row.score, rank=len(out) + 1, dense=row.dense, sparse=row.sparse))
            if len(out) == k:
                break
        return out, vanished

    def _embed(self, query: str) -> npt.NDArray[np.float32]:
        return self._embedder.embed_query(query)
