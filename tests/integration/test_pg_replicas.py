"""Two API processes and a worker against one PostgreSQL, ``RAG_RETRIEVAL__BACKEND=postgres``.

Real ``rag serve`` and ``rag worker`` processes, each with its own data directory (nothing on disk
is shared: the index is in the database). While the worker ingests, both replicas answer the same
search identically whenever the index did not change between their answers; one replica is then
killed with SIGKILL and nothing is lost: the other keeps answering, the job finishes, and a
restarted replica answers like the survivor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

RAG = str(Path(sys.executable).with_name("rag"))
QUERY = "How is the widget calibrated and which torque setting does team 3 use?"


def write_folder(root: Path, files: int, offset: int = 0) -> None:
    root.mkdir(parents=True)
    for i in range(offset, offset + files):
        paragraphs = [
            f"Document {i}, section {j}: the widget number {i * 100 + j} is calibrated with "
            f"torque setting {j * 7 % 13} and inspected by team {i % 5}. " * 4
            for j in range(6)
        ]
        (root / f"doc{i:03d}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(base: dict[str, str], data: Path) -> dict[str, str]:
    return {**base, "RAG_DATA_DIR": str(data)}


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [RAG, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
    )


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"API on {port} did not start:\n{log.read_text(errors='replace')[-3000:]}")


def search(port: int) -> list[tuple[int, float]]:
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/search", json={"query": QUERY, "k": 10, "collections": ["docs"]}, timeout=30
    )
    if r.status_code == 404:  # the collection has no indexed chunk yet
        return []
    assert r.status_code == 200, r.text
    return [(h["chunk_id"], round(h["score"], 9)) for h in r.json()["hits"]]


def job_statuses(url: str) -> list[str]:
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    async def read() -> list[str]:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            return [r[0] for r in await conn.fetch("SELECT status FROM ingest_jobs ORDER BY id")]
        finally:
            await conn.close()

    return asyncio.run(read())


def rag(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAG, *args], env=env, capture_output=True, text=True, timeout=900, check=False)


def test_two_replicas_answer_alike_while_a_worker_ingests_and_a_kill_loses_nothing(
    pg_database_url: str, tmp_path: Path
) -> None:
    base: dict[str, Any] = {
        **os.environ,
        "RAG_DATABASE__URL": pg_database_url,
        "RAG_RETRIEVAL__BACKEND": "postgres",
        "RAG_AUTH__ENABLED": "false",
        "RAG_LLM__MANAGE": "false",
        "RAG_EMBEDDING__BATCH_SIZE": "16",  # many small commits: searches interleave with them
        "HF_HUB_OFFLINE": "1",
    }
    first, second = tmp_path / "first", tmp_path / "second"
    write_folder(first, 6)
    write_folder(second, 24, offset=6)
    # The schema and a first collection, through the CLI (its own data dir too).
    seeded = rag(env_for(base, tmp_path / "cli"), "ingest", str(first), "-c", "docs")
    assert seeded.returncode == 0, seeded.stderr

    ports = [free_port(), free_port()]
    logs = [tmp_path / "api0.log", tmp_path / "api1.log"]
    apis = [start_api(env_for(base, tmp_path / f"api{i}"), ports[i], logs[i]) for i in range(2)]
    worker: subprocess.Popen[bytes] | None = None
    try:
        for port, proc, log in zip(ports, apis, logs, strict=True):
            wait_healthy(port, proc, log)
        before = search(ports[0])
        assert before and before == search(ports[1])

        queued = rag(env_for(base, tmp_path / "cli"), "ingest", str(second), "-c", "docs", "--no-wait")
        assert queued.returncode == 0, queued.stderr
        worker_log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [RAG, "worker"], env=env_for(base, tmp_path / "worker"), stdout=worker_log, stderr=subprocess.STDOUT
        )
        compared = changed = 0
        seen = {tuple(before)}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and compared < 15:
            a1, b, a2 = search(ports[0]), search(ports[1]), search(ports[0])
            seen.add(tuple(a1))
            if a1 == a2:  # no commit landed between the three answers: B must agree
                assert b == a1
                compared += 1
            else:
                changed += 1
        assert compared >= 15

        # Kill one replica mid-ingest; the other keeps answering, the job finishes.
        apis[0].send_signal(signal.SIGKILL)
        apis[0].wait(timeout=30)
        assert search(ports[1])
        deadline = time.monotonic() + 900
        while (statuses := job_statuses(pg_database_url)) and {"running", "queued"} & set(statuses):
            assert time.monotonic() < deadline, statuses
            assert worker.poll() is None
            assert search(ports[1])
            time.sleep(2)
        assert statuses == ["succeeded", "succeeded"], statuses

        # A replica started afresh (new data dir) answers exactly like the survivor.
        ports[0] = free_port()
        apis[0] = start_api(env_for(base, tmp_path / "api2"), ports[0], logs[0])
        wait_healthy(ports[0], apis[0], logs[0])
        after = search(ports[1])
        assert after == search(ports[0])
        assert len(seen) > 1 or after != before, "the ingestion never changed the results"
    finally:
        for proc in [*apis, *([worker] if worker is not None else [])]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
