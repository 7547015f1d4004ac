"""Controlling long ingestion through the real worker (``run_worker``, the packaged model, SQLite
and PostgreSQL): cancel a running job, watched folders, ``rag ingest --watch``, file events."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import select

from core.db.models import Chunk as ChunkRow
from core.db.models import Collection, Document, IngestJob, IngestJobEvent
from core.settings import Settings
from core.wiring import open_database, open_store
from ingest import queue
from ingest.worker import enqueue_path, run_worker

pytestmark = [pytest.mark.integration]

T = TypeVar("T")
RAG = str(Path(sys.executable).with_name("rag"))
BATCH = 8
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


def write_files(folder: Path, n: int) -> list[Path]:
    """``n`` text files of about two chunks each, every one with its own fact."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        filler = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(260))
        path = folder / f"note-{i:03d}.txt"
        path.write_text(f"Note {i}: the locker code of room {i} is {1000 + i}.\n\n{filler}\n", encoding="utf-8")
        paths.append(path)
    return paths


async def eventually(check: Callable[[], Awaitable[T | None]], *, within: float = 120.0, every: float = 0.1) -> T:
    """Poll ``check`` until it returns something (not None); fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within:.0f} s")
        await asyncio.sleep(every)


async def consistent_ids(settings: Settings, embedder: Any, collection: str) -> int:
    """The collection's chunk ids are the same in the database, FAISS and BM25; returns how many."""
    db = await open_database(settings, migrate=False)
    try:
        async with db.sessionmaker() as session:
            coll = await session.scalar(select(Collection).where(Collection.name == collection))
            assert coll is not None
            ids = set(await session.scalars(select(ChunkRow.id).where(ChunkRow.collection_id == coll.id)))
    finally:
        await db.aclose()
    snap = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension).load(collection)
    assert snap is not None
    assert ids == {int(i) for i in snap.dense.ids()} == {int(i) for i in snap.sparse.ids}
    return len(ids)


@pytest.fixture
def settings(database_url: str, make_settings: Any) -> Settings:
    s: Settings = make_settings(
        database_url, ingest={"batch_chunks": BATCH, "poll_seconds": 0.2, "watch_debounce_seconds": 0.3}
    )
    return s


async def test_cancel_stops_a_running_job_within_one_batch_and_keeps_what_it_committed(
    settings: Settings, embedder: Any, tmp_path: Path
) -> None:
    files = write_files(tmp_path / "many", 30)
    db = await open_database(settings)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop, embedder=embedder))
    try:
        job_id, _ = await enqueue_path(db.sessionmaker, tmp_path / "many", collection="big")

        async def first_batch_committed() -> IngestJob | None:
            async with db.sessionmaker() as session:
                job = await session.get(IngestJob, job_id)
                return job if job is not None and job.chunks_added > 0 else None

        await eventually(first_batch_committed)
        async with db.sessionmaker() as session:
            requested = await queue.request_cancel(session, job_id)
            await session.commit()
            assert requested.status == "running" and requested.cancel_requested_at is not None
            at_request = requested.chunks_added

        async def ended() -> IngestJob | None:
            async with db.sessionmaker() as session:
                job = await session.get(IngestJob, job_id)
                return job if job is not None and job.status in queue.TERMINAL else None

        job = await eventually(ended, within=60)
        assert job.status == "cancelled" and job.error == "cancelled by request"
        # Within one batch: at most the batch under way when the request came (a batch closes once
        # it holds BATCH chunks, so it may hold one file's chunks more).
        assert job.chunks_added - at_request < 2 * BATCH, (at_request, job.chunks_added)
        assert 0 < job.files_new < len(files)
        # What was committed is searchable, and only that: database == FAISS == BM25.
        assert await consistent_ids(settings, embedder, "big") == job.chunks_added
        async with db.sessionmaker() as session:
            docs = list(await session.scalars(select(Document.path).where(Document.last_job_id == job_id)))
            events = list(await session.scalars(select(IngestJobEvent).where(IngestJobEvent.job_id == job_id)))
        indexed = {e.data["path"] for e in events if e.data["status"] == "indexed"}
        assert indexed == set(docs) and len(docs) == job.files_new
        assert {e.data["path"] for e in events if e.data["status"] == "started"} >= indexed

        # A cancelled job is never claimed again; a new job for the folder does the rest.
        job2, _ = await enqueue_path(db.sessionmaker, tmp_path / "many", collection="big")

        async def second() -> IngestJob | None:
            async with db.sessionmaker() as session:
                row = await session.get(IngestJob, job2)
                return row if row is not None and row.status in queue.TERMINAL else None

        done = await eventually(second)
        assert done.status == "succeeded"
        assert done.files_unchanged == job.files_new and done.files_new == len(files) - job.files_new
        await consistent_ids(settings, embedder, "big")
        async with db.sessionmaker() as session:
            assert (await session.get(IngestJob, job_id, populate_existing=True)).status == "cancelled"  # type: ignore[union-attr]
    finally:
        stop.set()
        await worker
        await db.aclose()


async def test_a_queued_job_cancelled_before_any_worker_is_never_run(
    settings: Settings, embedder: Any, tmp_path: Path
) -> None:
    write_files(tmp_path / "few", 2)
    db = await open_database(settings)
    try:
        job_id, _ = await enqueue_path(db.sessionmaker, tmp_path / "few", collection="q")
        async with db.sessionmaker() as session:
            assert (await queue.request_cancel(session, job_id)).status == "cancelled"
            await session.commit()
            with pytest.raises(queue.JobFinished):
                await queue.request_cancel(session, job_id)
        assert await run_worker(settings, once=True, embedder=embedder) == 0
        async with db.sessionmaker() as session:
            job = await session.get(IngestJob, job_id)
            assert job is not None and job.status == "cancelled" and job.attempts == 0
    finally:
        await db.aclose()


async def test_the_worker_keeps_a_watched_folder_ingested(
    database_url: str, make_settings: Any, embedder: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "watched"
    a, b = write_files(folder, 2)
    settings: Settings = make_settings(
        database_url,
        ingest={
            "poll_seconds": 0.2,
            "watch_debounce_seconds": 0.3,
            "watch": [{"path": str(folder), "collection": "watched"}],
        },
    )
    db = await open_database(settings)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop, embedder=embedder))

    async def documents() -> dict[str, str]:
        async with db.sessionmaker() as session:
            rows = await session.execute(
                select(Document.path, Document.sha256)
                .join(Collection, Collection.id == Document.collection_id)
                .where(Collection.name == "watched")
            )
            return {p: s for p, s in rows}

    async def jobs() -> list[IngestJob]:
        async with db.sessionmaker() as session:
            return list(await session.scalars(select(IngestJob).order_by(IngestJob.id)))

    try:
        # Ingested at start-up (changes made while nothing watched are caught up).
        async def initial() -> dict[str, str] | None:
            docs = await documents()
            return docs if set(docs) == {str(a), str(b)} else None

        before = await eventually(initial)
        t0 = time.monotonic()
        # A burst: one file added, one changed, one deleted, one hidden file (ignored).
        new = folder / "new.md"
        new.write_text("# Parking\n\nThe parking permit number is 7741-Q.\n", encoding="utf-8")
        a.write_text("Note 0: the locker code of room 0 is now 2024.\n", encoding="utf-8")
        b.unlink()
        (folder / ".draft.txt").write_text("a hidden draft", encoding="utf-8")

        async def caught_up() -> dict[str, str] | None:
            docs = await documents()
            done = set(docs) == {str(a), str(new)} and docs[str(a)] != before[str(a)]
            return docs if done else None

        await eventually(caught_up, within=90)
        latency = time.monotonic() - t0
        print(f"watched folder: change -> indexed in {latency:.1f} s")  # shown with -s
        all_jobs = await jobs()
        assert all(j.status == "succeeded" for j in all_jobs if j.status in queue.TERMINAL)
        # Debounced: the four changes made one job (two at most if the burst straddled a window).
        assert 2 <= len(all_jobs) <= 3, [(j.id, j.status) for j in all_jobs]
        assert await consistent_ids(settings, embedder, "watched") > 0
    finally:
        stop.set()
        await worker
        await db.aclose()


def test_a_missing_watched_folder_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_INGEST__WATCH": json.dumps([{"path": str(tmp_path / "nope")}]),
    }
    result = subprocess.run([RAG, "worker"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())  # rich wraps long lines
    assert "watched folder" in message and "does not exist (RAG_INGEST__WATCH)" in message
    assert "Traceback" not in result.stderr


def test_rag_ingest_watch_reingests_on_change(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    write_files(folder, 1)
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_INGEST__WATCH_DEBOUNCE_SECONDS": "0.3",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [RAG, "ingest", str(folder), "--collection", "w", "--watch", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["status"] == "succeeded" and first["files"]["new"] == 1
        time.sleep(1.0)  # the watcher starts right after the first summary; give it a moment
        (folder / "added.md").write_text("# Added\n\nThe spare key hangs in cabinet 12.\n", encoding="utf-8")
        second = json.loads(proc.stdout.readline())
        assert second["status"] == "succeeded"
        assert second["files"]["new"] == 1 and second["files"]["unchanged"] == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""


async def test_a_job_abandoned_after_a_cancel_request_is_cancelled_not_retried(settings: Settings) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from core.db.base import utcnow

    db = await open_database(settings)
    try:
        async with db.sessionmaker() as session:
            coll = await queue.get_or_create_collection(session, "c")
            job = await queue.enqueue(session, collection=coll, root_path="/nowhere", prune=True)
            await session.commit()
            job_id = job.id
        async with db.sessionmaker() as session:
            claimed = await queue.claim(session, worker_id="w1", stale_after=60)
            assert claimed is not None and claimed.id == job_id
        async with db.sessionmaker() as session:
            assert (await queue.request_cancel(session, job_id)).status == "running"
            await session.commit()
            # The worker dies before it sees the request: its heartbeat goes stale.
            await session.execute(
                update(IngestJob).values(heartbeat_at=utcnow() - timedelta(seconds=600)).where(IngestJob.id == job_id)
            )
            await session.commit()
        async with db.sessionmaker() as session:
            assert await queue.claim(session, worker_id="w2", stale_after=60) is None
            row = await session.get(IngestJob, job_id)
            assert row is not None and row.status == "cancelled" and row.attempts == 1
    finally:
        await db.aclose()


def test_rag_jobs_cancel(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    write_files(folder, 1)
    env = {**os.environ, "RAG_DATA_DIR": str(tmp_path / "data")}

    def rag(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=120, check=False)

    queued = rag("ingest", str(folder), "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    job_id = json.loads(queued.stdout)["job_id"]
    cancelled = rag("jobs", "cancel", str(job_id), "--local", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "cancelled"
    again = rag("jobs", "cancel", str(job_id), "--local")
    assert again.returncode == 1 and "already ended (cancelled)" in again.stderr and "Traceback" not in again.stderr
    missing = rag("jobs", "cancel", "999", "--local")
    assert missing.returncode == 1 and "not found" in missing.stderr
    listed = rag("jobs", "--local", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["status"] == "cancelled"
