"""The MCP server as desktop and remote clients meet it, through the SDK's own client:

* stdio: ``rag mcp`` spawned as a subprocess (its own database connection, embedder and index);
* streamable HTTP: ``/mcp`` of the API under a real uvicorn server, with API keys.

Both on really ingested documents (packaged embedding model, SQLite) and, for ``ask``, the real
model server (fixture ``llm_server``; with ``RAG_TEST_LLM_BASE_URL`` it reuses a running one, and
under ``CI`` it must run).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from app.main import create_app
from app.schemas.events import ANSWER_EVENT_ADAPTER
from app.services import keys
from core.settings import Settings
from ingest.worker import build_ingest_context, enqueue_path, run_job
from tests.corpus_factory import Corpus, write_corpus
from tests.integration.test_service import SECRET, LiveServer
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAG = str(Path(sys.executable).with_name("rag"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("mcp") / "corpus")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, embedder: Any, llm_server: LLMServerInfo
) -> dict[str, Any]:
    """``manuals`` (the corpus) and ``vault`` (a secret) ingested; keys ``a`` (manuals), ``b`` (vault)."""
    data = tmp_path_factory.mktemp("mcp-data")
    vault = tmp_path_factory.mktemp("mcp-vault")
    (vault / "vault.txt").write_text(SECRET)
    settings = Settings(
        data_dir=data,
        database={"url": f"sqlite+aiosqlite:///{data / 'rag.db'}"},
        auth={"enabled": True},
        llm={"base_url": llm_server.base_url, "model": llm_server.model, "max_tokens": 24},
    )

    async def prepare() -> dict[str, str]:
        ctx = await build_ingest_context(settings, embedder=embedder)
        try:
            for folder, name in ((corpus.root, "manuals"), (vault, "vault")):
                job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=name)
                summary = await run_job(ctx, job_id)
                assert summary is not None and summary.status == "succeeded"
            tokens = {}
            async with ctx.sessionmaker() as session:
                for who, scope in (("a", ["manuals"]), ("b", ["vault"])):
                    tokens[who] = (await keys.create_key(session, name=who, collections=scope)).token
                await session.commit()
            return tokens
        finally:
            await ctx.aclose()

    return {"settings": settings, "tokens": asyncio.run(prepare())}


@pytest.fixture(scope="module")
def service(stack: dict[str, Any], embedder: Any) -> Iterator[LiveServer]:
    with LiveServer(create_app(stack["settings"], embedder=embedder)) as server:
        yield server


def stdio_params(stack: dict[str, Any], token: str) -> StdioServerParameters:
    settings: Settings = stack["settings"]
    env = {
        **os.environ,
        "RAG_DATA_DIR": str(settings.data_dir),
        "RAG_DATABASE__URL": str(settings.database.url),
        "RAG_LLM__BASE_URL": settings.llm.base_url,
        "RAG_LLM__MODEL": settings.llm.model,
        "RAG_LLM__MAX_TOKENS": "24",
        "RAG_AUTH__ENABLED": "true",
        "RAG_CLI__API_KEY": token,
        "HF_HUB_OFFLINE": "1",
    }
    return StdioServerParameters(command=RAG, args=["mcp"], env=env)


def http_client(service: LiveServer, token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(300))
    return Client(streamable_http_client(f"{service.url}/mcp", http_client=http))


async def exercise(client: Client, *, mine: str, theirs: str, question: str) -> dict[str, Any]:
    """What every transport must do: list, search its own, refuse another's, ask with progress."""
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == {"search", "ask", "list_collections", "get_document_chunk"}
    listed = await client.call_tool("list_collections", {})
    assert [c["name"] for c in listed.structured_content["collections"]] == [mine]

    found = await client.call_tool("search", {"query": question, "k": 3})
    hits = found.structured_content["hits"]
    assert hits and {h["collection"] for h in hits} == {mine}
    chunk = await client.call_tool("get_document_chunk", {"chunk_id": hits[0]["chunk_id"]})
    assert chunk.structured_content["text"] == hits[0]["text"]

    refused = await client.call_tool("search", {"query": question, "collections": [theirs]})
    assert refused.is_error and "not_found" in refused.content[0].text

    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    answered = await client.call_tool("ask", {"question": question}, progress_callback=on_progress)
    assert not answered.is_error, answered.content
    events = [ANSWER_EVENT_ADAPTER.validate_python(json.loads(m)) for m in progress]
    assert events[0].type == "retrieval" and events[-1].type == "done"
    streamed = "".join(e.text for e in events if e.type == "token")
    assert streamed == answered.structured_content["answer"] and streamed.strip()
    return {"tokens": sum(1 for e in events if e.type == "token")}


@pytest.mark.llm
async def test_rag_mcp_over_stdio_with_a_scoped_key(stack: dict[str, Any]) -> None:
    async with Client(stdio_params(stack, stack["tokens"]["a"])) as client:
        await exercise(client, mine="manuals", theirs="vault", question="Which port does quokka use?")


@pytest.mark.llm
async def test_mcp_over_http_in_the_api_with_key_scoping(service: LiveServer, stack: dict[str, Any]) -> None:
    async with http_client(service, stack["tokens"]["a"]) as client:
        await exercise(client, mine="manuals", theirs="vault", question="Which port does quokka use?")
    async with http_client(service, stack["tokens"]["b"]) as client:
        found = await client.call_tool("search", {"query": "vault combination"})
        assert {h["collection"] for h in found.structured_content["hits"]} == {"vault"}
        refused = await client.call_tool("search", {"query": "quokka", "collections": ["manuals"]})
        assert refused.is_error


def test_mcp_over_http_refuses_a_missing_or_unknown_key(service: LiveServer) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream"}
    for auth in ({}, {"Authorization": "Bearer rag_not_a_key"}):
        r = httpx.post(f"{service.url}/mcp", json=body, headers={**headers, **auth}, timeout=30)
        assert r.status_code == 401, r.text
