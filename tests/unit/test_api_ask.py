"""Answers over REST and SSE with a scripted LLM: event order, citations, errors, pings,
cancellation on disconnect, conversations."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from app.schemas.events import ANSWER_EVENT_ADAPTER
from generation.errors import LLMTimeout, LLMUnavailable
from tests.unit.api_support import ANSWER, CORPUS, Api, make_api, sse_events  # noqa: F401
from tests.unit.fakes_llm import FakeLLM, split_tokens

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.ids = api.seed("docs", CORPUS)  # type: ignore[attr-defined]
    return api


def test_ask_returns_the_whole_answer_with_citations(api: Api) -> None:
    r = api.client.post("/v1/ask", json={"question": "How do I join paths in Python?", "collection": "docs"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == ANSWER
    cite = body["citations"][0]
    assert cite["n"] == 1 and cite["path"] == "/docs/python/paths.md"
    assert cite["chunk_id"] == api.ids[0]  # type: ignore[attr-defined]
    text = CORPUS["/docs/python/paths.md"]
    assert text[cite["start"] : cite["end"]] == cite["snippet"]
    assert body["retrievals"][0]["chunks"][0]["chunk"]["path"] == "/docs/python/paths.md"
    assert body["usage"]["completion_tokens"] == len(split_tokens(ANSWER))
    assert {"retrieval_ms", "ttft_ms", "total_ms"} <= set(body["timings"])
    assert body["mode"] == "single" and body["conversation_id"] is None


def test_generation_parameters_reach_the_model(api: Api) -> None:
    api.client.post(
        "/v1/ask",
        json={"question": "paths?", "max_tokens": 7, "temperature": 0.5, "top_p": 0.5, "seed": 3, "k": 2},
    )
    params = api.llm.calls[-1].params
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.5, 0.5, 3)


def test_stream_sends_the_event_union_and_ends_with_done(api: Api) -> None:
    with api.client.stream("POST", "/v1/ask/stream", json={"question": "join paths?"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
        assert "content-length" not in r.headers
        text = "".join(r.iter_text())
    events = sse_events(text)
    names = [name for name, _ in events]
    assert names[0] == "retrieval" and names[-1] == "done"
    assert names.index("citation") < names.index("token", names.index("citation"))
    for name, data in events:
        assert data["type"] == name
        ANSWER_EVENT_ADAPTER.validate_python(data)  # the documented schema
    assert "".join(d["text"] for n, d in events if n == "token") == events[-1][1]["answer"]


class DownLLM(FakeLLM):
    """A model server that cannot be reached: every call fails, as OpenAICompatClient's would."""

    async def count_tokens(self, text: str) -> int:
        raise LLMUnavailable("cannot connect to the model server")

    async def tokenize(self, text: str) -> list[int]:
        raise LLMUnavailable("cannot connect to the model server")


def test_model_server_down_is_503_with_retry_after(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(llm=DownLLM())
    api.seed("docs", CORPUS)
    for path in ("/v1/ask", "/v1/ask/stream"):
        r = api.client.post(path, json={"question": "paths?"})
        assert r.status_code == 503, (path, r.text)
        assert r.headers["retry-after"] == str(api.settings.api.retry_after_seconds)
        assert r.json()["error"] == {
            "code": "llm_unavailable",
            "message": "cannot connect to the model server",
            "retryable": True,
        }
    assert api.client.post("/v1/search", json={"query": "paths"}).status_code == 200


def test_model_server_dying_after_retrieval_is_still_503_before_the_stream(api: Api) -> None:
    # Issue 17: the tokenizer answered (or was cached) and retrieval ran, then generation found the
    # server gone: the stream had already started (200 + retrieval event + error event).
    api.llm.enqueue_error(LLMUnavailable("cannot connect to the model server"), after=[])
    r = api.client.post("/v1/ask/stream", json={"question": "paths?"})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == str(api.settings.api.retry_after_seconds)
    assert r.json()["error"]["code"] == "llm_unavailable"


def test_failure_mid_stream_ends_with_an_error_event(api: Api) -> None:
    api.llm.enqueue_error(LLMTimeout("no byte for 120 s"), after=["Use", " os"])
    with api.client.stream("POST", "/v1/ask/stream", json={"question": "paths?"}) as r:
        assert r.status_code == 200
        events = sse_events("".join(r.iter_text()))
    assert [n for n, _ in events] == ["retrieval", "token", "token", "error"]
    assert events[-1][1] == {"type": "error", "code": "llm_timeout", "message": "no byte for 120 s", "retryable": True}
    failed = api.client.post("/v1/ask", json={"question": "paths?"})
    assert failed.status_code == 200  # the responder answers again
    api.llm.enqueue_error(LLMTimeout("slow"))
    assert api.client.post("/v1/ask", json={"question": "paths?"}).status_code == 504


def test_idle_streams_get_ping_comments(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(llm=FakeLLM(responder=lambda c: ["a", " b", " c"], token_delay=0.25), api={"sse_ping_seconds": 0.05})
    with api.client.stream("POST", "/v1/ask/stream", json={"question": "x"}) as r:
        text = "".join(r.iter_text())
    assert ": ping\n\n" in text
    assert sse_events(text)[-1][0] == "done"


def test_a_disconnect_cancels_the_generation(make_api: Callable[..., Api]) -> None:  # noqa: F811
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(500)], token_delay=0.01)
    api = make_api(llm=llm)
    body = json.dumps({"question": "long answer please"}).encode()
    sent: list[dict[str, Any]] = []

    async def scenario() -> float:
        delivered = False
        disconnect = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            tokens = sum(1 for m in sent if b"event: token" in m.get("body", b""))
            if tokens >= 3:
                disconnect.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/ask/stream",
            "raw_path": b"/v1/ask/stream",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
            "app": api.app,
            "state": {},
        }
        started = time.perf_counter()
        await api.app(scope, receive, send)
        return time.perf_counter() - started

    elapsed = api.run(scenario)
    assert elapsed < 2.0  # 500 tokens at 10 ms would take 5 s
    assert llm.open_streams == 0 and llm.closed_streams == 1  # the upstream request was closed
    frames = b"".join(m.get("body", b"") for m in sent)
    assert b"event: done" not in frames


def test_conversations_store_turns_and_feed_history(api: Api) -> None:
    c = api.client
    conv = c.post("/v1/conversations", json={"collection": "docs"})
    assert conv.status_code == 201
    cid = conv.json()["id"]
    first = c.post("/v1/ask", json={"question": "How do I join paths?", "conversation_id": cid})
    assert first.status_code == 200 and first.json()["conversation_id"] == cid
    with c.stream("POST", "/v1/ask/stream", json={"question": "And in Node?", "conversation_id": cid}) as r:
        assert sse_events("".join(r.iter_text()))[-1][0] == "done"
    assert "How do I join paths?" in api.llm.calls[-1].prompt  # the stored history reached the prompt

    detail = c.get(f"/v1/conversations/{cid}").json()
    assert detail["title"] == "How do I join paths?"
    assert [(m["role"], m["content"]) for m in detail["messages"]] == [
        ("user", "How do I join paths?"),
        ("assistant", ANSWER),
        ("user", "And in Node?"),
        ("assistant", ANSWER),
    ]
    assert detail["messages"][1]["citations"][0]["n"] == 1
    assert detail["messages"][1]["usage"]["completion_tokens"] > 0
    assert [x["id"] for x in c.get("/v1/conversations").json()["conversations"]] == [cid]

    both = c.post(
        "/v1/ask", json={"question": "x", "conversation_id": cid, "history": [{"role": "user", "content": "y"}]}
    )
    assert both.status_code == 422
    other = c.post("/v1/ask", json={"question": "x", "conversation_id": cid, "collection": "nope"})
    assert other.status_code == 422
    assert c.post("/v1/ask", json={"question": "x", "conversation_id": "missing"}).status_code == 404
    assert c.get("/v1/conversations/missing").status_code == 404


def test_ask_errors(api: Api) -> None:
    c = api.client
    assert c.post("/v1/ask", json={"question": ""}).status_code == 422
    assert c.post("/v1/ask", json={"question": "x", "mode": "guess"}).status_code == 422
    assert c.post("/v1/ask", json={"question": "x", "collection": "nope"}).status_code == 404
    assert c.post("/v1/ask", json={"question": "x\u0000"}).status_code == 422


def test_no_pooled_connection_is_held_while_the_model_talks(
    make_api: Callable[..., Api],  # noqa: F811
    database_url: str,
) -> None:
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(40)], token_delay=0.02)
    api = make_api(database_url, llm=llm, auth={"enabled": True})
    api.seed("docs", CORPUS)
    headers = api.key("k", ["docs"])
    conversation = api.client.post("/v1/conversations", headers=headers, json={"collection": "docs"}).json()["id"]
    pool = api.resources.engine.pool
    checked_out: list[int] = []
    body = {"question": "long?", "conversation_id": conversation}
    with api.client.stream("POST", "/v1/ask/stream", headers=headers, json=body) as r:
        tokens = 0
        for line in r.iter_lines():
            if line == "event: token":
                tokens += 1
                checked_out.append(pool.checkedout())  # type: ignore[attr-defined]
    # The last token may be read while the finished answer is being stored (a short transaction).
    assert tokens == 40 and max(checked_out[:-1]) == 0
    assert len(api.client.get(f"/v1/conversations/{conversation}", headers=headers).json()["messages"]) == 2


def test_a_write_to_a_closed_connection_also_cancels(make_api: Callable[..., Api]) -> None:  # noqa: F811
    """ASGI 2.4 servers report a gone client by raising OSError from ``send``."""
    llm = FakeLLM(responder=lambda c: [f" w{i}" for i in range(500)], token_delay=0.01)
    api = make_api(llm=llm)
    body = json.dumps({"question": "long answer please"}).encode()

    async def scenario() -> None:
        delivered = False
        tokens = 0

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # this server never reports the disconnect
            raise AssertionError

        async def send(message: dict[str, Any]) -> None:
            nonlocal tokens
            tokens += b"event: token" in message.get("body", b"")
            if tokens >= 3:
                raise OSError("connection reset by peer")

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/ask/stream",
            "raw_path": b"/v1/ask/stream",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("testserver", 80),
            "state": {},
        }
        await asyncio.wait_for(api.app(scope, receive, send), 5)

    api.run(scenario)
    assert llm.open_streams == 0 and llm.closed_streams == 1


def test_the_grounding_guard_reaches_the_stream(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(grounding={"policy": "fallback", "abstain": False})
    api.seed("docs", CORPUS)
    with api.client.stream("POST", "/v1/ask/stream", json={"question": "How do I join paths in Python?"}) as r:
        events = sse_events("".join(r.iter_text()))
    names = [name for name, _ in events]
    assert "support" in names and names[-1] == "done"
    for _, data in events:
        ANSWER_EVENT_ADAPTER.validate_python(data)
    done = events[-1][1]
    assert done["no_answer"] is False and done["supports"]
    support = next(d for n, d in events if n == "support")
    assert support["verdict"] == "supported" and support["n"] == 1
