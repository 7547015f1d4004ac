"""Uploads on the chat page, followed live: Debian's Chromium (Playwright) uploads files through the
page to a real uvicorn server, a real ``rag worker`` process ingests them, and the page shows each
file's progress from the websocket's ``watch_job`` events until the job ends.

Skips with the reason when Playwright or Chromium is missing, unless ``CI`` is set (then it fails).
A screenshot goes to ``tests/artifacts/chat-page-upload.png``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from serving.launcher import find_free_port
from tests.e2e.test_chat_page import ARTIFACTS, LiveServer, build_app, chromium  # noqa: F401

# A worker process loads torch and the model before its first job: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

RAG = str(Path(sys.executable).with_name("rag"))


@pytest.fixture
def server(tmp_path: Path, embedder: Any) -> Iterator[str]:
    data = tmp_path / "data"
    url = f"sqlite+aiosqlite:///{data / 'rag.db'}"
    settings = Settings(
        data_dir=data,
        database={"url": url},
        api={"job_events_poll_seconds": 0.2},
        llm={"base_url": f"http://127.0.0.1:{find_free_port('127.0.0.1')}"},  # no answers needed
    )
    env = {**os.environ, "RAG_DATA_DIR": str(data), "RAG_DATABASE__URL": url, "RAG_INGEST__POLL_SECONDS": "0.2"}
    with LiveServer(build_app(settings, embedder)) as live, (tmp_path / "worker.log").open("w") as log:
        assert httpx.post(live.url + "v1/collections", json={"name": "inbox"}).status_code == 201
        worker = subprocess.Popen([RAG, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield live.url
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=180)
            finally:
                worker.kill()


def test_an_upload_shows_each_files_progress_until_the_job_ends(
    chromium: Any,  # noqa: F811
    server: str,
    tmp_path: Path,
) -> None:
    files = tmp_path / "to-upload"
    files.mkdir()
    (files / "boiler.md").write_text("# Boiler\n\nThe boiler is serviced every March by Kessler & Sons.\n")
    (files / "wifi.txt").write_text("The guest wifi password is printed under the router: tulip-42.\n")
    (files / "empty.txt").write_text("")

    page = chromium.new_page()
    try:
        page.goto(server)
        page.wait_for_function("document.querySelector('#collection').value === 'inbox'")
        page.set_input_files("#upload-input", [str(p) for p in sorted(files.iterdir())])
        upload = page.locator(".upload").first
        # The job's id arrives with the 202; then the socket follows the job to its end.
        page.wait_for_selector(".upload[data-job-id]", timeout=30_000)
        page.wait_for_selector('.upload[data-state="succeeded"]', timeout=1_200_000)
        rows = {
            row.locator(".name").inner_text(): (row.get_attribute("data-status"), row.locator(".status").inner_text())
            for row in upload.locator(".upload-files li").all()
        }
        assert rows["boiler.md"][0] == "indexed" and "chunk" in rows["boiler.md"][1]
        assert rows["wifi.txt"][0] == "indexed"
        assert rows["empty.txt"][0] == "failed" and rows["empty.txt"][1].startswith("failed: ")  # with the reason
        stats = upload.locator(".upload-stats").inner_text()
        assert stats.startswith("Indexed: 2 new or changed") and "1 failed" in stats
        assert upload.locator(".upload-cancel").is_hidden()
        # The collection's document count follows.
        page.wait_for_function("!document.querySelector('#collection').selectedOptions[0].text.includes('(0 doc')")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat-page-upload.png"), full_page=True)
    finally:
        page.close()
