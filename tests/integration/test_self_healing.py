"""One corrupt index snapshot stops nothing (issue 17).

Before: ``rag worker`` exited 1 at start-up and nothing rebuilt the index; searches naming no
collection failed for every collection; asks on the corrupt one answered 500 ``retrieval_error``;
a manifest with invalid UTF-8 gave 422. Now: the worker starts, rebuilds the collection from the
database (which holds every chunk and its vector), searches serve the healthy collections and
name the broken one, and every request that needs the broken index gets 503 ``index_corrupt``
with ``Retry-After``. Real embedding model, real snapshots, SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from app.main import create_app
from ingest.worker import build_ingest_context, enqueue_path, run_job, run_worker
from tests.unit.fakes_llm import FakeLLM

pytestmark = [pytest.mark.integration]


def _garble_manifest(version_dir: Path) -> None:
    (version_dir / "manifest.json").write_bytes(b'{"format": 1, "collection": "caf\xe9\xff"}')


def _truncate_sparse(version_dir: Path) -> None:
    sparse = version_dir / "sparse.npz"
    sparse.write_bytes(sparse.read_bytes()[:100])


@pytest.mark.parametrize("corrupt", [_garble_manifest, _truncate_sparse], ids=["manifest-not-utf8", "sparse-truncated"])
async def test_a_corrupt_snapshot_is_reported_served_around_and_rebuilt(
    database_url: str, make_settings: Any, embedder: Any, tmp_path: Path, corrupt: Callable[[Path], None]
) -> None:
    settings = make_settings(database_url)
    for name, text in (("broken", "The vault opens at dawn."), ("healthy", "The library opens at nine.")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{name}.md").write_text(f"# {name}\n{text}\n", encoding="utf-8")
    ctx = await build_ingest_context(settings, embedder=embedder)
    try:
        for name in ("broken", "healthy"):
            job_id, _ = await enqueue_path(ctx.sessionmaker, tmp_path / name, collection=name)
            assert (await run_job(ctx, job_id)) is not None
        before = set(ctx.store.load("broken").chunks)  # type: ignore[union-attr]
    finally:
        await ctx.aclose()
    cdir = settings.index_dir / "broken"
    corrupt(cdir / "versions" / (cdir / "CURRENT").read_text(encoding="utf-8").strip())

    with TestClient(create_app(settings, embedder=embedder, llm=FakeLLM()), raise_server_exceptions=False) as c:
        everywhere = c.post("/v1/search", json={"query": "when does it open?"})
        assert everywhere.status_code == 200, everywhere.text
        body = everywhere.json()
        assert body["unavailable"] == ["broken"]
        assert body["hits"] and {h["collection"] for h in body["hits"]} == {"healthy"}
        named = c.post("/v1/search", json={"query": "vault", "filters": {"collections": ["broken"]}})
        assert named.status_code == 503, named.text
        assert named.json()["error"]["code"] == "index_corrupt" and "Retry-After" in named.headers
        ask = c.post("/v1/ask", json={"question": "When does the vault open?", "collection": "broken"})
        assert ask.status_code == 503, ask.text
        assert ask.json()["error"]["code"] == "index_corrupt"

        # The worker starts anyway (it used to exit 1 here) and rebuilds the collection from the database.
        assert await run_worker(settings, once=True) == 0
        healed = c.post("/v1/search", json={"query": "vault", "filters": {"collections": ["broken"]}})
        assert healed.status_code == 200, healed.text
        assert "vault" in healed.json()["hits"][0]["text"]
        assert c.post("/v1/search", json={"query": "opens"}).json()["unavailable"] == []
    ctx = await build_ingest_context(settings, embedder=embedder)
    try:
        assert set(ctx.store.load("broken").chunks) == before  # type: ignore[union-attr]
    finally:
        await ctx.aclose()


async def test_an_idle_worker_rebuilds_a_snapshot_corrupted_while_it_runs(
    make_settings: Any, embedder: Any, tmp_path: Path
) -> None:
    import asyncio

    settings = make_settings(ingest={"check_indexes_seconds": 0.2, "poll_seconds": 0.05})
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.md").write_text("# A\nThe ferry leaves at noon.\n", encoding="utf-8")
    ctx = await build_ingest_context(settings, embedder=embedder)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection="idle")
        await run_job(ctx, job_id)
    finally:
        await ctx.aclose()
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop))
    try:
        await asyncio.sleep(1.0)  # the worker is up and idle
        cdir = settings.index_dir / "idle"
        version = (cdir / "CURRENT").read_text(encoding="utf-8").strip()
        _garble_manifest(cdir / "versions" / version)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if (cdir / "CURRENT").read_text(encoding="utf-8").strip() != version:
                break
        else:
            raise AssertionError("the idle worker did not rebuild the corrupt snapshot")
    finally:
        stop.set()
        await worker
