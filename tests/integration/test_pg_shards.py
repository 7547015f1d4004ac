"""The sharded ``postgres`` backend on two real shard clusters (PL/Proxy), started by the tests.

One ingestion into a coordinator with two shards; the same database then also serves as the
single node (its index rows get their vectors back), so both rankings come from the same chunk
rows: they must be equal, BM25 scores included (global statistics). Deletes reach the shards,
and :meth:`ShardedPgIndex.repair` puts back what a shard lost.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from core.pgindex.index import PgIndex
from core.pgindex.shards import ShardedPgIndex, libpq_kwargs
from core.pgindex.writer import vector_literal
from ingest.worker import IngestContext, build_ingest_context
from retrieval.types import SearchFilters, SearchOptions
from tests.integration.test_pg_backend import ingest, write_passages
from tests.pg_shards import pg_shards  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration]


@pytest.fixture
async def ctx(
    pg_database_url: str,
    pg_shards: list[str],  # noqa: F811
    make_settings: Any,
    embedder: Any,
) -> AsyncIterator[IngestContext]:
    settings = make_settings(pg_database_url, retrieval={"backend": "postgres", "shards": pg_shards})
    context = await build_ingest_context(settings, embedder=embedder)
    assert isinstance(context.store, ShardedPgIndex)
    yield context
    await context.aclose()


async def shard_ids(index: ShardedPgIndex) -> list[int]:
    async with index._engine.connect() as conn:
        return sorted(await conn.scalars(text("SELECT * FROM rag_proxy.ids()")))


async def test_sharded_ranking_equals_one_node(ctx: IngestContext, tmp_path: Path, pg_database_url: str) -> None:
    folder = tmp_path / "faq"
    queries = write_passages(folder, 100)
    await ingest(ctx, folder, "faq")
    sharded = ctx.store
    assert isinstance(sharded, ShardedPgIndex)
    async with ctx.sessionmaker() as session, session.begin():
        coordinator = sorted(await session.scalars(text("SELECT chunk_id FROM rag_index.chunks")))
        vectors = await session.scalar(text("SELECT count(embedding) FROM rag_index.chunks"))
    assert vectors == 0, "the coordinator holds no vectors"
    assert sharded.run(shard_ids(sharded)) == coordinator
    per_shard = []
    for dsn in sharded.shards:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(**libpq_kwargs(dsn))
        per_shard.append(await conn.fetchval("SELECT count(*) FROM rag_shard.chunks"))
        await conn.close()
    assert all(n > 0 for n in per_shard) and sum(per_shard) == len(coordinator)

    # The same database as one node: give its index rows their vectors.
    async with ctx.sessionmaker() as session, session.begin():
        rows = (await session.execute(text("SELECT id, embedding FROM chunks"))).tuples().all()
        for chunk_id, blob in rows:
            await session.execute(
                text("UPDATE rag_index.chunks SET embedding = CAST(:v AS vector) WHERE chunk_id = :id"),
                {"v": vector_literal(np.frombuffer(blob, dtype="<f4")), "id": chunk_id},
            )
    single = PgIndex.open(
        pg_database_url, model_id=sharded.model_id, dimension=sharded.dimension, tokenizer=sharded.tokenizer.options
    )
    try:
        one = single.retriever(ctx.embedder)
        many = sharded.retriever(ctx.embedder)
        filters = SearchFilters(("faq",))
        for mode in ("sparse", "dense", "hybrid"):
            options = SearchOptions(mode=mode)  # type: ignore[arg-type]
            for query in queries:
                a = one.search_sync(query, k=10, filters=filters, options=options)
                b = many.search_sync(query, k=10, filters=filters, options=options)
                assert [h.chunk.id for h in a] == [h.chunk.id for h in b], (mode, query)
                for x, y in zip(a, b, strict=True):
                    assert math.isclose(x.score, y.score, rel_tol=1e-9, abs_tol=1e-9)
        prefix = str(folder / "a") + "/"
        hits = many.search_sync(queries[0], k=10, filters=SearchFilters(("faq",), path_prefix=prefix))
        assert hits and all(h.chunk.path.startswith(prefix) for h in hits)
    finally:
        single.close()

    # A deleted document's vectors leave its shard with it; a lost shard row is repaired.
    async with ctx.sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM documents WHERE path = :p"), {"p": str(folder / "a" / "p0001.txt")})
        coordinator = sorted(await session.scalars(text("SELECT chunk_id FROM rag_index.chunks")))
    assert sharded.run(shard_ids(sharded)) == coordinator
    sharded.run(_lose(sharded, coordinator[:3]))
    assert sharded.repair() == (3, 0)
    assert sharded.run(shard_ids(sharded)) == coordinator


async def _lose(index: ShardedPgIndex, ids: list[int]) -> None:
    async with index._engine.begin() as conn:
        await conn.execute(text("SELECT rag_proxy.remove(CAST(:ids AS bigint[]))"), {"ids": ids})
