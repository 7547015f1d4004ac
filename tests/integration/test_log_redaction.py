"""No credential reaches a log line (issue 17: a websocket's ``?api_key=rag_…`` was in uvicorn's log)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
import websockets

from app.main import create_app
from app.observability import configure_logging
from serving.launcher import find_free_port
from tests.unit.fakes_llm import FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = [pytest.mark.integration]


def test_tokens_in_query_strings_and_headers_are_redacted(
    make_settings: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    token = "rag_" + secrets.token_urlsafe(24)
    settings = make_settings(auth={"enabled": True})
    configure_logging("info")  # what `rag serve` does: JSON lines on stderr, uvicorn's loggers included
    port = find_free_port("127.0.0.1")
    config = uvicorn.Config(
        create_app(settings, embedder=HashEmbedder(), llm=FakeLLM()),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="info",
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        async def visit() -> None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/chat?api_key={token}") as ws:
                await ws.recv()  # the refusal (unknown key) — the handshake itself was logged
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/v1/collections?api_key={token}")
                await client.get(
                    f"http://127.0.0.1:{port}/v1/collections", headers={"Authorization": f"Bearer {token}"}
                )

        asyncio.run(visit())
        logging.getLogger("app.test").warning("client sent Authorization: Bearer %s", token)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        logging.getLogger().handlers.clear()
    logs = capfd.readouterr().err
    assert "/v1/chat" in logs and "[REDACTED]" in logs  # the lines are there ...
    assert token not in logs and token[4:] not in logs  # ... without the secret
