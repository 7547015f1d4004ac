"""``POST /v1/search`` on the real retrieval stack with a hash embedder."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from generation.errors import LLMUnavailable
from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.seed("docs", CORPUS)
    api.seed("other", {"/other/python.md": "Python paths are joined with pathlib too."})
    return api


def test_hybrid_search_reports_both_legs(api: Api) -> None:
    r = api.client.post("/v1/search", json={"query": "join paths in Python", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["options"]["mode"] == "hybrid" and body["collections"] is None
    top = body["hits"][0]
    assert top["path"] == "/docs/python/paths.md" and top["rank"] == 1
    assert top["dense"]["rank"] >= 1 and top["sparse"]["rank"] >= 1
    assert {h["collection"] for h in body["hits"]} == {"docs", "other"}
    assert body["took_ms"] >= 0


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_single_leg_modes(api: Api, mode: str) -> None:
    hits = api.client.post(
        "/v1/search", json={"query": "git rebase interactive squash commits before pushing a branch", "mode": mode}
    ).json()["hits"]
    assert hits[0]["path"] == "/docs/git/rebase.md"
    other = "sparse" if mode == "dense" else "dense"
    assert all(h[mode] is not None and h[other] is None for h in hits)


def test_options_and_filters_per_request(api: Api) -> None:
    c = api.client
    r = c.post(
        "/v1/search",
        json={
            "query": "python paths",
            "fusion": "rrf",
            "rrf_k": 10,
            "depth": 5,
            "filters": {"collections": ["other"], "path_prefix": "/other/"},
        },
    ).json()
    assert r["options"]["fusion"] == "rrf" and r["options"]["rrf_k"] == 10 and r["options"]["depth"] == 5
    assert r["collections"] == ["other"]
    assert [h["path"] for h in r["hits"]] == ["/other/python.md"]
    weighted = c.post("/v1/search", json={"query": "python", "fusion": "weighted", "alpha": 0.0}).json()
    assert weighted["options"]["alpha"] == 0.0


def test_bad_requests(api: Api) -> None:
    c = api.client
    assert c.post("/v1/search", json={"query": ""}).status_code == 422
    assert c.post("/v1/search", json={"query": "x", "k": 0}).status_code == 422
    assert c.post("/v1/search", json={"query": "x", "mode": "fuzzy"}).status_code == 422
    assert c.post("/v1/search", json={"query": "x", "alpha": 2}).status_code == 422
    missing = c.post("/v1/search", json={"query": "x", "filters": {"collections": ["nope"]}})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    fields = c.post("/v1/search", json={"query": "x", "k": "many"}).json()["error"]["fields"]
    assert fields[0]["field"] == "body.k"


def test_an_empty_collection_searches_to_nothing(api: Api) -> None:
    api.client.post("/v1/collections", json={"name": "empty"})
    r = api.client.post("/v1/search", json={"query": "x", "filters": {"collections": ["empty"]}})
    assert r.status_code == 200 and r.json()["hits"] == []


def test_search_works_while_the_model_server_is_down(api: Api) -> None:
    api.probe_error.append(LLMUnavailable("cannot connect"))
    api.llm.enqueue_error(LLMUnavailable("cannot connect"))
    assert api.client.post("/v1/search", json={"query": "apt"}).status_code == 200
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["checks"]["model_server"]["ok"] is False


def test_search_grouped_by_document(api: Api) -> None:
    r = api.client.post(
        "/v1/search", json={"query": "join paths in Python", "k": 2, "group_by": "document", "evidence": 1}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    documents = body["documents"]
    assert [d["rank"] for d in documents] == [1, 2]
    assert documents[0]["path"] == "/docs/python/paths.md" and documents[0]["collection"] == "docs"
    assert len({d["document_id"] for d in documents}) == 2
    for d in documents:
        assert len(d["evidence"]) == 1 and d["evidence"][0]["document_id"] == d["document_id"]
        assert d["score"] == d["evidence"][0]["score"]  # a document ranks by its best chunk
    assert [h["chunk_id"] for h in body["hits"]] == [d["evidence"][0]["chunk_id"] for d in documents]
    # Ungrouped searches say so.
    assert api.client.post("/v1/search", json={"query": "python"}).json()["documents"] is None
    bad = api.client.post("/v1/search", json={"query": "python", "group_by": "page", "evidence": 0})
    assert bad.status_code == 422
