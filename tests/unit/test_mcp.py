"""The MCP tools on fakes: the SDK's own client, connected in-process to :func:`build_server`, on the
app's event loop (the database and index are the app's); and the HTTP endpoint's admission.

The real transports (stdio subprocess, streamable HTTP under uvicorn) are in
``tests/integration/test_mcp.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from mcp import Client, MCPError

from app.api.mcp_server import Caller, build_server
from app.schemas.events import ANSWER_EVENT_ADAPTER
from app.services import keys
from tests.unit.api_support import ANSWER, CORPUS, Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit

KEY_DOCS = keys.Principal(key_id=1, name="docs-only", admin=False, collections=frozenset({"docs"}))


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.seed("docs", CORPUS)
    api.seed("other", {"/other/python.md": "Python paths are joined with pathlib too."})
    return api


def call(api: Api, principal: keys.Principal, name: str, arguments: dict[str, Any], **kw: Any) -> Any:
    """Call a tool through the SDK client as ``principal``; returns the ``CallToolResult``."""

    async def resolve(ctx: Any) -> Caller:
        return Caller(api.resources, principal)

    async def work() -> Any:
        async with Client(build_server(resolve)) as client:
            return await client.call_tool(name, arguments, **kw)

    return api.run(work)


def test_tools_are_listed(api: Api) -> None:
    async def resolve(ctx: Any) -> Caller:
        return Caller(api.resources, keys.ANONYMOUS_ADMIN)

    async def work() -> list[str]:
        async with Client(build_server(resolve)) as client:
            return [t.name for t in (await client.list_tools()).tools]

    assert set(api.run(work)) == {"search", "ask", "list_collections", "get_document_chunk"}


def test_search_returns_ranked_chunks_with_locations(api: Api) -> None:
    result = call(api, keys.ANONYMOUS_ADMIN, "search", {"query": "join paths in Python", "k": 3})
    assert not result.is_error, result.content
    hits = result.structured_content["hits"]
    assert hits[0]["path"] == "/docs/python/paths.md" and hits[0]["rank"] == 1
    assert {"score", "dense", "sparse", "chunk_id", "start", "end", "page", "collection"} <= set(hits[0])


def test_a_scoped_key_sees_only_its_collections(api: Api) -> None:
    result = call(api, KEY_DOCS, "search", {"query": "Python paths"})
    assert {h["collection"] for h in result.structured_content["hits"]} == {"docs"}
    refused = call(api, KEY_DOCS, "search", {"query": "Python paths", "collections": ["other"]})
    assert refused.is_error and "not_found" in refused.content[0].text
    listed = call(api, KEY_DOCS, "list_collections", {})
    assert [c["name"] for c in listed.structured_content["collections"]] == ["docs"]
    asked = call(api, KEY_DOCS, "ask", {"question": "How do I join paths?", "collections": ["other"]})
    assert asked.is_error and "not_found" in asked.content[0].text


def test_get_document_chunk_is_scoped(api: Api) -> None:
    hit = call(api, keys.ANONYMOUS_ADMIN, "search", {"query": "pathlib", "collections": ["other"]})
    chunk_id = hit.structured_content["hits"][0]["chunk_id"]
    whole = call(api, keys.ANONYMOUS_ADMIN, "get_document_chunk", {"chunk_id": chunk_id})
    assert whole.structured_content["text"] == "Python paths are joined with pathlib too."
    refused = call(api, KEY_DOCS, "get_document_chunk", {"chunk_id": chunk_id})
    assert refused.is_error and "not found" in refused.content[0].text


def test_invalid_arguments_name_the_field(api: Api) -> None:
    result = call(api, keys.ANONYMOUS_ADMIN, "search", {"query": "x", "k": 1000})
    assert result.is_error and "invalid_input: k" in result.content[0].text


def test_ask_streams_the_answer_events_as_progress(api: Api) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    result = call(api, keys.ANONYMOUS_ADMIN, "ask", {"question": "How do I join paths?"}, progress_callback=on_progress)
    assert not result.is_error, result.content
    done = result.structured_content
    assert done["type"] == "done" and done["answer"] == ANSWER
    assert done["citations"] and done["citations"][0]["path"] == "/docs/python/paths.md"
    events = [ANSWER_EVENT_ADAPTER.validate_python(json.loads(m or "")) for _, m in progress]
    kinds = [e.type for e in events]
    assert kinds[0] == "retrieval" and kinds[-1] == "done" and "token" in kinds and "citation" in kinds
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)
    assert "".join(e.text for e in events if e.type == "token") == ANSWER


def test_document_resource_is_the_text_and_scoped(api: Api) -> None:
    async def read(principal: keys.Principal, uri: str) -> Any:
        async def resolve(ctx: Any) -> Caller:
            return Caller(api.resources, principal)

        async with Client(build_server(resolve)) as client:
            try:
                return await client.read_resource(uri)
            except MCPError as e:  # inside the client's block: leaving it wraps errors in a group
                return e

    hit = call(api, keys.ANONYMOUS_ADMIN, "search", {"query": "pathlib", "collections": ["other"]})
    doc = hit.structured_content["hits"][0]["document_id"]
    result = api.run(lambda: read(keys.ANONYMOUS_ADMIN, f"rag://other/documents/{doc}"))
    assert result.contents[0].text == "Python paths are joined with pathlib too."
    refused = api.run(lambda: read(KEY_DOCS, f"rag://other/documents/{doc}"))
    assert isinstance(refused, MCPError) and "not found" in str(refused)


def test_http_endpoint_needs_a_key_when_auth_is_on(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(auth={"enabled": True})
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    refused = api.client.post("/mcp", json=body, headers={"Accept": "application/json, text/event-stream"})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["WWW-Authenticate"] == "Bearer"
