"""Progress reporting off a terminal, tables that never cut what identifies a row, the CLI's API client."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rich.console import Console

from app.cli.common import short_path
from app.cli.ingest import jobs_errors, jobs_table
from app.cli.remote import ApiClient, ApiError, connect
from app.cli.search import hits_table
from core.progress import Progress, format_duration
from core.settings import Settings

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_at_every_interval_even_while_nothing_moves() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress("ingest", unit="files", rates=("chunks",), stream=out, interval=10, ticker=False, clock=clock) as p:
        p.update(0, total=400, current="loading the embedding model")
        clock.now += 9
        p.tick()  # not yet: 9 s since the first line
        clock.now += 1
        p.tick()
        p.update(100, current="manual.pdf", chunks=2000)
        clock.now += 10
        p.tick()
        clock.now += 10  # one slow file: no update, still a line
        p.tick()
        p.update(400, chunks=6000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "ingest: started"
    assert lines[1] == "ingest: 0/400 files (0%) · 0.0 chunks/s · elapsed 10s · loading the embedding model"
    assert (
        lines[2] == "ingest: 100/400 files (25%) · 100.0 chunks/s · 5.0 files/s · elapsed 20s · ETA 1m00s · manual.pdf"
    )
    assert lines[3].startswith("ingest: 100/400 files (25%) · 66.7 chunks/s") and "ETA 1m30s" in lines[3]
    assert lines[4] == "ingest: 400/400 files · 8000 chunks · 266.7 chunks/s · 13.3 files/s · done in 30s"
    assert len(lines) == 5


def test_the_ticker_thread_writes_without_updates() -> None:
    out = io.StringIO()
    with Progress("llm prepare", unit=None, usually="3-5 min", stream=out, interval=0.05, tty=False) as p:
        p.update(current="quantizing")
        time.sleep(0.4)
    lines = out.getvalue().splitlines()
    assert lines[0] == "llm prepare: started (usually 3-5 min)"
    assert len(lines) >= 4 and all(line.endswith("quantizing") for line in lines[1:-1])
    assert lines[-1].startswith("llm prepare: done in ")


def test_a_failed_step_says_stopped_and_a_broken_stream_is_ignored() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), Progress("eval", unit="questions", stream=out, tty=False, ticker=False):
        raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("eval: 0 questions · stopped in")
    closed = io.StringIO()
    closed.close()
    with Progress("x", stream=closed, tty=False, ticker=False) as p:
        p.update(1)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3720)] == ["0s", "45s", "1m00s", "3m05s", "1h02m"]


# ------------------------------------------------------------------------------------------ tables


def render(table: Any, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(table)
    return console.export_text()


def cells(text: str, column: int) -> list[str]:
    """Each row's cell in ``column`` of a rendered table, its wrapped lines joined."""
    rows: list[str] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        parts = line.split("│")
        if parts[1].strip():  # the id column starts a new row
            rows.append("")
        rows[-1] += parts[column].strip()
    return rows


def test_short_path_keeps_the_file_name_whole() -> None:
    assert short_path("/a/b/c.md", 48) == "/a/b/c.md"
    assert short_path("/very/long/folder/name/with/a/report.pdf", 20) == "…e/with/a/report.pdf"
    long_name = "an-unusually-long-file-name-that-is-wider-than-the-budget.pdf"
    assert short_path(f"/x/{long_name}", 20) == f"…{long_name}"


@pytest.mark.parametrize("width", [72, 80, 120])
def test_jobs_table_never_cuts_status_collection_or_the_root_name(width: int) -> None:
    rows = [
        {
            "id": 123,
            "collection": "engineering-handbook",
            "status": status,
            "progress": 1.0,
            "files": {"new": 1200, "changed": 3, "unchanged": 10000, "deleted": 0, "failed": 12},
            "root_path": "/srv/shared/documents/engineering/2024/quarterly-handbook-final",
            "error": "the worker lost its heartbeat twice and gave up on the job after three attempts",
        }
        for status in ("succeeded", "failed", "running", "queued")
    ]
    text = render(jobs_table(rows, width=width), width)
    # Only the root path is shortened (from the left, its last part whole); nothing else is cut.
    assert text.count("…") == len(re.findall(r"…[^│ ]*quarterly-handbook-final", text))
    for status in ("succeeded", "failed", "running", "queued"):
        assert f" {status} " in text
    assert "quarterly-handbook-final" in text and max(len(line) for line in text.splitlines()) <= width
    # The collection and the counts may wrap, never lose characters.
    assert cells(text, 2) == ["engineering-handbook"] * 4
    assert cells(text, 5) == ["1200/3/10000/0/12"] * 4
    assert jobs_errors(rows)[0] == f"job 123: {rows[0]['error']}"


@pytest.mark.parametrize("width", [70, 80, 160])
def test_search_table_never_cuts_the_file_name(width: int) -> None:
    hit = {
        "rank": 1,
        "score": 5.5882,
        "dense": {"rank": 1, "score": 0.8},
        "sparse": None,
        "collection": "manuals",
        "path": "/work/shared/corpus/md/some/deep/folder/path-joining-guide.md",
        "page": 12,
        "text": "The path.join() method joins all given path segments together " * 4,
    }
    result = {"query": "join paths", "options": {"mode": "hybrid", "fusion": "weighted"}, "hits": [hit]}
    text = render(hits_table(result, width=width), width)
    assert "path-joining-guide.md" in text and "manuals:" in text
    assert max(len(line) for line in text.splitlines()) <= width


# ------------------------------------------------------------------------------------------ the API client


class FakeApi(BaseHTTPRequestHandler):
    """Answers like the service: /healthz, /v1/search, /v1/jobs, an SSE /v1/ask/stream, 401 without a key."""

    key: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.key and self.headers.get("Authorization") != f"Bearer {self.key}":
            self._send(401, {"error": {"code": "unauthorized", "message": "missing API key"}})
            return False
        return True

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path.startswith("/v1/jobs") and self._authorized():
            self._send(200, {"jobs": [{"id": 1, "path": self.path}], "page": {}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if not self._authorized():
            return
        if self.path == "/v1/search":
            self._send(200, {"query": body["query"], "echo": body})
        elif self.path == "/v1/ask/stream":
            events = [
                {"type": "token", "text": "Use "},
                {"type": "token", "text": "join."},
                {"type": "done", "answer": "x"},
            ]
            sse = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
            self._send(200, sse, "text/event-stream")


@pytest.fixture
def fake_api() -> Iterator[tuple[ThreadingHTTPServer, Settings]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings = Settings(_env_file=None, server={"port": server.server_address[1]})  # type: ignore[call-arg]
    try:
        yield server, settings
    finally:
        server.shutdown()
        FakeApi.key = None


def test_connect_finds_a_running_api_and_the_client_speaks_its_routes(
    fake_api: tuple[ThreadingHTTPServer, Settings],
) -> None:
    _server, settings = fake_api
    client = connect(settings)
    assert client is not None and client.base_url == settings.api_url
    with client:
        assert client.search({"query": "q", "collections": ["a"]})["echo"]["collections"] == ["a"]
        assert client.jobs(5) == [{"id": 1, "path": "/v1/jobs?limit=5"}]
        events = list(client.ask_stream({"question": "q"}))
    assert [e["type"] for e in events] == ["token", "token", "done"]


def test_connect_is_none_when_nothing_listens() -> None:
    from serving.launcher import find_free_port

    settings = Settings(_env_file=None, server={"port": find_free_port()})  # type: ignore[call-arg]
    started = time.perf_counter()
    assert connect(settings) is None
    assert time.perf_counter() - started < 0.5


def test_the_api_key_is_sent_and_a_refusal_is_an_api_error(fake_api: tuple[ThreadingHTTPServer, Settings]) -> None:
    _server, settings = fake_api
    FakeApi.key = "rag_secret"
    with pytest.raises(ApiError) as refused:
        ApiClient(settings.api_url).jobs(1)
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    assert ApiClient(settings.api_url, api_key="rag_secret").jobs(1)[0]["id"] == 1


def test_api_url_comes_from_the_server_settings() -> None:
    assert Settings(_env_file=None).api_url == "http://127.0.0.1:8000"  # type: ignore[call-arg]
    wildcard = Settings(_env_file=None, server={"host": "0.0.0.0", "port": 9}, auth={"enabled": True})  # type: ignore[call-arg]
    assert wildcard.api_url == "http://127.0.0.1:9"
    assert Settings(_env_file=None, server={"host": "::1"}).api_url == "http://[::1]:8000"  # type: ignore[call-arg]
