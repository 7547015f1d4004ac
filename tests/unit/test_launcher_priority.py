"""The model server this project starts runs at a lower priority than the API (``llm.server_nice``)."""

from __future__ import annotations

import os
import sys

import pytest

from core.settings import Settings
from serving.launcher import ManagedServer, find_free_port

pytestmark = pytest.mark.unit

# A stand-in OpenAI-compatible server: lists one model, which is all readiness needs.
FAKE_SERVER = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": "m"}]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def server_niceness(nice: int) -> int:
    port = find_free_port()
    command = [sys.executable, "-c", FAKE_SERVER, str(port)]
    with ManagedServer(command, host="127.0.0.1", port=port, expected_model="m", nice=nice) as server:
        assert server.pid is not None
        return os.getpriority(os.PRIO_PROCESS, server.pid)


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="Unix scheduling priorities")
def test_the_model_server_runs_niced_by_the_given_amount() -> None:
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert server_niceness(7) == min(19, own + 7)
    assert server_niceness(0) == own


def test_the_default_gives_the_api_priority_over_generation() -> None:
    assert Settings().llm.server_nice > 0
