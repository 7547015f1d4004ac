"""A 200 MiB chunked body sent to a real uvicorn server is refused at the limit, not buffered.

Before the streaming limit the API read such a body whole (+396 MiB RSS) before answering 422.
The server runs in this process (``LiveServer``), so the process's RSS is the server's.
"""

from __future__ import annotations

import socket
from typing import Any

import psutil
import pytest

from app.main import create_app
from tests.integration.test_service import LiveServer
from tests.unit.fakes_llm import FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = [pytest.mark.integration]

MIB = 1 << 20


def _send_chunked(port: int, path: str, total: int) -> bytes:
    """POST ``total`` bytes as chunked JSON on a raw socket; returns whatever the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        block = b"a" * MIB
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        sent = 0
        try:
            sock.sendall(b'b\r\n{"query": "\r\n')
            while sent < total:
                sock.sendall(frame)
                sent += len(block)
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed while we were still sending: expected
        chunks = []
        try:
            while data := sock.recv(65536):
                chunks.append(data)
        except OSError:
            pass
        return b"".join(chunks)


def test_a_200_mib_chunked_body_is_refused_without_growing_the_process(make_settings: Any) -> None:
    app = create_app(make_settings(), embedder=HashEmbedder(), llm=FakeLLM())
    process = psutil.Process()
    with LiveServer(app) as server:
        _send_chunked(server.port, "/v1/search", 4 * MIB)  # warm up the request path
        before = process.memory_info().rss
        answer = _send_chunked(server.port, "/v1/search", 200 * MIB)
        grown = process.memory_info().rss - before
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    assert grown < 32 * MIB, f"the process grew by {grown / MIB:.1f} MiB"
