"""Live ingestion progress as users meet it: a real uvicorn server, a real ``rag worker`` *process*
(progress crosses processes through the database), the packaged model, SQLite and PostgreSQL.

The SSE stream ``GET /v1/jobs/{id}/events`` and the websocket's ``watch_job`` carry the same
events; a reconnect with ``Last-Event-ID`` resumes; a cancel through the API ends a running job
``cancelled`` and its watchers get the ``job_end``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.sync.client as ws_client

from app.main import create_app
from app.schemas.events import JOB_EVENT_ADAPTER
from core.settings import Settings
from serving.launcher import find_free_port
from tests.integration.test_job_control import write_files
from tests.integration.test_service import LiveServer

# A worker process loads torch and the model before its first job: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

RAG = str(Path(sys.executable).with_name("rag"))


def sse_events(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """``(id, event)`` pairs of an SSE response, each event validated against the documented schema."""
    event_id: str | None = None
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            JOB_EVENT_ADAPTER.validate_python(data)
            yield event_id, data
            event_id = None


@pytest.fixture
def stack(database_url: str, tmp_path: Path, embedder: Any) -> Iterator[dict[str, Any]]:
    """The API (uvicorn, this process) and ``rag worker`` (a child process) on one database."""
    root = tmp_path / "shared"
    root.mkdir()
    settings = Settings(
        data_dir=tmp_path / "data",
        database={"url": database_url},
        ingest={"allowed_roots": [str(root)]},
        api={"job_events_poll_seconds": 0.2},
        llm={"base_url": f"http://127.0.0.1:{find_free_port('127.0.0.1')}"},  # no answers needed
    )
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_DATABASE__URL": database_url,
        "RAG_INGEST__BATCH_CHUNKS": "8",
        "RAG_INGEST__POLL_SECONDS": "0.2",
        "HF_HUB_OFFLINE": "1",
    }
    log = (tmp_path / "worker.log").open("w")
    with LiveServer(create_app(settings, embedder=embedder)) as server, log:
        worker = subprocess.Popen([RAG, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            client = httpx.Client(base_url=server.url, timeout=120)
            assert client.post("/v1/collections", json={"name": "docs"}).status_code == 201
            yield {"client": client, "root": root, "url": server.url, "worker": worker}
        except BaseException:
            print((tmp_path / "worker.log").read_text()[-3000:])  # shown with -s, and on failure
            raise
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=180)
            finally:
                worker.kill()


def test_a_jobs_progress_streams_over_sse_and_websocket(stack: dict[str, Any]) -> None:
    client: httpx.Client = stack["client"]
    folder = stack["root"] / "notes"
    good = write_files(folder, 6)
    (folder / "empty.txt").write_text("", encoding="utf-8")  # fails: no text to index
    job = client.post("/v1/jobs", json={"path": str(folder), "collection": "docs"}).json()

    received: list[tuple[str | None, dict[str, Any]]] = []
    t0 = time.monotonic()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event_id, event in sse_events(response):
            received.append((event_id, event))
            if event["type"] == "job_end":
                break
    print(f"job {job['id']}: {len(received)} events in {time.monotonic() - t0:.1f} s")  # shown with -s

    types = [e["type"] for _, e in received]
    assert types[-1] == "job_end" and types.count("job_end") == 1
    end = received[-1][1]["job"]
    assert end["status"] == "succeeded" and end["files"]["new"] == 6 and end["files"]["failed"] == 1

    files = [(i, e) for i, e in received if e["type"] == "file"]
    by_path: dict[str, list[str]] = {}
    for _, e in files:
        by_path.setdefault(e["path"], []).append(e["status"])
    for path in good:
        assert by_path[str(path)] == ["started", "indexed"], by_path[str(path)]
    assert by_path[str(folder / "empty.txt")][-1] == "failed"
    failed = next(e for _, e in files if e["status"] == "failed")
    assert failed["error"] and failed["chunks"] == 0  # the loader's reason (an empty file)
    assert all(e["chunks"] > 0 for _, e in files if e["status"] == "indexed")
    ids = [int(i) for i, _ in files if i is not None]
    assert len(ids) == len(files) and ids == sorted(ids)  # every file event has a resumable id

    progress = [e for _, e in received if e["type"] == "progress"]
    assert progress, "at least one progress event"
    assert all(p["total"] in (0, 7) for p in progress)
    dones = [p["done"] for p in progress]
    assert dones == sorted(dones)

    # Resuming after the third file event replays only what came after it.
    middle = ids[2]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": str(middle)}) as response:
        replay = list(sse_events(response))
    assert [int(i) for i, e in replay if e["type"] == "file" and i] == ids[3:]
    assert replay[-1][1]["type"] == "job_end"

    # The websocket sends the same events with the request's id.
    ws_url = stack["url"].replace("http://", "ws://") + "/v1/chat"
    with ws_client.connect(ws_url) as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        ws.send(json.dumps({"type": "watch_job", "id": "w1", "job_id": job["id"]}))
        socket_events = []
        while True:
            message = json.loads(ws.recv(timeout=60))
            assert message.pop("id") == "w1"
            socket_events.append(message)
            if message["type"] in ("job_end", "error"):
                break
        assert [e for e in socket_events if e["type"] == "file"] == [e for _, e in files]
        assert socket_events[-1]["job"]["id"] == job["id"]
        ws.send(json.dumps({"type": "watch_job", "id": "w2", "job_id": 999999}))
        missing = json.loads(ws.recv(timeout=30))
        assert missing["id"] == "w2" and missing["type"] == "error" and missing["code"] == "not_found"

    assert client.get("/v1/jobs/999999/events").status_code == 404


def test_cancel_through_the_api_ends_a_running_job_for_its_watchers(stack: dict[str, Any]) -> None:
    client: httpx.Client = stack["client"]
    folder = stack["root"] / "big"
    files = write_files(folder, 30)
    job = client.post("/v1/jobs", json={"path": str(folder), "collection": "docs"}).json()
    ws_url = stack["url"].replace("http://", "ws://") + "/v1/chat"
    with ws_client.connect(ws_url) as ws:
        assert json.loads(ws.recv())["type"] == "ready"
        ws.send(json.dumps({"type": "watch_job", "id": "big", "job_id": job["id"]}))
        cancelled = None
        events = []
        while True:
            message = json.loads(ws.recv(timeout=180))
            events.append(message)
            if cancelled is None and message["type"] == "file" and message["status"] == "indexed":
                cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
                assert cancelled.status_code == 200, cancelled.text
                assert cancelled.json()["status"] == "running" and cancelled.json()["cancel_requested"] is True
            if message["type"] in ("job_end", "error"):
                break
    end = events[-1]
    assert end["type"] == "job_end", end
    assert end["job"]["status"] == "cancelled" and 0 < end["job"]["files"]["new"] < len(files)
    assert any(e["type"] == "progress" and e["cancel_requested"] for e in events)
    indexed = [e for e in events if e["type"] == "file" and e["status"] == "indexed"]
    assert len(indexed) == end["job"]["files"]["new"]
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    # What was committed is searchable.
    hits = client.post("/v1/search", json={"query": "locker code of room 0", "k": 3}).json()
    assert hits["hits"], hits
