"""Ingestion through the real parts: packaged embedding model, real FAISS/BM25 snapshots,
SQLite and PostgreSQL.

Each test runs on both databases (the ``database_url`` fixture is parametrized).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document
from ingest.worker import IngestContext, build_ingest_context, enqueue_path, run_job
from retrieval.hybrid import HybridRetriever
from retrieval.types import SearchFilters, SearchOptions
from tests.corpus_factory import Corpus, write_corpus

pytestmark = [pytest.mark.integration]


async def ingest(ctx: IngestContext, path: Path, collection: str = "docs", prune: bool = True) -> dict[str, Any]:
    job_id, _ = await enqueue_path(ctx.sessionmaker, path, collection=collection, prune=prune)
    summary = await run_job(ctx, job_id)
    assert summary is not None
    return summary.as_json()


async def id_sets(ctx: IngestContext, collection: str) -> tuple[set[int], set[int], set[int], set[int]]:
    """Chunk ids in the database, FAISS, BM25 and the snapshot's chunk payloads."""
    async with ctx.sessionmaker() as session:
        coll = await session.scalar(select(Collection).where(Collection.name == collection))
        assert coll is not None
        db = set(await session.scalars(select(ChunkRow.id).where(ChunkRow.collection_id == coll.id)))
    snap = ctx.store.load(collection)
    assert snap is not None
    return db, {int(i) for i in snap.dense.ids()}, {int(i) for i in snap.sparse.ids}, set(snap.chunks)


async def assert_consistent(ctx: IngestContext, collection: str) -> int:
    db, dense, sparse, payload = await id_sets(ctx, collection)
    assert db == dense == sparse == payload
    return len(db)


@pytest.fixture
async def ctx(database_url: str, make_settings: Any, embedder: Any) -> Any:
    context = await build_ingest_context(make_settings(database_url), embedder=embedder)
    yield context
    await context.aclose()


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return write_corpus(tmp_path / "corpus")


async def test_mixed_folder_is_indexed_and_bad_files_are_recorded(ctx: IngestContext, corpus: Corpus) -> None:
    summary = await ingest(ctx, corpus.root)

    assert summary["status"] == "succeeded"
    assert summary["files"]["new"] == len(corpus.loadable)
    assert summary["files"]["failed"] == len(corpus.failing)
    assert summary["files"]["skipped"] == len(corpus.skipped)
    assert {e["path"] for e in summary["errors"]} == {str(p) for p in corpus.failing}
    assert all(e["reason"] for e in summary["errors"])
    total = await assert_consistent(ctx, "docs")
    assert total == summary["chunks"]["total"] == summary["chunks"]["added"] > 0

    async with ctx.sessionmaker() as session:
        docs = {d.path: d for d in await session.scalars(select(Document))}
    assert docs[str(corpus.pdf)].page_count == 3
    assert docs[str(corpus.corrupt_pdf)].status == "failed"
    assert docs[str(corpus.cp1252_text)].status == "indexed"
    assert str(corpus.unknown) not in docs

    # Every fact is found by the dense leg in its own file, and PDF facts on their page.
    retriever = HybridRetriever(ctx.store, ctx.embedder)
    for fact in corpus.facts:
        hits = retriever.search_sync(fact.query, k=3, options=SearchOptions(mode="dense"))
        top = [h for h in hits if h.chunk.path == str(fact.path)]
        assert top, f"{fact.query!r} did not retrieve {fact.path.name}"
        assert fact.answer in top[0].chunk.text or any(fact.answer in h.chunk.text for h in top)
        if fact.page is not None:
            assert any(h.chunk.page == fact.page and fact.answer in h.chunk.text for h in top)
        # The chunk's offsets point at its text in the document.
        chunk = top[0].chunk
        assert chunk.end - chunk.start >= len(chunk.text.strip())


async def test_reingest_is_incremental(ctx: IngestContext, corpus: Corpus) -> None:
    first = await ingest(ctx, corpus.root)
    second = await ingest(ctx, corpus.root)
    assert second["files"]["unchanged"] == first["files"]["new"] + first["files"]["failed"]
    assert second["files"]["new"] == second["files"]["changed"] == second["files"]["deleted"] == 0
    assert second["chunks"] == {"added": 0, "removed": 0, "total": first["chunks"]["total"]}
    version = ctx.store.load("docs")
    assert version is not None

    corpus.text.write_text(corpus.text.read_text() + "\nThe zorblax reactor got a new gasket in 2024.\n")
    corpus.html.unlink()
    third = await ingest(ctx, corpus.root)
    assert third["files"]["changed"] == 1
    assert third["files"]["deleted"] == 1
    assert third["files"]["new"] == 0
    total = await assert_consistent(ctx, "docs")
    assert total == third["chunks"]["total"]
    async with ctx.sessionmaker() as session:
        paths = set(await session.scalars(select(Document.path)))
    assert str(corpus.html) not in paths

    retriever = HybridRetriever(ctx.store, ctx.embedder)
    hits = retriever.search_sync("capital of Veldoria Marnhaven", k=5)
    assert all(h.chunk.path != str(corpus.html) for h in hits)


async def test_no_prune_and_single_file(ctx: IngestContext, corpus: Corpus) -> None:
    await ingest(ctx, corpus.root)
    corpus.html.unlink()
    kept = await ingest(ctx, corpus.root, prune=False)
    assert kept["files"]["deleted"] == 0
    single = await ingest(ctx, corpus.text, collection="single")
    assert single["files"]["new"] == 1
    assert single["files"]["seen"] == 1
    await assert_consistent(ctx, "single")


async def test_collections_are_isolated(ctx: IngestContext, corpus: Corpus, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(corpus.text, other / "notes.txt")
    await ingest(ctx, corpus.root, collection="a")
    await ingest(ctx, other, collection="b")
    retriever = HybridRetriever(ctx.store, ctx.embedder)
    hits = await retriever.search("capital of Veldoria", k=5, filters=SearchFilters(collections=("b",)))
    assert hits and all(h.chunk.collection == "b" for h in hits)
    async with ctx.sessionmaker() as session:
        counts = dict(
            (
                await session.execute(
                    select(Collection.name, func.count(ChunkRow.id))
                    .join(ChunkRow, ChunkRow.collection_id == Collection.id)
                    .group_by(Collection.name)
                )
            ).all()
        )
    assert counts["b"] < counts["a"]


async def test_large_files_are_limited_or_ingested(tmp_path: Path, make_settings: Any, embedder: Any) -> None:
    from tests.corpus_factory import LARGE_TEXT_QUERY, write_large_text

    folder = tmp_path / "big"
    folder.mkdir()
    # A 50 MB file over the configured limit is recorded as failed without being read ...
    write_large_text(folder / "huge.txt", 50 * 1024 * 1024)
    # ... while a large file under it is ingested and its needle found.
    fact = write_large_text(folder / "large.txt", 200 * 1024, seed=3)
    settings = make_settings(ingest={"max_file_mb": 10})
    ctx = await build_ingest_context(settings, embedder=embedder)
    try:
        summary = await ingest(ctx, folder, collection="big")
        assert summary["files"]["failed"] == 1
        assert summary["errors"][0]["path"].endswith("huge.txt")
        assert "too large" in summary["errors"][0]["reason"]
        assert summary["files"]["new"] == 1
        assert summary["chunks"]["added"] > 100
        await assert_consistent(ctx, "big")
        hits = HybridRetriever(ctx.store, ctx.embedder).search_sync(LARGE_TEXT_QUERY, k=5)
        assert any(fact.answer in h.chunk.text for h in hits)
    finally:
        await ctx.aclose()


async def test_searches_during_reindex_see_whole_versions(ctx: IngestContext, corpus: Corpus, tmp_path: Path) -> None:
    """Readers keep searching while the worker publishes new versions; every answer comes from
    one complete version (its chunk ids are all in that version's DB state, nothing half-written)."""
    import asyncio
    import threading

    await ingest(ctx, corpus.root)
    retriever = HybridRetriever(ctx.store, ctx.embedder)
    stop = threading.Event()
    errors: list[BaseException] = []
    versions: set[str] = set()
    searches = 0

    def reader() -> None:
        nonlocal searches
        while not stop.is_set():
            try:
                snap = ctx.store.load("docs")
                assert snap is not None
                versions.add(snap.version)
                hits = retriever.search_sync("zorblax reactor temperature", k=5)
                for h in hits:
                    assert h.chunk.text
                searches += 1
            except BaseException as e:  # surfaced below
                errors.append(e)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(3):
            (corpus.root / f"extra{i}.txt").write_text(
                f"Extra note {i}: the zorblax reactor was serviced in week {i}.\n"
            )
            await ingest(ctx, corpus.root)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors[0]
    assert searches > 0
    assert len(versions) >= 2  # the reader saw the index change under it
    await assert_consistent(ctx, "docs")


async def test_a_folder_swapped_for_a_symlink_after_queueing_is_not_followed(
    ctx: IngestContext, tmp_path: Path
) -> None:
    # Issue 17: the path was checked when the job was queued, not when the worker ran it; a folder
    # replaced by a link to elsewhere in between was followed and the outside file became searchable.
    inside = tmp_path / "allowed" / "docs"
    inside.mkdir(parents=True)
    (inside / "ok.md").write_text("# Fine\nNothing secret here.", encoding="utf-8")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\nThe launch code is 0000.", encoding="utf-8")
    job_id, _ = await enqueue_path(ctx.sessionmaker, inside, collection="swap")
    shutil.rmtree(inside)
    inside.symlink_to(outside, target_is_directory=True)
    summary = await run_job(ctx, job_id)
    assert summary is not None and summary.status == "failed"
    async with ctx.sessionmaker() as session:
        paths = list(await session.scalars(select(Document.path)))
    assert not any("secret" in p for p in paths)
    snap = ctx.store.load("swap")
    assert snap is None or not any("launch code" in c.text for c in snap.chunks.values())


async def test_a_file_name_that_is_not_utf8_fails_alone(ctx: IngestContext, tmp_path: Path) -> None:
    # Issue 17: one such name failed the whole folder job (0 files ingested).
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.md").write_text("# Good\nThe good file is ingested.", encoding="utf-8")
    bad = os.fsencode(str(folder)) + b"/caf\xe9.md"  # Latin-1 bytes: not a UTF-8 name
    fd = os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"# Bad name\nThe content is fine.")
    os.close(fd)
    summary = await ingest(ctx, folder, collection="names")
    assert summary["status"] == "succeeded"
    assert summary["files"]["new"] == 1 and summary["files"]["failed"] == 1
    assert "UTF-8" in summary["errors"][0]["reason"] and "caf\ufffd.md" in summary["errors"][0]["path"]
    assert await assert_consistent(ctx, "names") >= 1
