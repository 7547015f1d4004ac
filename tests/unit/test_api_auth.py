"""API keys and tenant isolation: key A never sees collection B, through any endpoint.

Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from openai import NotFoundError, OpenAI
from pydantic import ValidationError

from core.settings import Settings
from tests.unit.api_support import CORPUS, Api, make_api, sse_events  # noqa: F401

pytestmark = pytest.mark.unit

A_DOCS = {"/a/alpha.md": "Alpha secrets: the launch code is KILO1234 and the rocket is red."}
B_DOCS = {"/b/beta.md": "Beta secrets: the launch code is ZULU9876 and the rocket is blue."}


@pytest.fixture
def api(make_api: Callable[..., Api], database_url: str) -> Api:  # noqa: F811
    api = make_api(database_url, auth={"enabled": True})
    api.seed("a", A_DOCS)
    api.seed("b", B_DOCS)
    return api


@pytest.fixture
def key_a(api: Api) -> dict[str, str]:
    return api.key("tenant-a", ["a"])


@pytest.fixture
def key_b(api: Api) -> dict[str, str]:
    return api.key("tenant-b", ["b"])


def test_requests_without_a_valid_key_are_401(api: Api) -> None:
    r = api.client.get("/v1/collections")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/v1/collections", headers={"Authorization": "Bearer rag_nope"}).status_code == 401
    assert api.client.get("/v1/collections", headers={"Authorization": "Basic eDp5"}).status_code == 401
    assert api.client.get("/healthz").status_code == 200  # operations stay open


def test_revoked_keys_stop_working(api: Api) -> None:
    header = api.key("temp", ["a"])
    assert api.client.get("/v1/collections", headers=header).status_code == 200
    from app.services import keys

    async def revoke() -> None:
        async with api.resources.sessionmaker() as session:
            await keys.revoke_key(session, "temp")
            await session.commit()

    api.run(revoke)
    r = api.client.get("/v1/collections", headers=header)
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


def _texts(payload: Any) -> str:
    return str(payload)


def test_key_a_cannot_see_collection_b_anywhere(api: Api, key_a: dict[str, str], key_b: dict[str, str]) -> None:
    c = api.client
    # list
    assert [x["name"] for x in c.get("/v1/collections", headers=key_a).json()["collections"]] == ["a"]
    # get, documents
    assert c.get("/v1/collections/b", headers=key_a).status_code == 404
    assert c.get("/v1/collections/b/documents", headers=key_a).status_code == 404
    assert c.delete("/v1/collections/b", headers=key_a).status_code == 404
    b_doc = c.get("/v1/collections/b/documents", headers=key_b).json()["documents"][0]["id"]
    assert c.get(f"/v1/collections/b/documents/{b_doc}", headers=key_a).status_code == 404
    assert c.get(f"/v1/collections/a/documents/{b_doc}", headers=key_a).status_code == 404
    upload = c.post("/v1/collections/b/documents", headers=key_a, files=[("files", ("x.txt", b"x", "text/plain"))])
    assert upload.status_code == 404
    # create outside the scope
    assert c.post("/v1/collections", headers=key_a, json={"name": "c"}).status_code == 403
    # search: no filter searches only the key's collections; naming b is 404
    hits = c.post("/v1/search", headers=key_a, json={"query": "launch code rocket", "k": 10}).json()
    assert {h["collection"] for h in hits["hits"]} == {"a"} and hits["collections"] == ["a"]
    assert "ZULU9876" not in _texts(hits)
    named = c.post("/v1/search", headers=key_a, json={"query": "launch", "filters": {"collections": ["a", "b"]}})
    assert named.status_code == 404
    # ask
    assert c.post("/v1/ask", headers=key_a, json={"question": "launch code?", "collection": "b"}).status_code == 404
    answer = c.post("/v1/ask", headers=key_a, json={"question": "What is the launch code?"}).json()
    assert "ZULU9876" not in _texts(answer["retrievals"]) and "KILO1234" in _texts(answer["retrievals"])
    with c.stream("POST", "/v1/ask/stream", headers=key_a, json={"question": "code?", "collection": "b"}) as r:
        assert r.status_code == 404
    # chat completions
    oa = c.post(
        "/v1/chat/completions",
        headers=key_a,
        json={"model": "rag:b", "messages": [{"role": "user", "content": "code?"}]},
    )
    assert oa.status_code == 404
    extra = c.post(
        "/v1/chat/completions",
        headers=key_a,
        json={"model": "rag", "collection": "b", "messages": [{"role": "user", "content": "code?"}]},
    )
    assert extra.status_code == 404
    models = [m["id"] for m in c.get("/v1/models", headers=key_a).json()["data"]]
    assert models == ["rag", "rag:a"]
    # conversations
    conv_b = c.post("/v1/conversations", headers=key_b, json={"collection": "b"}).json()["id"]
    assert c.post("/v1/conversations", headers=key_a, json={"collection": "b"}).status_code == 404
    assert c.get(f"/v1/conversations/{conv_b}", headers=key_a).status_code == 404
    assert c.get("/v1/conversations", headers=key_a).json()["conversations"] == []
    borrowed = c.post("/v1/ask", headers=key_a, json={"question": "code?", "conversation_id": conv_b})
    assert borrowed.status_code == 404
    # jobs
    b_job = c.post("/v1/collections/b/documents", headers=key_b, files=[("files", ("n.txt", b"n", "text/plain"))])
    job_id = b_job.json()["job_id"]
    assert c.get(f"/v1/jobs/{job_id}", headers=key_a).status_code == 404
    assert c.get("/v1/jobs", headers=key_a).json()["jobs"] == []
    assert c.get("/v1/jobs", headers=key_a, params={"collection": "b"}).status_code == 404
    # websocket
    with c.websocket_connect("/v1/chat", headers=key_a) as ws:
        ws.receive_json()
        ws.send_json({"type": "ask", "id": "x", "question": "code?", "collection": "b"})
        refused = ws.receive_json()
        assert refused["id"] == "x" and refused["type"] == "error" and refused["code"] == "not_found"
        ws.send_json({"type": "ask", "id": "y", "question": "launch code?"})
        events = []
        while not events or events[-1]["type"] not in ("done", "error"):
            events.append(ws.receive_json())
        assert "ZULU9876" not in _texts(events) and "KILO1234" in _texts(events)


def test_openai_client_sees_only_its_collections(api: Api, key_a: dict[str, str]) -> None:
    token = key_a["Authorization"].removeprefix("Bearer ")
    client = OpenAI(base_url="http://testserver/v1", api_key=token, http_client=api.client)
    assert [m.id for m in client.models.list()] == ["rag", "rag:a"]
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="rag:b", messages=[{"role": "user", "content": "code?"}])


def test_admin_keys_see_everything(api: Api) -> None:
    admin = api.key("root", admin=True)
    names = [x["name"] for x in api.client.get("/v1/collections", headers=admin).json()["collections"]]
    assert names == ["a", "b"]
    hits = api.client.post("/v1/search", headers=admin, json={"query": "launch code", "k": 5}).json()
    assert {h["collection"] for h in hits["hits"]} == {"a", "b"}


def test_keys_are_stored_hashed(api: Api) -> None:
    header = api.key("hashed", ["a"])
    token = header["Authorization"].removeprefix("Bearer ")
    from sqlalchemy import select

    from core.db.models import ApiKey

    async def rows() -> list[ApiKey]:
        async with api.resources.sessionmaker() as session:
            return list(await session.scalars(select(ApiKey)))

    stored = next(r for r in api.run(rows) if r.name == "hashed")
    assert token not in (stored.key_hash, stored.prefix) and token.startswith(stored.prefix)
    api.client.get("/v1/collections", headers=header)
    assert next(r for r in api.run(rows) if r.name == "hashed").last_used_at is not None


def test_auth_off_is_refused_on_a_public_interface(tmp_path: Any) -> None:
    with pytest.raises(ValidationError, match="RAG_AUTH__ENABLED"):
        Settings(data_dir=tmp_path, server={"host": "0.0.0.0"})
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, server={"host": "example.com"})
    assert Settings(data_dir=tmp_path, server={"host": "0.0.0.0"}, auth={"enabled": True}).auth.enabled
    assert not Settings(data_dir=tmp_path, server={"host": "::1"}).auth.enabled
    assert not Settings(data_dir=tmp_path, server={"host": "localhost"}).auth.enabled


def test_keys_cli(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from typer.testing import CliRunner

    from app.cli import build_app

    cli = build_app()

    monkeypatch.setenv("RAG_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "--name", "alice", "-c", "docs", "-c", "manuals", "--json"])
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["token"].startswith(key["prefix"]) and key["collections"] == ["docs", "manuals"]
    plain = runner.invoke(cli, ["keys", "create", "--name", "root", "--admin"])
    assert plain.exit_code == 0 and "rag_" in plain.stdout
    assert runner.invoke(cli, ["keys", "create", "--name", "nobody"]).exit_code == 1  # neither scope nor admin
    listed = json.loads(runner.invoke(cli, ["keys", "list", "--json"]).stdout)
    assert [k["name"] for k in listed] == ["alice", "root"] and all("token" not in k for k in listed)
    assert runner.invoke(cli, ["keys", "revoke", "alice"]).exit_code == 0
    assert json.loads(runner.invoke(cli, ["keys", "list", "--json"]).stdout)[0]["revoked_at"]
    assert runner.invoke(cli, ["keys", "revoke", "ghost"]).exit_code == 1


def test_operational_endpoints_are_protected_when_auth_is_on(make_api: Callable[..., Api]) -> None:  # noqa: F811
    # Issue 17: /metrics and /readyz's details were public.
    api = make_api(auth={"enabled": True})
    api.seed("docs", CORPUS)
    admin = api.key("ops", admin=True)
    reader = api.key("reader", ["docs"])
    assert api.client.get("/healthz").status_code == 200
    assert api.client.get("/metrics").status_code == 401
    assert api.client.get("/metrics", headers=reader).status_code == 403
    scraped = api.client.get("/metrics", headers=admin)
    assert scraped.status_code == 200 and "rag_http_requests_total" in scraped.text
    probe = api.client.get("/readyz")
    assert probe.status_code == 200 and probe.json() == {"status": "ready", "checks": {}}
    assert api.client.get("/readyz", headers=reader).json()["checks"] == {}
    assert set(api.client.get("/readyz", headers=admin).json()["checks"]) >= {"database", "index"}
