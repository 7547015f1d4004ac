"""Changing the chunking and reindexing, through the real parts: the packaged embedding model, the
real worker (``run_worker``), the API served by uvicorn, SQLite and PostgreSQL, both retrieval
backends.

A folder is ingested with 200-token chunks; the service restarts configured for 60-token chunks.
The collection then reports ``reindex_needed`` and keeps answering from its old index, an ingest
that would mix recipes is refused, and a reindex job through the API and the worker rebuilds it
from the stored texts while another thread searches without pause: no search fails, none mixes
old and new chunks (local backend), and afterwards the new recipe is reported, no old chunk row is
left and every chunk's offsets still cut its exact text out of the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from app.main import create_app
from core.settings import Settings
from ingest.worker import build_ingest_context, enqueue_path, run_job, run_worker
from retrieval.store import IndexStore
from serving.launcher import find_free_port
from tests.integration.test_service import LiveServer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

FAQ = Path(__file__).resolve().parents[3] / "shared" / "eval" / "faq-dev-small"
RAG = str(Path(sys.executable).with_name("rag"))
OLD = {"chunk_tokens": 200, "overlap_tokens": 20}
NEW = {"chunk_tokens": 60, "overlap_tokens": 10}
QUERIES = ["how do I undo a commit", "join two paths", "immutable strings", "read a file line by line"]


def write_folder(folder: Path, files: int = 4, per_file: int = 3) -> dict[str, str]:
    """``files`` text files of ``per_file`` FAQ passages each (long enough for several chunks)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (FAQ / "corpus.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(files * per_file), f, strict=False)]
    out = {}
    for i in range(files):
        parts = rows[i * per_file : (i + 1) * per_file]
        body = "\n\n".join(f"{r.get('title', '')}\n\n{r['text']}" for r in parts) + "\n"
        path = folder / f"faq{i}.txt"
        path.write_text(body, encoding="utf-8")
        out[str(path)] = body
    return out


@dataclass
class Case:
    database_url: str
    backend: str
    tmp: Path

    def settings(self, chunking: dict[str, int]) -> Settings:
        return Settings(
            data_dir=self.tmp / "data",
            database={"url": self.database_url},
            retrieval={"backend": self.backend},
            chunking=chunking,
            ingest={"batch_chunks": 16},
            llm={"base_url": f"http://127.0.0.1:{find_free_port('127.0.0.1')}"},  # no answers needed
        )


@pytest.fixture(params=["sqlite-local", "postgres-local", "postgres-postgres"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    database, backend = request.param.split("-")
    if database == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'rag.db'}"
    else:
        url = request.getfixturevalue("pg_database_url")
    return Case(url, backend, tmp_path)


async def rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    from core.wiring import open_database

    db = await open_database(settings, migrate=False)
    try:
        async with db.sessionmaker() as session:
            return [tuple(r) for r in await session.execute(text(sql))]
    finally:
        await db.aclose()


async def chunk_rows(settings: Settings) -> dict[int, tuple[str, int, int, str]]:
    """``id -> (text, start, end, path)`` of the collection's chunk rows."""
    found = await rows(
        settings,
        'SELECT c.id, c.text, c.start, c."end", d.path FROM chunks c JOIN documents d ON d.id = c.document_id',
    )
    return {int(i): (t, int(s), int(e), p) for i, t, s, e, p in found}


@dataclass
class Searcher:
    """Searches the API from a thread until stopped; records every answer."""

    url: str
    responses: list[set[int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    new_ids: set[int] | None = None
    """Set once the new chunk ids are known; ``new_seen`` fires at the first answer made of them."""
    new_seen: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                query = QUERIES[i % len(QUERIES)]
                i += 1
                try:
                    r = client.post("/v1/search", json={"query": query, "k": 5, "collection": "docs"})
                except httpx.HTTPError as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200 or not r.json()["hits"]:
                    self.errors.append(f"{r.status_code}: {r.text[:300]}")
                    continue
                ids = {h["chunk_id"] for h in r.json()["hits"]}
                self.responses.append(ids)
                if self.new_ids is not None and ids <= self.new_ids:
                    self.new_seen.set()


@pytest.fixture
async def folder(tmp_path: Path) -> AsyncIterator[tuple[Path, dict[str, str]]]:
    root = tmp_path / "notes"
    yield root, write_folder(root)


async def test_changing_the_chunk_size_then_reindexing(
    case: Case, folder: tuple[Path, dict[str, str]], embedder: Any, caplog: pytest.LogCaptureFixture
) -> None:
    root, files = folder
    old_settings, new_settings = case.settings(OLD), case.settings(NEW)

    ctx = await build_ingest_context(old_settings, embedder=embedder)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, root, collection="docs")
        summary = await run_job(ctx, job_id)
        assert summary is not None and summary.status == "succeeded", summary
    finally:
        await ctx.aclose()
    old = await chunk_rows(old_settings)
    assert len(old) >= len(files)

    with LiveServer(create_app(new_settings, embedder=embedder)) as server:
        client = httpx.AsyncClient(base_url=server.url, timeout=120)
        # Restarted with another chunk size: one warning at start-up names the collection and the command,
        warned = [r for r in caplog.records if r.name == "ingest.reindex" and "rag reindex -c docs" in r.getMessage()]
        assert len(warned) == 1 and "200/20 tokens" in warned[0].getMessage()
        # the collection reports it, and search answers from the old index.
        docs = (await client.get("/v1/collections/docs")).json()
        assert docs["reindex_needed"] is True, docs
        assert docs["recipe"]["chunk_tokens"] == 200 and docs["chunks"] == len(old)
        hits = (await client.post("/v1/search", json={"query": QUERIES[0], "collection": "docs"})).json()["hits"]
        assert hits and {h["chunk_id"] for h in hits} <= set(old)

        # An ingest with the new recipe would mix the two: it fails and names the command.
        ctx = await build_ingest_context(new_settings, embedder=embedder)
        try:
            (root / "late.txt").write_text("A late file about reindexing collections.\n", encoding="utf-8")
            job_id, _ = await enqueue_path(ctx.sessionmaker, root, collection="docs")
            refused = await run_job(ctx, job_id)
            (root / "late.txt").unlink()
        finally:
            await ctx.aclose()
        assert refused is not None and refused.status == "failed"
        error = (await client.get(f"/v1/jobs/{job_id}")).json()["error"]
        assert "rag reindex -c docs" in error and "chunk_tokens: 200 -> 60" in error
        assert await chunk_rows(new_settings) == old

        job = (await client.post("/v1/collections/docs/reindex")).json()
        assert job["kind"] == "reindex" and job["status"] == "queued"
        searcher = Searcher(server.url)
        thread = threading.Thread(target=searcher.run, name="searcher")
        thread.start()
        try:
            assert await run_worker(new_settings, once=True, embedder=embedder) == 1
            # Keep searching until the new index answers: the searches then surely span the swap.
            searcher.new_ids = set(await chunk_rows(new_settings))
            await asyncio.to_thread(searcher.new_seen.wait, 60)
        finally:
            searcher.stop.set()
            thread.join(timeout=120)

        ended = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert (ended["status"], ended["kind"], ended["files"]["changed"]) == ("succeeded", "reindex", len(files))
        events = await client.get(f"/v1/jobs/{job['id']}/events", headers={"accept": "text/event-stream"})
        assert events.status_code == 200 and '"type":"job_end"' in events.text.replace(" ", "")
        new = await chunk_rows(new_settings)
        docs = (await client.get("/v1/collections/docs")).json()
        assert docs["reindex_needed"] is False and docs["recipe"]["chunk_tokens"] == 60
        assert (
            docs["recipe"]["fingerprint"]
            == (await client.get("/v1/collections")).json()["collections"][0]["recipe"]["fingerprint"]
        )
        assert docs["chunks"] == len(new) > len(old)
        assert not set(new) & set(old), "old chunk rows were left behind"
        for chunk_text, start, end, path in new.values():
            assert files[path][start:end] == chunk_text  # citations' offsets still cut the exact text
        stored = dict(await rows(new_settings, "SELECT path, text FROM documents"))
        assert stored == files

        after = (await client.post("/v1/search", json={"query": QUERIES[1], "collection": "docs"})).json()["hits"]
        assert after and {h["chunk_id"] for h in after} <= set(new)
        for hit in after:
            assert files[hit["path"]][hit["start"] : hit["end"]] == hit["text"]

        print(f"{case.backend}: {len(searcher.responses)} searches during the reindex, errors {searcher.errors[:3]}")
        assert not searcher.errors
        assert any(r <= set(old) for r in searcher.responses), "no search answered from the old index"
        assert any(r <= set(new) for r in searcher.responses), "no search answered from the new index"
        mixed = [r for r in searcher.responses if r & set(old) and r & set(new)]
        stray = [r for r in searcher.responses if r - set(old) - set(new)]
        assert not stray
        if case.backend == "local":
            assert not mixed, f"{len(mixed)} searches mixed old and new chunks"
            snapshot = IndexStore(
                new_settings.index_dir, model_id=embedder.model_id, dimension=embedder.dimension
            ).load("docs")
            assert snapshot is not None and snapshot.manifest.recipe is not None
            assert snapshot.manifest.recipe.fingerprint() == docs["recipe"]["fingerprint"]
            assert set(snapshot.ids.tolist()) == set(new)
        else:
            indexed = await rows(new_settings, "SELECT chunk_id FROM rag_index.chunks")
            assert {int(i) for (i,) in indexed} == set(new)
            print(f"postgres: {len(mixed)} of {len(searcher.responses)} searches straddled the swap")
        # Ingesting goes on as before with the new recipe: unchanged files stay unchanged.
        ctx = await build_ingest_context(new_settings, embedder=embedder)
        try:
            (root / "late.txt").write_text("A late file about reindexing collections.\n", encoding="utf-8")
            job_id, _ = await enqueue_path(ctx.sessionmaker, root, collection="docs")
            late = await run_job(ctx, job_id)
        finally:
            await ctx.aclose()
        assert late is not None and late.status == "succeeded"
        assert (late.files["new"], late.files["unchanged"]) == (1, len(files))
        docs = (await client.get("/v1/collections/docs")).json()
        assert docs["reindex_needed"] is False and docs["chunks"] == len(new) + 1
        await client.aclose()


def test_rag_reindex_lists_rebuilds_and_rag_jobs_shows_it(tmp_path: Path, embedder: Any) -> None:
    root = tmp_path / "notes"
    files = write_folder(root, files=2, per_file=2)
    url = f"sqlite+aiosqlite:///{tmp_path / 'rag.db'}"
    case = Case(url, "local", tmp_path)

    async def ingest() -> int:
        ctx = await build_ingest_context(case.settings(OLD), embedder=embedder)
        try:
            job_id, _ = await enqueue_path(ctx.sessionmaker, root, collection="docs")
            await run_job(ctx, job_id)
        finally:
            await ctx.aclose()
        return len(await chunk_rows(case.settings(OLD)))

    old_count = asyncio.run(ingest())
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_DATABASE__URL": url,
        "RAG_CHUNKING__CHUNK_TOKENS": "60",
        "RAG_CHUNKING__OVERLAP_TOKENS": "10",
        "RAG_SERVER__PORT": str(find_free_port("127.0.0.1")),  # no API there: the CLI works locally
        "HF_HUB_OFFLINE": "1",
    }

    def rag(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=900, check=False)

    listed = rag("reindex", "--list", "--json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    report = json.loads(listed.stdout)
    assert report["configured"]["chunk_tokens"] == 60
    [docs] = report["collections"]
    assert docs["reindex_needed"] is True and docs["recipe"]["chunk_tokens"] == 200 and docs["chunks"] == old_count
    assert "docs" in rag("reindex", "--list").stdout

    missing = rag("reindex", "-c", "nope")
    assert missing.returncode == 1 and "no collection 'nope'" in missing.stderr

    done = rag("reindex", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert (result["status"], result["kind"], result["collection"]) == ("succeeded", "reindex", "docs")
    assert result["chunks"]["total"] > old_count and result["chunks"]["removed"] == old_count

    again = rag("reindex")
    assert again.returncode == 0 and "nothing to reindex" in again.stdout
    jobs = json.loads(rag("jobs", "--json", "--local").stdout)
    assert [j["kind"] for j in jobs] == ["reindex", "ingest"]
    table = rag("jobs", "--local")
    assert "(reindex)" in table.stdout
    chunks = asyncio.run(chunk_rows(case.settings(NEW)))
    for chunk_text, start, end, path in chunks.values():
        assert files[path][start:end] == chunk_text
