"""The ``postgres`` retrieval backend through the real parts: pgvector on the test PostgreSQL, the
ingestion pipeline, the packaged embedding model.

A few hundred FAQ passages (``shared/eval/faq-dev-small``) are ingested once per module with
``RAG_RETRIEVAL__BACKEND=postgres``; the BM25 leg is compared with the local BM25
(:class:`retrieval.sparse.SparseIndex`) and rank-bm25 on the same chunk texts, and re-ingests and
deletes must leave the statistics equal to the postings without any reconcile.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rank_bm25 import BM25Okapi
from sqlalchemy import text

from core.pgindex.index import _SPARSE, PgIndex, PgRetriever, _ranked
from ingest.worker import IngestContext, build_ingest_context, enqueue_path, run_job
from retrieval.sparse import SparseIndex
from retrieval.types import SearchFilters, SearchOptions, UnknownCollectionError

pytestmark = [pytest.mark.integration]

FAQ = Path(__file__).resolve().parents[3] / "shared" / "eval" / "faq-dev-small"
PASSAGES = 150


def write_passages(folder: Path, count: int = PASSAGES) -> list[str]:
    """The first ``count`` passages as text files in two sub-folders; returns the queries."""
    folder.mkdir(parents=True, exist_ok=True)
    with (FAQ / "corpus.jsonl").open(encoding="utf-8") as f:
        for i, line in zip(range(count), f, strict=False):
            row = json.loads(line)
            sub = folder / ("a" if i % 2 else "b")
            sub.mkdir(exist_ok=True)
            (sub / f"p{i:04d}.txt").write_text(f"{row.get('title', '')}\n\n{row['text']}", encoding="utf-8")
    with (FAQ / "queries.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:40]


async def ingest(ctx: IngestContext, path: Path, collection: str) -> None:
    job_id, _ = await enqueue_path(ctx.sessionmaker, path, collection=collection)
    summary = await run_job(ctx, job_id)
    assert summary is not None and summary.as_json()["files"]["failed"] == 0


@pytest.fixture
async def ctx(pg_database_url: str, make_settings: Any, embedder: Any) -> AsyncIterator[IngestContext]:
    settings = make_settings(pg_database_url, retrieval={"backend": "postgres"})
    context = await build_ingest_context(settings, embedder=embedder)
    assert isinstance(context.store, PgIndex)
    yield context
    await context.aclose()


async def chunk_texts(ctx: IngestContext, collection: str) -> dict[int, str]:
    async with ctx.sessionmaker() as session:
        rows = await session.execute(
            text(
                "SELECT c.id, c.text FROM chunks c JOIN collections col ON col.id = c.collection_id "
                "WHERE col.name = :name"
            ),
            {"name": collection},
        )
        return {int(i): t for i, t in rows.tuples()}


async def assert_statistics_exact(ctx: IngestContext) -> None:
    """Document frequencies, their histogram and the collection counts equal a recount of the postings."""
    async with ctx.sessionmaker() as session:
        checks = {
            "terms": """
                SELECT count(*) FROM (
                    SELECT collection_id, term, count(*) AS df FROM rag_index.postings GROUP BY 1, 2
                ) p FULL JOIN rag_index.terms t USING (collection_id, term)
                WHERE p.df IS DISTINCT FROM t.df""",
            "df_hist": """
                SELECT count(*) FROM (
                    SELECT collection_id, df, count(*) AS n FROM rag_index.terms GROUP BY 1, 2
                ) p FULL JOIN rag_index.df_hist h USING (collection_id, df)
                WHERE p.n IS DISTINCT FROM h.terms""",
            "stats": """
                SELECT count(*) FROM (
                    SELECT collection_id, count(*) AS n, sum(doc_len) AS len FROM rag_index.chunks GROUP BY 1
                ) p FULL JOIN rag_index.stats s USING (collection_id)
                WHERE p.n IS DISTINCT FROM s.n_docs OR p.len IS DISTINCT FROM s.total_len""",
            "chunks": """
                SELECT count(*) FROM chunks c FULL JOIN rag_index.chunks r ON r.chunk_id = c.id
                WHERE c.id IS NULL OR r.chunk_id IS NULL""",
        }
        for name, sql in checks.items():
            assert await session.scalar(text(sql)) == 0, f"{name} disagrees with a recount"


def assert_bm25_parity(retriever: PgRetriever, texts: dict[int, str], queries: list[str], collection: str) -> None:
    """The postgres BM25 leg returns every matching chunk with the local BM25's score."""
    tokenizer = retriever.index.tokenizer
    ids = sorted(texts)
    local = SparseIndex(ids, [tokenizer(texts[i]) for i in ids], tokenizer=tokenizer)
    oracle = BM25Okapi([tokenizer(texts[i]) for i in ids])
    options = SearchOptions(mode="sparse", depth=len(ids))
    compared = 0
    for query in queries:
        hits = retriever.search_sync(query, k=len(ids), filters=SearchFilters((collection,)), options=options)
        got = {h.chunk.id: h.score for h in hits}
        want_ids, want_scores = local.search(query, len(ids))
        want = dict(zip(want_ids.tolist(), want_scores.tolist(), strict=True))
        assert set(got) == set(want), query
        for chunk_id, score in want.items():
            assert math.isclose(got[chunk_id], score, rel_tol=1e-9, abs_tol=1e-12), (query, chunk_id)
        # The oracle, on the same id order.
        oracle_scores = oracle.get_scores(tokenizer(query))
        for pos, chunk_id in enumerate(ids):
            if chunk_id in got:
                assert math.isclose(got[chunk_id], oracle_scores[pos], rel_tol=1e-9, abs_tol=1e-12)
        assert [h.chunk.id for h in hits[:10]] == want_ids[:10].tolist(), query
        compared += len(want)
    assert compared > 100


async def test_bm25_parity_filters_and_transactional_deletes(ctx: IngestContext, tmp_path: Path) -> None:
    folder = tmp_path / "faq"
    queries = write_passages(folder)
    await ingest(ctx, folder, "faq")
    await ingest(ctx, folder / "a", "other")  # a second collection: its statistics must not leak
    await assert_statistics_exact(ctx)
    index = ctx.store
    assert isinstance(index, PgIndex)
    assert index.collections() == ["faq", "other"]
    retriever = index.retriever(ctx.embedder)
    texts = await chunk_texts(ctx, "faq")
    assert len(texts) >= PASSAGES
    assert_bm25_parity(retriever, texts, queries, "faq")

    # Filters are applied inside the SQL: collection and path prefix, both legs.
    prefix = str(folder / "a") + "/"
    for mode in ("dense", "sparse", "hybrid"):
        hits = retriever.search_sync(
            queries[0],
            k=20,
            filters=SearchFilters(("faq",), path_prefix=prefix),
            options=SearchOptions(mode=mode),  # type: ignore[arg-type]
        )
        assert hits and all(h.chunk.path.startswith(prefix) and h.chunk.collection == "faq" for h in hits)
        assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    with pytest.raises(UnknownCollectionError):
        retriever.search_sync("x", filters=SearchFilters(("nope",)))

    # A changed file, a deleted file and a dropped sub-folder: re-ingest; no reconcile runs.
    changed = folder / "b" / "p0000.txt"
    changed.write_text("Completely new text about zebra crossings and zebra stripes.", encoding="utf-8")
    (folder / "b" / "p0002.txt").unlink()
    await ingest(ctx, folder, "faq")
    await assert_statistics_exact(ctx)
    texts = await chunk_texts(ctx, "faq")
    assert_bm25_parity(retriever, texts, [*queries[:10], "zebra stripes"], "faq")
    top = retriever.search_sync("zebra crossings", k=1, filters=SearchFilters(("faq",)))
    assert top[0].chunk.path == str(changed)

    # Deleting a collection cascades through the index and its statistics.
    async with ctx.sessionmaker() as session, session.begin():
        await session.execute(text("DELETE FROM collections WHERE name = 'other'"))
    await assert_statistics_exact(ctx)
    assert index.collections() == ["faq"]


async def test_bm25_top_k_prunes_and_stays_exact(ctx: IngestContext, tmp_path: Path) -> None:
    """rag_index.bm25_top (MaxScore) returns the local BM25's top k, scores included, and does prune."""
    folder = tmp_path / "faq"
    queries = write_passages(folder)
    queries += ["python list sort dictionary", "how do I install python on windows", "why is python slow"]
    await ingest(ctx, folder, "faq")
    await ingest(ctx, folder / "a", "other")  # two collections: (collection, term) pairs of both
    index = ctx.store
    assert isinstance(index, PgIndex)
    tokenizer = index.tokenizer
    cids = index.run(index.collection_ids(None))
    locals_ = []
    for name in ("faq", "other"):
        texts = await chunk_texts(ctx, name)
        ids = sorted(texts)
        locals_.append(SparseIndex(ids, [tokenizer(texts[i]) for i in ids], tokenizer=tokenizer))
    messages: list[str] = []
    pruned = 0
    async with ctx.sessionmaker() as session:
        conn = await session.connection()
        raw = (await conn.get_raw_connection()).driver_connection

        def listen(_conn: object, message: Any) -> None:
            messages.append(message.message)

        raw.add_log_listener(listen)
        await conn.execute(text("SET client_min_messages = debug1"))  # bm25_top says when it pruned
        for depth in (5, 10, 40):
            for query in queries:
                before = len(messages)
                params = index.sparse_params(cids, tokenizer(query), depth, None)
                # Prune whenever the bounds allow (the cost rules would pick the plain sum at this size).
                params.update(probe_cost=0.0, read_share=1.0)
                rows = (await conn.execute(_SPARSE, params)).all()
                pruned += any("bm25_top pruned" in m for m in messages[before:])
                got = _ranked(rows)
                # The local backend's legs, merged by raw score as the local retriever merges them.
                merged: list[tuple[int, float]] = []
                for local in locals_:
                    found = local.search(query, depth)
                    merged += zip(found[0].tolist(), found[1].tolist(), strict=True)
                want = sorted(merged, key=lambda r: (-float(f"{r[1]:.12g}"), r[0]))[:depth]
                assert len(got) == len(want), (query, depth)
                for (a_id, a), (b_id, b) in zip(got, want, strict=True):
                    assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (query, depth)
                    assert a_id == b_id or math.isclose(a, b, rel_tol=1e-12), (query, depth)  # ties: by id
        await conn.execute(text("RESET client_min_messages"))
        raw.remove_log_listener(listen)
    assert pruned >= len(queries), f"pruned on only {pruned} of {3 * len(queries)} searches"


@pytest.mark.parametrize("lead_weight", [SearchOptions().lead_weight, 0.0], ids=["default-leads", "no-leads"])
async def test_hybrid_search_matches_the_local_backend(
    ctx: IngestContext, tmp_path: Path, make_settings: Any, embedder: Any, lead_weight: float
) -> None:
    """Same chunks, same tokenizer, same section leads, same fusion: the results agree with the local
    backend's, at the default section-lead weight and without the blend."""
    from core.wiring import build_retriever, open_store
    from ingest.indexer import rebuild

    folder = tmp_path / "faq"
    queries = write_passages(folder, 80)
    # Passages with headings: several sections per document, so leads are not just first chunks.
    write_sections(folder / "manual", 6)
    await ingest(ctx, folder, "faq")
    pg = ctx.store.retriever(ctx.embedder) if isinstance(ctx.store, PgIndex) else None
    assert pg is not None
    async with ctx.sessionmaker() as session:
        sections = await session.scalar(
            text("SELECT count(*) FROM rag_index.chunks WHERE chunk_id = lead_id AND path LIKE '%/manual/%'")
        )
    assert sections and sections > 6, "the manuals have more sections than documents"
    # The local backend's snapshot of the very same chunk rows.
    local_settings = make_settings(retrieval={"dense_accelerator": "none", "lead_weight": lead_weight})
    store = open_store(local_settings, model_id=embedder.model_id, dimension=embedder.dimension)
    await rebuild(ctx.sessionmaker, store, "faq")  # type: ignore[arg-type]
    local = build_retriever(local_settings, store, embedder)
    filters = SearchFilters(("faq",))
    queries = [*queries, *SECTION_QUERIES]
    same_top1 = 0
    overlap = []
    for query in queries:
        a = [
            h.chunk.id
            for h in pg.search_sync(query, k=10, filters=filters, options=SearchOptions(lead_weight=lead_weight))
        ]
        b = [h.chunk.id for h in local.search_sync(query, k=10, filters=filters)]
        same_top1 += a[0] == b[0]
        overlap.append(len(set(a) & set(b)) / 10)
    # HNSW at this size finds the exact neighbours; fused rankings agree (float rounding aside).
    assert same_top1 >= len(queries) - 1
    assert float(np.mean(overlap)) >= 0.95
    # The dense leg alone, scores included: float32 dot products in another order (FAISS, pgvector)
    # differ in the last bits, so ranks may only swap between near-equal scores.
    dense = SearchOptions(mode="dense", lead_weight=lead_weight)
    for query in queries:
        a = pg.search_sync(query, k=10, filters=filters, options=dense)
        b = local.search_sync(query, k=10, filters=filters, options=dense)
        assert len(a) == len(b) == 10
        for x, y in zip(a, b, strict=True):
            assert math.isclose(x.score, y.score, abs_tol=1e-5), (query, x.chunk.id, y.chunk.id)
            if x.chunk.id != y.chunk.id:
                assert {x.chunk.id, y.chunk.id} <= {h.chunk.id for h in a} & {h.chunk.id for h in b}, query


SECTION_QUERIES = ["How do I install the tool on Linux?", "Where are the configuration files kept?"]


def write_sections(folder: Path, count: int) -> None:
    """``count`` Markdown manuals, each with several headed sections of a few paragraphs."""
    folder.mkdir(parents=True, exist_ok=True)
    with (FAQ / "corpus.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(PASSAGES + count * 4), f, strict=False)][PASSAGES:]
    for d in range(count):
        parts = [f"# Manual {d}\n\nThis manual covers installing and configuring tool {d}.\n"]
        for s, heading in enumerate(("Install on Linux", "Configuration files", "Troubleshooting", "Upgrades")):
            row = rows[(d * 4 + s) % len(rows)]
            parts.append(f"## {heading}\n\n{row['text']}\n\n{row['text']}\n")
        (folder / f"manual{d}.md").write_text("\n".join(parts), encoding="utf-8")


async def swap_collection(ctx: IngestContext, collection: str) -> None:
    """What a reindex's swap does to a collection, in one committed transaction: every chunk row (and its
    index rows) replaced by a copy under a new id, the old rows deleted (cascading through the index)."""
    copy = """
        INSERT INTO {table} SELECT (jsonb_populate_record(NULL::{table}, to_jsonb(c) || jsonb_build_object({keys}))).*
        FROM {table} c {joins}
    """
    async with ctx.sessionmaker() as session, session.begin():
        await session.execute(
            text(
                "CREATE TEMP TABLE swap_ids ON COMMIT DROP AS SELECT c.id AS old, nextval(pg_get_serial_sequence("
                "'chunks', 'id')) AS new FROM chunks c JOIN collections col ON col.id = c.collection_id "
                "WHERE col.name = :name"
            ),
            {"name": collection},
        )
        await session.execute(
            text(copy.format(table="chunks", keys="'id', m.new", joins="JOIN swap_ids m ON m.old = c.id"))
        )
        await session.execute(
            text(
                copy.format(
                    table="rag_index.chunks",
                    keys="'chunk_id', m.new, 'lead_id', l.new",
                    joins="JOIN swap_ids m ON m.old = c.chunk_id JOIN swap_ids l ON l.old = c.lead_id",
                )
            )
        )
        await session.execute(
            text(
                copy.format(
                    table="rag_index.postings", keys="'chunk_id', m.new", joins="JOIN swap_ids m ON m.old = c.chunk_id"
                )
            )
        )
        await session.execute(text("DELETE FROM chunks WHERE id IN (SELECT old FROM swap_ids)"))


@pytest.mark.parametrize("step", ["dense_leg", "sparse_leg", "chunks"])
async def test_a_search_straddling_a_swap_answers_from_one_snapshot(
    ctx: IngestContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A reindex's swap commits while a hybrid search runs, right before one of its steps (forced: the
    step is wrapped to commit the swap first). The search answers from the snapshot it started in:
    the old chunks, all of them found (it used to answer ``hits: []`` when the swap committed between
    the legs and the chunk-row fetch, because each ran in a transaction of its own)."""
    folder = tmp_path / "faq"
    write_passages(folder, 40)
    await ingest(ctx, folder, "faq")
    index = ctx.store
    assert isinstance(index, PgIndex)
    retriever = index.retriever(ctx.embedder)
    query, filters = "how do I read a file line by line", SearchFilters(("faq",))
    old = set(await chunk_texts(ctx, "faq"))
    before = await asyncio.to_thread(retriever.search_sync, query, k=10, filters=filters)
    assert len(before) == 10 and {h.chunk.id for h in before} <= old

    test_loop = asyncio.get_running_loop()
    original = getattr(index, step)
    swapped = []

    async def swap_first(*args: Any, **kwargs: Any) -> Any:
        if not swapped:  # on the index's loop: the swap commits on the test's loop, then the step runs
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(swap_collection(ctx, "faq"), test_loop))
            swapped.append(step)
        return await original(*args, **kwargs)

    monkeypatch.setattr(index, step, swap_first)
    during = await asyncio.to_thread(retriever.search_sync, query, k=10, filters=filters)
    monkeypatch.undo()
    assert swapped == [step]
    new = set(await chunk_texts(ctx, "faq"))
    assert new and not new & old
    assert [(h.chunk.id, h.chunk.text, h.score) for h in during] == [
        (h.chunk.id, h.chunk.text, h.score) for h in before
    ]
    after = await asyncio.to_thread(retriever.search_sync, query, k=10, filters=filters)
    assert len(after) == 10 and {h.chunk.id for h in after} <= new
    assert [h.chunk.text for h in after] == [h.chunk.text for h in before]
    await assert_statistics_exact(ctx)
