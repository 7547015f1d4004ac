"""``rag run`` (what ``make run`` starts), the real launcher in a real process: its log names every step
with its elapsed time, and the ready line comes only once ``/readyz`` answers ok.

The model server is a stub OpenAI-compatible ``/v1/models`` on a loopback port, already listening
(the case of a model server started by something else): the launcher must adopt it and say which
model it serves, or refuse it when it serves another model. The worker and the API are the real
``rag worker`` and ``rag serve`` (the packaged embedding model, SQLite in a temporary data dir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from serving.launcher import find_free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAG = str(Path(sys.executable).with_name("rag"))


def stub_model_server(model: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({"object": "list", "data": [{"id": model, "max_model_len": 2048}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stack_env(tmp_path: Path, llm_port: int, api_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env |= {
        "RAG_DATA_DIR": str(tmp_path / "data"),
        "RAG_LLM__BASE_URL": f"http://127.0.0.1:{llm_port}",
        "RAG_LLM__MODEL": "smollm2-135m-instruct",
        "RAG_SERVER__PORT": str(api_port),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        "PYTHONUNBUFFERED": "1",
    }
    return env


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as resp:
            return resp.status, json.load(resp)
    except OSError as e:
        return 0, {"error": str(e)}


@pytest.fixture
def model_server() -> Iterator[ThreadingHTTPServer]:
    server = stub_model_server("smollm2-135m-instruct")
    yield server
    server.shutdown()


def test_the_log_names_every_step_and_says_ready_only_after_readyz(
    tmp_path: Path, model_server: ThreadingHTTPServer
) -> None:
    api_port = find_free_port()
    env = stack_env(tmp_path, model_server.server_address[1], api_port)
    proc = subprocess.Popen(
        [RAG, "run"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    at_ready: tuple[int, dict[str, Any]] | None = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("ready: "):
                at_ready = readyz(api_port)  # the moment the line appears, /readyz must already be ok
            if line.startswith("logs: ") or time.monotonic() > deadline:
                break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = "\n".join(lines)
    (REPO / "tests" / "artifacts").mkdir(parents=True, exist_ok=True)
    (REPO / "tests" / "artifacts" / "rag-run.log").write_text(log + "\n", encoding="utf-8")
    assert at_ready is not None, log
    assert at_ready[0] == 200 and at_ready[1]["status"] == "ready", at_ready

    def index(prefix: str) -> int:
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert found, f"no line starting with {prefix!r} in:\n{log}"
        return found[0]

    order = [
        index("database migrations: started"),
        index("database migrations: done in "),
        index("model server: already running at http://127.0.0.1:"),
        index("ingestion worker: started (usually"),
        index("ingestion worker: done in "),
        index("API: started (usually"),
        index("API: done in "),
        index("all started in "),
        index("ready: http://127.0.0.1:"),
        index("try this"),
    ]
    assert order == sorted(order), log
    assert "serving smollm2-135m-instruct" in lines[order[2]]
    assert lines[order[2] + 1].startswith("model server: started outside rag run (")
    assert any("open the chat page" in x for x in lines) and any(" ingest " in x for x in lines)
    assert any(" ask " in x for x in lines)
    assert rc == 0, log


def test_a_model_server_serving_another_model_is_refused(tmp_path: Path) -> None:
    other = stub_model_server("some-other-model")
    try:
        env = stack_env(tmp_path, other.server_address[1], find_free_port())
        proc = subprocess.run([RAG, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        other.shutdown()
    assert proc.returncode == 1
    assert "serves some-other-model, not the configured 'smollm2-135m-instruct'" in proc.stderr, proc.stderr
    assert "ready:" not in proc.stdout
