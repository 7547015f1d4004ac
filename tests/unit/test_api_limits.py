"""Admission control and per-key limits on every transport, on SQLite and PostgreSQL (issue 17).

Beyond its share a key gets 429 ``rate_limited`` with ``Retry-After`` (REST, SSE, the OpenAI facade)
or an ``error`` event with ``retryable`` (websocket); beyond the service's answer slots and their
short queue everyone gets 503 ``overloaded`` with ``Retry-After`` — within the queue wait, never
after a long hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from openai import OpenAI, RateLimitError

from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401
from tests.unit.fakes_llm import FakeLLM
from tests.unit.test_api_websocket import until_terminal

if TYPE_CHECKING:
    from starlette.testclient import WebSocketTestSession

pytestmark = pytest.mark.unit


def _last_of(ws: WebSocketTestSession, wanted: str) -> dict[str, Any]:
    """The ``done``/``error`` message of ``wanted``, skipping other answers' messages and pings."""
    while True:
        message = ws.receive_json()
        if message.get("id") == wanted and message["type"] in ("done", "error"):
            return message


def _slow_llm() -> FakeLLM:
    # Long answers, slowly: an answer holds its slot for seconds while the test probes the limits.
    return FakeLLM(responder=lambda c: [f" w{i}" for i in range(2000)], token_delay=0.01)


def test_a_keys_request_rate_is_limited_on_every_transport(
    make_api: Callable[..., Api],  # noqa: F811
    database_url: str,
) -> None:
    api = make_api(database_url, auth={"enabled": True}, api={"rate_limit_per_minute": 3})
    api.seed("docs", CORPUS)
    a, b = api.key("a", ["docs"]), api.key("b", ["docs"])
    remaining = []
    for _ in range(3):
        r = api.client.post("/v1/search", json={"query": "paths"}, headers=a)
        assert r.status_code == 200, r.text
        assert r.headers["ratelimit-limit"] == "3"
        remaining.append(int(r.headers["ratelimit-remaining"]))
    assert remaining == [2, 1, 0]
    refused = api.client.post("/v1/search", json={"query": "paths"}, headers=a)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited" and refused.json()["error"]["retryable"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # SSE refuses before the stream starts; the OpenAI client sees a RateLimitError.
    sse = api.client.post("/v1/ask/stream", json={"question": "paths?"}, headers=a)
    assert sse.status_code == 429 and sse.headers["content-type"].startswith("application/json")
    client = OpenAI(
        base_url=f"{api.client.base_url}/v1", api_key=a["Authorization"][7:], http_client=api.client, max_retries=0
    )
    with pytest.raises(RateLimitError):
        client.chat.completions.create(model="rag:docs", messages=[{"role": "user", "content": "paths?"}])
    # Another key has its own window.
    assert api.client.post("/v1/search", json={"query": "paths"}, headers=b).status_code == 200


def test_a_websocket_question_over_the_rate_is_a_retryable_error_event(
    make_api: Callable[..., Api],  # noqa: F811
    database_url: str,
) -> None:
    api = make_api(database_url, auth={"enabled": True}, api={"rate_limit_per_minute": 2})
    api.seed("docs", CORPUS)
    key = api.key("ws", ["docs"])
    with api.client.websocket_connect("/v1/chat", headers=key) as ws:
        assert ws.receive_json()["type"] == "ready"
        for n in range(2):
            ws.send_json({"type": "ask", "id": f"q{n}", "question": "join paths?"})
            assert until_terminal(ws, {f"q{n}"})[f"q{n}"][-1]["type"] == "done"
        ws.send_json({"type": "ask", "id": "over", "question": "join paths?"})
        error = until_terminal(ws, {"over"})["over"][-1]
        assert error["type"] == "error" and error["code"] == "rate_limited" and error["retryable"]
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}  # the socket stays open


def test_a_key_may_run_only_its_share_of_streams(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(auth={"enabled": True}, llm=_slow_llm(), api={"max_streams_per_key": 1})
    api.seed("docs", CORPUS)
    key, other = api.key("k", ["docs"]), api.key("other", ["docs"])
    with api.client.websocket_connect("/v1/chat", headers=key) as ws:
        assert ws.receive_json()["type"] == "ready"
        ws.send_json({"type": "ask", "id": "long", "question": "tell me everything"})
        while ws.receive_json()["type"] != "token":
            pass
        second = api.client.post("/v1/ask/stream", json={"question": "paths?"}, headers=key)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "rate_limited"
        ws.send_json({"type": "ask", "id": "again", "question": "x"})
        assert _last_of(ws, "again")["code"] == "rate_limited"
        # Another key is not affected by this one's stream.
        ok = api.client.post("/v1/search", json={"query": "paths"}, headers=other)
        assert ok.status_code == 200
        ws.send_json({"type": "cancel", "id": "long"})
        _last_of(ws, "long")


def test_beyond_the_answer_slots_and_queue_requests_are_refused_fast(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(llm=_slow_llm(), api={"max_concurrent_answers": 1, "answer_queue": 0, "queue_wait_seconds": 0.2})
    api.seed("docs", CORPUS)
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "long", "question": "tell me everything"})
        while ws.receive_json()["type"] != "token":
            pass
        for path in ("/v1/ask/stream", "/v1/ask"):
            started = time.monotonic()
            r = api.client.post(path, json={"question": "paths?"})
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["retryable"]
            assert r.headers["retry-after"] == str(api.settings.api.retry_after_seconds)
            assert time.monotonic() - started < 5  # refused at once, not after the answer ends
        # Searches have their own slots: they keep working while the answers are full.
        assert api.client.post("/v1/search", json={"query": "paths"}).status_code == 200
        ws.send_json({"type": "cancel", "id": "long"})
        _last_of(ws, "long")
    # Once the slot is free, answers are admitted again.
    assert api.client.post("/v1/ask", json={"question": "paths?", "max_tokens": 4}).status_code == 200


def test_beyond_max_in_flight_requests_are_shed_before_any_work(make_api: Callable[..., Api]) -> None:  # noqa: F811
    import threading

    api = make_api(llm=_slow_llm(), api={"max_in_flight": 1})
    api.seed("docs", CORPUS)
    started = threading.Event()

    def hold() -> None:
        with api.client.stream("POST", "/v1/ask/stream", json={"question": "tell me everything"}) as r:
            for line in r.iter_lines():
                if line.startswith("event: token"):
                    started.set()
                if line.startswith("event: done") or line.startswith("event: error"):
                    break

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert started.wait(30)
    shed = api.client.post("/v1/search", json={"query": "paths"})
    assert shed.status_code == 503, shed.text
    assert shed.json()["error"] == {
        "code": "overloaded",
        "message": "the service is busy (1 requests in progress); retry shortly",
        "retryable": True,
    }
    assert shed.headers["retry-after"] == "1"
    assert api.client.get("/healthz").status_code == 200  # never shed
    metrics = api.client.get("/metrics")
    assert metrics.status_code == 200
    # Counted, not logged per request: a shed request costs the loop as little as possible.
    assert "rag_http_shed_total 1.0" in metrics.text
    assert 'route="unmatched",status="503"' not in metrics.text
