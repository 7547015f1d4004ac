"""Faults from outside the process, through real components (issue 17).

* PostgreSQL backends of the API terminated again and again while clients search, list and ask:
  every response is a success or a 503 with ``Retry-After`` (``database_unavailable``), never a 500.
* The data directory's disk fills up during an upload: 503 ``storage_full`` with ``Retry-After``,
  no half-written file left behind, and uploads work again once there is room (a real tmpfs of a
  few MiB mounted by the test; needs root, as on the CI machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from starlette.testclient import TestClient

from app.main import create_app
from tests.unit.api_support import CORPUS, default_responder
from tests.unit.fakes_llm import FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = [pytest.mark.integration]


def _seed(client: TestClient) -> None:
    client.post("/v1/collections", json={"name": "docs"})
    files = [("files", (name, text.encode(), "text/markdown")) for name, text in CORPUS.items()]
    assert client.post("/v1/collections/docs/documents", files=files).status_code == 202


@pytest.mark.postgres
def test_terminated_database_backends_never_give_500(
    pg_database_url: str, pg_admin_url: str, make_settings: Any
) -> None:
    settings = make_settings(pg_database_url)
    database = pg_database_url.rsplit("/", 1)[1]
    stop = threading.Event()
    terminated = 0

    def killer() -> None:
        nonlocal terminated

        async def loop() -> None:
            nonlocal terminated
            conn = await asyncpg.connect(pg_admin_url)
            try:
                while not stop.is_set():
                    rows = await conn.fetch(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = $1 AND pid <> pg_backend_pid()",
                        database,
                    )
                    terminated += sum(1 for r in rows if r[0])
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()

        asyncio.run(loop())

    statuses: dict[int, int] = {}
    with TestClient(
        create_app(settings, embedder=HashEmbedder(), llm=FakeLLM(responder=default_responder)),
        raise_server_exceptions=False,
    ) as c:
        _seed(c)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                for r in (
                    c.post("/v1/search", json={"query": "join paths"}),
                    c.get("/v1/collections"),
                    c.get("/v1/collections/docs/documents"),
                    c.post("/v1/ask", json={"question": "join paths?", "max_tokens": 8}),
                ):
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code in (200, 503), r.text
                    if r.status_code == 503:
                        assert r.json()["error"]["code"] == "database_unavailable", r.text
                        assert "retry-after" in r.headers
        finally:
            stop.set()
            thread.join(timeout=30)
        assert terminated > 0, "the test never terminated a backend"
        # Once the database stops misbehaving, everything works again.
        assert c.get("/v1/collections").status_code == 200
    assert statuses.get(200, 0) > 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 3 MiB tmpfs (real ENOSPC), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        if os.environ.get("CI"):
            pytest.fail("mounting a tmpfs needs root (CI runs as root)")
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {done.stderr.decode()}")
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode()}")
    yield mount
    with contextlib.suppress(Exception):
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_an_upload_is_503_and_recovers(small_disk: Path, tmp_path: Path, make_settings: Any) -> None:
    # The database lives elsewhere: only the data dir (uploads, index) is on the small disk.
    settings = make_settings(
        f"sqlite+aiosqlite:///{tmp_path / 'rag.db'}", data_dir=small_disk / "data", api={"max_upload_mb": 16}
    )
    with TestClient(
        create_app(settings, embedder=HashEmbedder(), llm=FakeLLM(responder=default_responder)),
        raise_server_exceptions=False,
    ) as c:
        c.post("/v1/collections", json={"name": "up"})
        big = os.urandom(5 * 1024 * 1024)  # more than the disk holds
        r = c.post("/v1/collections/up/documents", files=[("files", ("big.txt", big, "text/plain"))])
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "storage_full" and "retry-after" in r.headers
        uploads = settings.uploads_dir / "up"
        assert not uploads.exists() or not any(uploads.iterdir()), "a half-written file was left behind"
        ok = c.post("/v1/collections/up/documents", files=[("files", ("a.md", b"# A\nsmall", "text/markdown"))])
        assert ok.status_code == 202, ok.text
