"""The ``postgres`` backend sharded over PostgreSQL nodes with PL/Proxy.

Layout (``RAG_RETRIEVAL__SHARDS`` = libpq connection strings, a power of two of them):

- **the main database** (the coordinator) keeps what it keeps on one node — chunk rows, BM25
  postings, document frequencies, collection statistics (migration 0005, same triggers) — but
  not the vectors: ``rag_index.chunks.embedding`` is NULL there, so it builds no HNSW graph. The
  postings stay because exact *global* BM25 statistics need them: a delete must know which
  terms lose a document;
- **each shard** (schema ``rag_shard``, set up by :meth:`ShardedPgIndex.open`) keeps the vectors
  with their HNSW index and a copy of the postings of its chunks, routed by a stable key:
  ``hashint4(document_id)`` (a document's chunks live together, so its re-ingest and delete touch
  one shard);
- **PL/Proxy** functions in schema ``rag_proxy`` on the coordinator route writes
  (``RUN ON hashint4(document)``), deletes and searches (``RUN ON ALL``).

A search computes each query term's weight (``reps · idf``, with the global df, N and the
epsilon floor) and each collection's avgdl on the coordinator — the single node's SQL, same
CTE — and sends them to every shard, which scores its postings with them and returns its
top ``depth``; the dense leg is each shard's HNSW top ``depth``. Merged by score (ties by id),
the result is the single node's ranking (``bench/pg_sharding.py`` checks it on every dev
question, ``tests/integration/test_pg_shards.py`` on a small corpus).

Writes: the shard rows are written by PL/Proxy from inside the coordinator's transaction, but
a shard commits on its own (PL/Proxy has no two-phase commit). The order is chosen so that a
crash can only leave harmless leftovers: vectors are put on the shard *before* the coordinator
commits the chunk rows (a rollback leaves orphans that searches drop, as their chunk rows do
not exist), and removed when the coordinator's ``rag_index.chunks`` rows go (a statement
trigger). :meth:`ShardedPgIndex.repair` makes the shards equal to the coordinator (the worker
runs it at start, like the local backend's reconcile).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text

from core.pgindex.bm25 import bm25_function
from core.pgindex.index import _WEIGHTS, PgIndex, ReadView, _ranked, blend_leads, like_prefix
from core.pgindex.writer import IndexedChunk, PgIndexWriter, lead_ids, postings, vector_literal

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["SHARD_SCHEMA_VERSION", "ShardedPgIndex", "shard_ddl"]

log = logging.getLogger(__name__)

SHARD_SCHEMA_VERSION = "2"


def shard_ddl(dimension: int) -> list[str]:
    """The statements that set up one shard database (idempotent)."""
    return [
        "CREATE EXTENSION IF NOT EXISTS vector",
        "CREATE SCHEMA IF NOT EXISTS rag_shard",
        "CREATE TABLE IF NOT EXISTS rag_shard.meta (key text PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS rag_shard.chunks (
            chunk_id bigint PRIMARY KEY, collection_id integer NOT NULL, document_id integer NOT NULL,
            path text NOT NULL, doc_len integer NOT NULL, embedding vector({dimension}) NOT NULL)""",
        """CREATE INDEX IF NOT EXISTS ix_rag_shard_chunks_path
            ON rag_shard.chunks (collection_id, path text_pattern_ops)""",
        """CREATE INDEX IF NOT EXISTS ix_rag_shard_chunks_embedding ON rag_shard.chunks
            USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)""",
        """CREATE TABLE IF NOT EXISTS rag_shard.postings (
            collection_id integer NOT NULL, term text NOT NULL,
            chunk_id bigint NOT NULL REFERENCES rag_shard.chunks (chunk_id) ON DELETE CASCADE,
            tf integer NOT NULL, doc_len integer NOT NULL,
            PRIMARY KEY (collection_id, term, chunk_id) INCLUDE (tf, doc_len))""",
        "CREATE INDEX IF NOT EXISTS ix_rag_shard_postings_chunk ON rag_shard.postings (chunk_id)",
        # Section leads (migration 0007 on the coordinator): NULL on rows put before, which then
        # count as their own lead until re-ingested.
        "ALTER TABLE rag_shard.chunks ADD COLUMN IF NOT EXISTS lead_id bigint",
        """CREATE INDEX IF NOT EXISTS ix_rag_shard_chunks_lead_embedding ON rag_shard.chunks
            USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64) WHERE chunk_id = lead_id""",
        # Functions of shard schema version 1, replaced by the ones below.
        """DROP FUNCTION IF EXISTS rag_shard.put(integer, bigint[], integer[], text[], integer[], text[], text[],
            bigint[], integer[], integer[])""",
        "DROP FUNCTION IF EXISTS rag_shard.bm25",
        "DROP FUNCTION IF EXISTS rag_shard.knn",
        # Writes: replace a chunk if it exists (a repair may re-send one).
        """CREATE OR REPLACE FUNCTION rag_shard.put(
            p_collection integer, p_chunks bigint[], p_documents integer[], p_paths text[], p_lens integer[],
            p_vectors text[], p_leads bigint[], p_terms text[], p_term_chunks bigint[], p_tfs integer[],
            p_term_lens integer[])
        RETURNS integer LANGUAGE sql AS $$
            DELETE FROM rag_shard.chunks WHERE chunk_id = ANY(p_chunks);
            INSERT INTO rag_shard.chunks (chunk_id, collection_id, document_id, path, doc_len, embedding, lead_id)
            SELECT u.c, p_collection, u.d, u.p, u.l, CAST(u.v AS vector), u.lead
            FROM unnest(p_chunks, p_documents, p_paths, p_lens, p_vectors, p_leads) AS u(c, d, p, l, v, lead);
            INSERT INTO rag_shard.postings (collection_id, term, chunk_id, tf, doc_len)
            SELECT p_collection, u.t, u.c, u.f, u.l
            FROM unnest(p_terms, p_term_chunks, p_tfs, p_term_lens) AS u(t, c, f, l);
            SELECT cardinality(p_chunks);
        $$""",
        """CREATE OR REPLACE FUNCTION rag_shard.remove(p_chunks bigint[]) RETURNS integer LANGUAGE sql AS $$
            WITH d AS (DELETE FROM rag_shard.chunks WHERE chunk_id = ANY(p_chunks) RETURNING 1)
            SELECT count(*)::integer FROM d;
        $$""",
        """CREATE OR REPLACE FUNCTION rag_shard.ids() RETURNS SETOF bigint LANGUAGE sql STABLE AS $$
            SELECT chunk_id FROM rag_shard.chunks
        $$""",
        # The dense leg's rows (core.pgindex.index.blend_leads): this shard's HNSW top p_depth of all
        # chunks (hit) and, with p_leads, of the section leads, each with its lead's similarity (a
        # document's chunks, so its leads, live on one shard).
        """CREATE OR REPLACE FUNCTION rag_shard.knn_leads(
            p_collections integer[], p_query text, p_depth integer, p_prefix text, p_ef integer, p_leads boolean)
        RETURNS TABLE (chunk_id bigint, score double precision, lead_score double precision, hit boolean)
        LANGUAGE plpgsql SET plan_cache_mode = force_custom_plan AS $$
        DECLARE
            q vector := CAST(p_query AS vector);  -- parsed once, not per row
        BEGIN
            PERFORM set_config('hnsw.ef_search', p_ef::text, true),
                    set_config('hnsw.iterative_scan', 'relaxed_order', true);
            IF NOT p_leads THEN
                RETURN QUERY
                SELECT c.chunk_id, -(c.embedding <#> q), -(c.embedding <#> q), true
                FROM rag_shard.chunks c
                WHERE c.collection_id = ANY(p_collections) AND (p_prefix IS NULL OR c.path LIKE p_prefix ESCAPE '\\')
                ORDER BY c.embedding <#> q
                LIMIT p_depth;
                RETURN;
            END IF;
            RETURN QUERY
            WITH h AS (
                SELECT c.chunk_id, coalesce(c.lead_id, c.chunk_id) AS lead_id, -(c.embedding <#> q) AS own
                FROM rag_shard.chunks c
                WHERE c.collection_id = ANY(p_collections) AND (p_prefix IS NULL OR c.path LIKE p_prefix ESCAPE '\\')
                ORDER BY c.embedding <#> q
                LIMIT p_depth
            ), l AS (
                SELECT c.chunk_id, c.chunk_id AS lead_id, -(c.embedding <#> q) AS own
                FROM rag_shard.chunks c
                WHERE c.chunk_id = c.lead_id AND c.collection_id = ANY(p_collections)
                    AND (p_prefix IS NULL OR c.path LIKE p_prefix ESCAPE '\\')
                ORDER BY c.embedding <#> q
                LIMIT p_depth
            )
            SELECT x.chunk_id, x.own, coalesce(-(ld.embedding <#> q), x.own), x.hit
            FROM (SELECT h.*, true AS hit FROM h UNION ALL SELECT l.*, false FROM l) x
            LEFT JOIN rag_shard.chunks ld ON ld.chunk_id = x.lead_id;
        END $$""",
        # The single node's function, with the weights and bounds computed on the coordinator.
        """DROP FUNCTION IF EXISTS rag_shard.bm25_top(integer[], text[], double precision[], double precision[],
            double precision[], bigint[], double precision, double precision, integer, text)""",
        bm25_function("rag_shard"),
        f"""INSERT INTO rag_shard.meta (key, value) VALUES ('version', '{SHARD_SCHEMA_VERSION}')
            ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
    ]


def _proxy_ddl(shards: Sequence[str]) -> list[str]:
    """The coordinator's PL/Proxy cluster and functions (idempotent; the shard list is replaced)."""
    options = ", ".join(f"p{i} '{_quote(dsn)}'" for i, dsn in enumerate(shards))
    return [
        "CREATE EXTENSION IF NOT EXISTS plproxy",
        "CREATE SCHEMA IF NOT EXISTS rag_proxy",
        "DROP SERVER IF EXISTS rag_shards CASCADE",
        f"CREATE SERVER rag_shards FOREIGN DATA WRAPPER plproxy OPTIONS (connection_lifetime '1800', {options})",
        "CREATE USER MAPPING IF NOT EXISTS FOR PUBLIC SERVER rag_shards",
        """DROP FUNCTION IF EXISTS rag_proxy.put(integer, integer, bigint[], integer[], text[], integer[], text[],
            text[], bigint[], integer[], integer[])""",
        "DROP FUNCTION IF EXISTS rag_proxy.bm25",
        "DROP FUNCTION IF EXISTS rag_proxy.knn",
        """CREATE OR REPLACE FUNCTION rag_proxy.put(
            p_route integer, p_collection integer, p_chunks bigint[], p_documents integer[], p_paths text[],
            p_lens integer[], p_vectors text[], p_leads bigint[], p_terms text[], p_term_chunks bigint[],
            p_tfs integer[], p_term_lens integer[])
        RETURNS integer LANGUAGE plproxy AS $$
            CLUSTER 'rag_shards';
            RUN ON hashint4(p_route);
            SELECT rag_shard.put(p_collection, p_chunks, p_documents, p_paths, p_lens, p_vectors, p_leads, p_terms,
                                 p_term_chunks, p_tfs, p_term_lens);
        $$""",
        """CREATE OR REPLACE FUNCTION rag_proxy.remove(p_chunks bigint[]) RETURNS SETOF integer LANGUAGE plproxy AS $$
            CLUSTER 'rag_shards';
            RUN ON ALL;
            SELECT rag_shard.remove(p_chunks);
        $$""",
        """CREATE OR REPLACE FUNCTION rag_proxy.ids() RETURNS SETOF bigint LANGUAGE plproxy AS $$
            CLUSTER 'rag_shards';
            RUN ON ALL;
            SELECT * FROM rag_shard.ids();
        $$""",
        """CREATE OR REPLACE FUNCTION rag_proxy.knn_leads(
            p_collections integer[], p_query text, p_depth integer, p_prefix text, p_ef integer, p_leads boolean)
        RETURNS TABLE (chunk_id bigint, score double precision, lead_score double precision, hit boolean)
        LANGUAGE plproxy AS $$
            CLUSTER 'rag_shards';
            RUN ON ALL;
            SELECT * FROM rag_shard.knn_leads(p_collections, p_query, p_depth, p_prefix, p_ef, p_leads);
        $$""",
        """CREATE OR REPLACE FUNCTION rag_proxy.bm25_top(
            p_collections integer[], p_terms text[], p_weights double precision[], p_avgdls double precision[],
            p_bounds double precision[], p_dfs bigint[], p_k1 double precision, p_b double precision,
            p_depth integer, p_prefix text)
        RETURNS TABLE (chunk_id bigint, score double precision) LANGUAGE plproxy AS $$
            CLUSTER 'rag_shards';
            RUN ON ALL;
            SELECT * FROM rag_shard.bm25_top(p_collections, p_terms, p_weights, p_avgdls, p_bounds, p_dfs, p_k1, p_b,
                                             p_depth, p_prefix);
        $$""",
        # The coordinator's index rows go with the chunk rows (cascade); their vectors on the shards
        # go with them. One call per statement, to every shard (the rows' documents are known, but
        # a cascaded delete is one statement per chunk and RUN ON ALL keeps the trigger simple).
        """CREATE OR REPLACE FUNCTION rag_proxy.chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM rag_proxy.remove(array_agg(chunk_id)) FROM old_rows HAVING count(*) > 0;
            RETURN NULL;
        END $$""",
        "DROP TRIGGER IF EXISTS shards_chunks_deleted ON rag_index.chunks",
        """CREATE TRIGGER shards_chunks_deleted AFTER DELETE ON rag_index.chunks
            REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION rag_proxy.chunks_deleted()""",
    ]


def libpq_kwargs(dsn: str) -> dict[str, Any]:
    """asyncpg's keyword arguments for a libpq connection string (``key=value ...`` or a URL).

    Raises:
        ValueError: On a part that is not ``key=value``.
    """
    if dsn.startswith(("postgresql://", "postgres://")):
        return {"dsn": dsn}
    names = {"dbname": "database", "host": "host", "port": "port", "user": "user", "password": "password"}
    out: dict[str, Any] = {}
    for part in shlex.split(dsn):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"invalid shard connection string part {part!r}: expected key=value")
        if key in names:
            out[names[key]] = int(value) if key == "port" else value
    return out


def _quote(value: str) -> str:
    return value.replace("'", "''")


_PUT = text(
    """
    SELECT rag_proxy.put(CAST(:route AS integer), CAST(:collection_id AS integer), CAST(:chunk_ids AS bigint[]),
        CAST(:document_ids AS integer[]), CAST(:paths AS text[]), CAST(:doc_lens AS integer[]),
        CAST(:embeddings AS text[]), CAST(:lead_ids AS bigint[]), CAST(:terms AS text[]),
        CAST(:term_chunks AS bigint[]), CAST(:tfs AS integer[]), CAST(:term_lens AS integer[]))
    """
)


class ShardedPgIndexWriter(PgIndexWriter):
    """Writes the coordinator's rows (no vectors) and puts vectors and postings on the shards."""

    async def add(self, session: AsyncSession, *, collection_id: int, chunks: Sequence[IndexedChunk]) -> None:
        """Shard rows first (PL/Proxy, routed by document), then the coordinator's rows (see the module
        docstring for why this order)."""
        await self.put_only(session, collection_id=collection_id, chunks=chunks)
        await self._add_rows(session, collection_id=collection_id, chunks=chunks, with_vectors=False)

    async def put_only(
        self,
        session: AsyncSession,
        *,
        collection_id: int,
        chunks: Sequence[IndexedChunk],
        leads: dict[int, int] | None = None,
    ) -> None:
        """Put the chunks' vectors and postings on their shards (each shard commits on its own).

        Args:
            leads: Each chunk's section lead, when ``chunks`` are not whole documents (a repair
                takes them from the coordinator); ``None``: computed from ``chunks``.
        """
        if leads is None:
            leads = dict(zip((c.chunk_id for c in chunks), lead_ids(chunks), strict=True))
        by_document: dict[int, list[IndexedChunk]] = {}
        for chunk in chunks:
            by_document.setdefault(chunk.document_id, []).append(chunk)
        for document_id, group in by_document.items():
            lengths, columns = postings(group, self._tokenizer)
            await session.execute(
                _PUT,
                {
                    "route": document_id,
                    "collection_id": collection_id,
                    "chunk_ids": [c.chunk_id for c in group],
                    "document_ids": [c.document_id for c in group],
                    "paths": [c.path for c in group],
                    "doc_lens": lengths,
                    "embeddings": [vector_literal(c.vector) for c in group],
                    "lead_ids": [leads[c.chunk_id] for c in group],
                    "terms": columns["terms"],
                    "term_chunks": columns["chunk_ids"],
                    "tfs": columns["tfs"],
                    "term_lens": columns["doc_lens"],
                },
            )


_BM25_WEIGHTS = text(
    _WEIGHTS
    + """
    SELECT collection_id, term, weight, avgdl, bound, df FROM bounded ORDER BY collection_id, term
    """
)


class ShardedPgIndex(PgIndex):
    """A :class:`PgIndex` whose vectors and scoring live on PL/Proxy shards (module docstring).

    Args:
        url: The coordinator (the main database).
        shards: libpq connection strings of the shard databases (a power of two of them).
        **kwargs: As :class:`PgIndex`.
    """

    def __init__(self, url: str, *, shards: Sequence[str], **kwargs: Any) -> None:
        if not shards or len(shards) & (len(shards) - 1):
            raise ValueError(f"PL/Proxy needs a power of two of shards, got {len(shards)}")
        self._shards = list(shards)
        super().__init__(url, **kwargs)

    @property
    def shards(self) -> list[str]:
        """The shard connection strings, in routing order."""
        return list(self._shards)

    async def _check(self) -> None:
        await super()._check()
        for dsn in self._shards:
            conn = await asyncpg.connect(**libpq_kwargs(dsn))
            try:
                async with conn.transaction():
                    # Serialize concurrent set-ups (several processes starting at once).
                    await conn.execute("SELECT pg_advisory_xact_lock(7341301)")
                    for statement in shard_ddl(self._dimension):
                        await conn.execute(statement)
            finally:
                await conn.close()
        async with self._engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(7341302)"))
            for statement in _proxy_ddl(self._shards):
                await conn.execute(text(statement))

    def writer(self) -> ShardedPgIndexWriter:
        """The writer the ingestion pipeline calls in its chunk transactions."""
        return ShardedPgIndexWriter(self._tokenizer)

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
    ) -> list[tuple[int, float]]:
        """Every shard's HNSW top ``depth`` (and its leads' with ``lead_weight > 0``), merged as one
        node's (best first, ties by id) and cut at ``depth``. The shards answer outside ``view``'s
        snapshot (they commit on their own; :class:`~core.pgindex.index.PgRetriever` retries)."""
        async with self._leg_connection(view, joined=joined) as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT chunk_id, score, lead_score, hit FROM rag_proxy.knn_leads(CAST(:cids AS integer[]), "
                        ":q, CAST(:depth AS integer), :prefix, CAST(:ef AS integer), CAST(:leads AS boolean))"
                    ),
                    {
                        "cids": cids,
                        "q": vector,
                        "depth": depth,
                        "prefix": None if prefix is None else like_prefix(prefix),
                        "ef": self._ef_search,
                        "leads": lead_weight > 0,
                    },
                )
            ).all()
        if lead_weight > 0:
            return blend_leads(rows, depth, lead_weight)
        return _ranked([(r[0], r[1]) for r in rows])[:depth]

    async def sparse_leg(
        self,
        cids: list[int],
        tokens: list[str],
        depth: int,
        prefix: str | None,
        *,
        view: ReadView | None = None,
        joined: bool = False,
    ) -> list[tuple[int, float]]:
        """Global weights from the coordinator (in ``view``'s snapshot), scored on every shard, merged
        and cut at ``depth``."""
        if not tokens:
            return []
        async with self._leg_connection(view, joined=joined) as conn:
            weights = (
                await conn.execute(
                    _BM25_WEIGHTS,
                    {
                        "terms": tokens,
                        "cids": cids,
                        "epsilon": self._params.epsilon,
                        "k1": self._params.k1,
                        "b": self._params.b,
                    },
                )
            ).all()
            if not weights:
                return []
            rows = (
                await conn.execute(
                    text(
                        "SELECT chunk_id, score FROM rag_proxy.bm25_top(CAST(:cids AS integer[]), "
                        "CAST(:terms AS text[]), CAST(:weights AS float8[]), CAST(:avgdls AS float8[]), "
                        "CAST(:bounds AS float8[]), CAST(:dfs AS bigint[]), CAST(:k1 AS float8), CAST(:b AS float8), "
                        "CAST(:depth AS integer), :prefix)"
                    ),
                    {
                        "cids": [int(w[0]) for w in weights],
                        "terms": [w[1] for w in weights],
                        "weights": [float(w[2]) for w in weights],
                        "avgdls": [float(w[3]) for w in weights],
                        "bounds": [float(w[4]) for w in weights],
                        "dfs": [int(w[5]) for w in weights],
                        "k1": self._params.k1,
                        "b": self._params.b,
                        "depth": depth,
                        "prefix": None if prefix is None else like_prefix(prefix),
                    },
                )
            ).all()
        return _ranked(rows)[:depth]

    def repair(self) -> tuple[int, int]:
        """Make the shards hold exactly the coordinator's chunks; returns (put, removed)."""
        return self.run(self._repair())

    async def _repair(self) -> tuple[int, int]:
        async with self._engine.begin() as conn:
            on_shards = set(await conn.scalars(text("SELECT * FROM rag_proxy.ids()")))
            wanted = set(await conn.scalars(text("SELECT chunk_id FROM rag_index.chunks")))
            extra = sorted(on_shards - wanted)
            if extra:
                await conn.execute(text("SELECT rag_proxy.remove(CAST(:ids AS bigint[]))"), {"ids": extra})
        missing = sorted(wanted - on_shards)
        if missing:
            import numpy as np
            from sqlalchemy.ext.asyncio import AsyncSession

            async with AsyncSession(self._engine) as session, session.begin():
                rows = (
                    await session.execute(
                        text(
                            "SELECT c.id, c.document_id, c.collection_id, d.path, c.text, c.embedding, c.heading, "
                            "c.ordinal, r.lead_id FROM chunks c JOIN documents d ON d.id = c.document_id "
                            "JOIN rag_index.chunks r ON r.chunk_id = c.id WHERE c.id = ANY(CAST(:ids AS bigint[]))"
                        ),
                        {"ids": missing},
                    )
                ).all()
                by_collection: dict[int, list[IndexedChunk]] = {}
                leads: dict[int, int] = {}
                for r in rows:
                    vector = np.frombuffer(r[5], dtype="<f4")
                    chunk = IndexedChunk(int(r[0]), int(r[1]), r[3], r[4], vector, r[6], int(r[7]))
                    by_collection.setdefault(int(r[2]), []).append(chunk)
                    leads[chunk.chunk_id] = int(r[8])  # a repair may put part of a document: the coordinator's
                writer = self.writer()
                for collection_id, group in by_collection.items():
                    await writer.put_only(session, collection_id=collection_id, chunks=group, leads=leads)
        if extra or missing:
            log.warning("shards repaired", extra={"put": len(missing), "removed": len(extra)})
        return len(missing), len(extra)
