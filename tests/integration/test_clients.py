"""The client matrix of docs/api.md: real client libraries against a running server (uvicorn, the
packaged embedding model, an ingested corpus, the real model server), streaming and not.

Each test is one row of the matrix; what a client keeps of the citations is asserted, so a
client that starts (or stops) keeping them shows up here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets

from app.main import create_app
from app.services import keys
from core.settings import Settings
from ingest.worker import build_ingest_context, enqueue_path, run_job
from tests.corpus_factory import Corpus, write_corpus
from tests.integration.test_service import LiveServer
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.llm]

QUESTION = "Which port does quokka use?"
MODEL = "rag:manuals"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return write_corpus(tmp_path_factory.mktemp("clients") / "corpus")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, embedder: Any, llm_server: LLMServerInfo
) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("clients-data")
    settings = Settings(
        data_dir=data,
        database={"url": f"sqlite+aiosqlite:///{data / 'rag.db'}"},
        auth={"enabled": True},
        llm={"base_url": llm_server.base_url, "model": llm_server.model, "max_tokens": 32},
    )

    async def prepare() -> str:
        ctx = await build_ingest_context(settings, embedder=embedder)
        try:
            job_id, _ = await enqueue_path(ctx.sessionmaker, corpus.root, collection="manuals")
            summary = await run_job(ctx, job_id)
            assert summary is not None and summary.status == "succeeded"
            async with ctx.sessionmaker() as session:
                token = (await keys.create_key(session, name="a", collections=["manuals"])).token
                await session.commit()
            return token
        finally:
            await ctx.aclose()

    token = asyncio.run(prepare())
    with LiveServer(create_app(settings, embedder=embedder)) as live:
        yield {"url": live.url, "token": token}


def test_openai_client(server: dict[str, Any]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server['url']}/v1", api_key=server["token"], max_retries=0, timeout=300)
    messages: Any = [{"role": "user", "content": QUESTION}]
    completion = client.chat.completions.create(model=MODEL, messages=messages)
    message = completion.choices[0].message
    assert (message.content or "").strip() and completion.choices[0].finish_reason in ("stop", "length")
    assert isinstance((completion.model_extra or {}).get("citations"), list)
    for a in message.annotations or []:  # typed by the client: the server sends OpenAI's shape
        assert a.url_citation.url.startswith("rag://manuals/documents/")

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].finish_reason in ("stop", "length")
    assert "annotations" in (last.choices[0].delta.model_extra or {})


def test_langchain_chat_openai(server: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server['url']}/v1", api_key=server["token"], model=MODEL, max_retries=0, timeout=300)
    message = llm.invoke(QUESTION)
    assert isinstance(message.content, str) and message.content.strip()
    assert message.response_metadata["finish_reason"] in ("stop", "length")

    async def stream() -> list[Any]:
        return [chunk async for chunk in llm.astream(QUESTION)]

    chunks = asyncio.run(stream())
    assert sum(1 for c in chunks if c.content) >= 3
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert str(merged.content).strip()
    # A standard finish reason: LangChain passes it through to response_metadata.
    assert merged.response_metadata["finish_reason"] in ("stop", "length")


def test_llamaindex_openai_like(server: dict[str, Any]) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        model=MODEL,
        api_base=f"{server['url']}/v1",
        api_key=server["token"],
        is_chat_model=True,
        context_window=2048,
        max_retries=0,
        timeout=300,
    )
    response = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert (response.message.content or "").strip()
    raw = response.raw  # the openai ChatCompletion: annotations and citations are there
    assert raw is not None and isinstance(raw.model_extra.get("citations"), list)

    streamed = list(llm.stream_chat([ChatMessage(role="user", content=QUESTION)]))
    assert sum(1 for r in streamed if r.delta) >= 3
    assert (streamed[-1].message.content or "").strip()


def test_websocket_client_following_the_protocol_document(server: dict[str, Any]) -> None:
    """docs/websocket.md step by step: auth as the first message, ready, ping/pong, an ask with the
    documented fields, its events tagged with the id, one terminal event; then a cancel."""
    url = server["url"].replace("http://", "ws://") + "/v1/chat"

    seen: list[Any] = []

    async def recv(ws: Any) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 120))
        seen.append(event)
        return event

    async def talk() -> dict[str, Any]:
        async with websockets.connect(url, open_timeout=30, close_timeout=5) as ws:
            await ws.send(json.dumps({"type": "auth", "api_key": server["token"]}))
            ready = await recv(ws)
            assert ready == {"type": "ready", "principal": "a"}
            await ws.send(json.dumps({"type": "ping"}))
            assert await recv(ws) == {"type": "pong"}
            await ws.send(json.dumps({"type": "ask", "id": "q1", "question": QUESTION, "collection": "manuals"}))
            events = []
            while True:
                event = await recv(ws)
                assert event["id"] == "q1", event
                events.append(event)
                if event["type"] in ("done", "error"):
                    break
            await ws.send(json.dumps({"type": "ask", "id": "q2", "question": QUESTION, "max_tokens": 200}))
            await ws.send(json.dumps({"type": "cancel", "id": "q2"}))
            while True:
                event = await recv(ws)
                if event["type"] in ("done", "error"):
                    assert event["id"] == "q2"
                    break
            return {"events": events, "cancel": event}

    try:
        outcome = asyncio.run(talk())
    except TimeoutError:
        pytest.fail(f"no message for 120 s; received so far: {[e.get('type') for e in seen]}")
    events = outcome["events"]
    assert events[-1]["type"] == "done" and events[-1]["answer"].strip()
    assert {"retrieval", "token"} <= {e["type"] for e in events}
    # Usually cancelled; a fast model may finish first, which the protocol allows.
    assert outcome["cancel"]["type"] == "done" or outcome["cancel"]["code"] == "cancelled"
