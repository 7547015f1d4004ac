"""Bad input gets a clear 4xx (or an ``error`` event on the websocket) and loses nothing.

Each case was found by probing ``rag serve`` as an operator would (issue 17): bodies without a
``Content-Length`` read whole, invalid UTF-8 resetting the connection, a lone surrogate answered
500, deeply nested JSON closing the websocket without an ``error`` event.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.seed("docs", CORPUS)
    return api


def _chunked(total: int, block: int = 1 << 20) -> Iterator[bytes]:
    """A JSON-looking body of ``total`` bytes sent without a Content-Length (a generator: chunked)."""
    yield b'{"query": "'
    sent = 0
    while sent < total:
        yield b"a" * block
        sent += block
    yield b'"}'


def test_a_chunked_body_over_the_limit_is_413_without_a_content_length(api: Api) -> None:
    r = api.client.post("/v1/search", content=_chunked(20 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    # Under the limit, chunked bodies work as before.
    small = api.client.post(
        "/v1/search", content=iter([b'{"query": ', b'"join paths"}']), headers={"content-type": "application/json"}
    )
    assert small.status_code == 200, small.text


@pytest.mark.parametrize(
    "body",
    [b'{"query": "caf\xe9"}', b'{"query": "\xff\xfe"}', b'\xc3{"query": "x"}'],
    ids=["latin1", "garbage", "broken-sequence"],
)
def test_invalid_utf8_is_400_with_a_message(api: Api, body: bytes) -> None:
    r = api.client.post("/v1/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_body" and "UTF-8" in error["message"]


@pytest.mark.parametrize(("path", "field"), [("/v1/search", "query"), ("/v1/ask", "question")])
def test_a_lone_surrogate_is_422_not_500(api: Api, path: str, field: str) -> None:
    body = b'{"' + field.encode() + b'": "x\\ud800y"}'  # valid JSON, but no valid Unicode string
    r = api.client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    problem = r.json()["error"]["fields"][0]
    assert problem["field"] == f"body.{field}"
    assert "surrogate" in problem["message"] or "unicode" in problem["message"]


def test_deeply_nested_json_is_400(api: Api) -> None:
    body = b'{"query": "x", "filters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = api.client.post("/v1/search", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "nested" in r.json()["error"]["message"]


def test_the_websocket_answers_hostile_messages_with_errors_and_stays_open(api: Api) -> None:
    with api.client.websocket_connect("/v1/chat") as ws:
        ws.receive_json()
        ws.send_text('{"type": "ask", "id": "deep", "question": ' + "[" * 100_000 + "]" * 100_000 + "}")
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "invalid_message" and "nested" in error["message"]
        ws.send_text('{"type": "ask", "id": "sur", "question": "x\\ud800y"}')
        error = ws.receive_json()
        assert error["type"] == "error" and error["id"] == "sur" and error["code"] == "invalid_message"
        ws.send_bytes(b'{"type": "ping", "x": "\xff"}')
        assert ws.receive_json()["code"] == "invalid_message"
        ws.send_json({"type": "ping"})
        assert ws.receive_json() == {"type": "pong"}  # still open and working


@pytest.mark.parametrize("name", ["a\x00b.md", "a\nb.md", "a\rb.md", "a\x1bb.md"])
def test_upload_names_with_control_characters_are_refused(api: Api, name: str) -> None:
    api.client.post("/v1/collections", json={"name": "up"})
    r = api.client.post("/v1/collections/up/documents", files=[("files", (name, b"text", "text/markdown"))])
    assert r.status_code == 422, r.text
    assert api.client.get("/v1/collections/up/documents").json()["documents"] == []


def test_a_lost_database_connection_is_503_with_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 17: a backend killed mid-query (asyncpg "cannot switch to state 15") answered 500.
    import sqlalchemy.exc

    from app.services import collections

    async def lost(*_args: object, **_kwargs: object) -> None:
        raise sqlalchemy.exc.InternalError("SELECT 1", {}, Exception("cannot switch to state 15"))

    monkeypatch.setattr(collections, "list_visible", lost)
    r = api.client.get("/v1/collections")
    assert r.status_code == 503, r.text
    assert r.json()["error"] == {
        "code": "database_unavailable",
        "message": "the database is unavailable right now; retry shortly",
        "retryable": True,
    }
    assert r.headers["retry-after"] == str(api.settings.api.retry_after_seconds)


def test_a_full_disk_during_an_upload_is_503_and_keeps_nothing(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from app.services import documents

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    api.client.post("/v1/collections", json={"name": "up"})
    monkeypatch.setattr(documents, "_stage", full)
    r = api.client.post("/v1/collections/up/documents", files=[("files", ("a.md", b"# A\ntext", "text/markdown"))])
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "storage_full" and "retry-after" in r.headers
    assert api.client.get("/v1/collections/up/documents").json()["documents"] == []
