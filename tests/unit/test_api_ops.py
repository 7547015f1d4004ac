"""Operations: health, readiness, metrics, request ids, JSON logs, OpenAPI, the event schema mirror."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import replace

import pytest

from app.observability import JsonFormatter, request_id_var
from app.schemas.events import ANSWER_EVENT_ADAPTER, wire_dict
from core.db.engine import create_engine, create_sessionmaker
from generation.types import (
    CitationEvent,
    DoneEvent,
    ErrorEvent,
    RetrievalEvent,
    SupportEvent,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from retrieval.types import LegScore, ScoredChunk
from tests.unit.api_support import CORPUS, Api, make_api  # noqa: F401
from tests.unit.fakes_retrieval import make_chunk

pytestmark = pytest.mark.unit


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:  # noqa: F811
    api = make_api()
    api.seed("docs", CORPUS)
    return api


def test_health_and_readiness(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["index"]["detail"] == "1 collection(s) readable"


def test_readiness_is_503_when_the_database_is_down(api: Api) -> None:
    broken = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    resources = api.resources
    working = resources.sessionmaker
    resources.sessionmaker = create_sessionmaker(broken)
    try:
        r = api.client.get("/readyz")
    finally:
        resources.sessionmaker = working
        api.run(broken.dispose)
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable" and r.json()["checks"]["database"]["ok"] is False


def test_request_ids_are_echoed_or_generated(api: Api) -> None:
    mine = api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    generated = api.client.get("/healthz", headers={"X-Request-ID": "bad id with spaces\n"})
    assert generated.headers["x-request-id"] != "bad id with spaces\n" and len(generated.headers["x-request-id"]) == 32


def test_metrics(api: Api) -> None:
    c = api.client
    c.post("/v1/search", json={"query": "join paths"})
    c.post("/v1/search", json={"query": "apt", "mode": "sparse"})
    c.post("/v1/ask", json={"question": "join paths?"})
    c.get("/v1/collections/docs")
    c.get("/v1/nothing-here")
    text = c.get("/metrics").text
    assert 'rag_http_requests_total{method="GET",route="/v1/collections/{name}",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert 'rag_retrieval_duration_seconds_count{leg="hybrid"} 1.0' in text
    assert 'rag_retrieval_duration_seconds_count{leg="sparse"} 1.0' in text
    assert 'rag_retrieval_duration_seconds_count{leg="embed"}' in text
    assert 'rag_answer_ttft_seconds_count{mode="single",transport="rest"} 1.0' in text
    assert 'rag_tokens_generated_total{mode="single"}' in text
    assert 'rag_answers_total{mode="single",outcome="done"} 1.0' in text
    assert 'rag_ingest_jobs{status="queued"} 0.0' in text


def test_event_loop_lag_is_measured(api: Api) -> None:
    import re
    import time

    async def block() -> None:
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: what a blocking call does to the loop

    api.run(block)
    for _ in range(40):
        text = api.client.get("/metrics").text
        count = re.search(r"^rag_event_loop_lag_seconds_count (\S+)$", text, re.M)
        worst = re.search(r"^rag_event_loop_lag_max_seconds (\S+)$", text, re.M)
        if count and worst and float(worst.group(1)) >= 0.2:
            break
        time.sleep(0.05)
    assert count is not None and float(count.group(1)) > 0
    assert worst is not None and float(worst.group(1)) >= 0.2


def test_json_logs_carry_the_request_id() -> None:
    record = logging.LogRecord("app.x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.collection = "docs"
    token = request_id_var.set("rid-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello world" and line["request_id"] == "rid-1" and line["collection"] == "docs"
    assert line["level"] == "info" and line["logger"] == "app.x"


def test_openapi_documents_the_event_union(api: Api) -> None:
    schema = api.client.get("/openapi.json").json()
    event = schema["components"]["schemas"]["AnswerEvent"]
    assert event["discriminator"]["propertyName"] == "type"
    assert set(event["discriminator"]["mapping"]) == {"retrieval", "token", "citation", "support", "done", "error"}
    stream = schema["paths"]["/v1/ask/stream"]["post"]["responses"]
    assert stream["200"]["content"]["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/AnswerEvent"}
    assert "503" in stream
    jobs = schema["components"]["schemas"]["JobEvent"]
    assert set(jobs["discriminator"]["mapping"]) == {"file", "progress", "job_end", "error"}
    job_stream = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert job_stream["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/JobEvent"}
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert api.client.get("/docs").status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_this_server(api: Api, page: str) -> None:
    # Regression: FastAPI's default pages load Swagger UI from a CDN and were blank offline.
    html = api.client.get(page).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/docs-assets/") or a == "/openapi.json" for a in assets), assets
    assert "cdn" not in html.lower() and "fonts.googleapis" not in html
    for asset in assets:
        if asset.startswith("/docs-assets/"):
            r = api.client.get(asset)
            assert r.status_code == 200 and len(r.content) > 1000, asset


def test_collections_are_named_one_way_on_every_route(api: Api) -> None:
    """`collections` (a name or a list) on search, ask and the OpenAI facade; the old spellings still work."""
    from app.schemas.ask import AskRequest
    from app.schemas.openai import ChatCompletionRequest
    from app.schemas.search import SearchRequest

    for single in ({"collections": "docs"}, {"collection": "docs"}):
        assert SearchRequest.model_validate({"query": "q", **single}).requested() == ["docs"]
        assert AskRequest.model_validate({"question": "q", **single}).requested() == ["docs"]
        chat = {"model": "rag", "messages": [{"role": "user", "content": "q"}], **single}
        assert ChatCompletionRequest.model_validate(chat).requested() == ["docs"]
    both = {"collections": ["a", "b", "a"]}
    assert SearchRequest.model_validate({"query": "q", **both}).requested() == ["a", "b"]
    assert AskRequest.model_validate({"question": "q", **both}).requested() == ["a", "b"]
    legacy = {"query": "q", "filters": {"collections": ["a"]}}
    assert SearchRequest.model_validate(legacy).requested() == ["a"]
    assert SearchRequest.model_validate({"query": "q"}).requested() is None
    for clash in ({"collections": "a", "collection": "b"}, {"collections": "a", "filters": {"collections": ["b"]}}):
        with pytest.raises(ValueError, match="different collections"):
            SearchRequest.model_validate({"query": "q", **clash})
    # The one name rule applies to every spelling.
    for bad in ({"collections": "a..b"}, {"collections": ["ok", "../x"]}, {"collection": ".hidden"}):
        assert api.client.post("/v1/search", json={"query": "q", **bad}).status_code == 422
    for spelling in ({"collections": "docs"}, {"collections": ["docs"]}, {"collection": "docs"}):
        r = api.client.post("/v1/search", json={"query": "join paths", **spelling})
        assert r.status_code == 200, r.text
        assert r.json()["collections"] == ["docs"] and r.json()["hits"]
    assert api.client.post("/v1/search", json={"query": "q", "collections": "nope"}).status_code == 404


def test_every_domain_event_has_a_valid_wire_form() -> None:
    chunk = make_chunk(7, "Use os.path.join.", path="/p.md")
    scored = ScoredChunk(chunk=chunk, score=0.5, rank=1, dense=LegScore(1, 0.9), sparse=None)
    retrieval = RetrievalEvent(
        round=1,
        query="q",
        chunks=(scored,),
        numbers=(1,),
        trigger=(TokenLogprob("x", float("nan"), (("y", -1.0),)),),
        reason="low_confidence",
        elapsed_ms=1.5,
    )
    citation = CitationEvent(
        n=1, chunk_id=7, document_id=7, path="/p.md", title=None, page=2, start=0, end=3, snippet="Use", chunk=chunk
    )
    done = DoneEvent(
        answer="Use [1]",
        citations=(citation,),
        retrievals=(retrieval,),
        usage=Usage(3, 4),
        timings={"ttft_ms": 1.0},
        mode="flare",
        finish_reason="stop",
    )
    support = SupportEvent(
        index=0, sentence="Use [1]", verdict="supported", score=0.8, origin="model", n=1, chunk_id=7, start=0, end=3
    )
    guarded = replace(done, no_answer=True, supports=(support,), finish_reason="guard")
    events = (retrieval, TokenEvent("Use"), citation, support, done, guarded, ErrorEvent("llm_timeout", "slow", True))
    for event in events:
        wire = wire_dict(event)
        assert wire["type"] == event.type
        model = ANSWER_EVENT_ADAPTER.validate_python(json.loads(json.dumps(wire)))  # what a client parses
        assert model.model_dump(mode="json") == wire, event.type
    assert wire_dict(retrieval)["trigger"][0]["logprob"] is None  # NaN is not JSON
    assert "chunk" not in wire_dict(citation)  # the retrieval event carried the chunk's text
    assert wire_dict(guarded)["no_answer"] and wire_dict(guarded)["supports"][0]["verdict"] == "supported"


def test_cors_when_configured(make_api: Callable[..., Api]) -> None:  # noqa: F811
    api = make_api(api={"cors_origins": ["https://chat.example"], "max_upload_mb": 1})
    origin = {"Origin": "https://chat.example"}
    preflight = api.client.options(
        "/v1/ask",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://chat.example"
    api.client.post("/v1/collections", json={"name": "up"})
    big = api.client.post(
        "/v1/collections/up/documents", headers=origin, files=[("files", ("b.txt", b"x" * (3 << 20), "text/plain"))]
    )
    assert big.status_code == 413 and big.headers["access-control-allow-origin"] == "https://chat.example"
    assert (
        "access-control-allow-origin"
        not in api.client.get("/healthz", headers={"Origin": "https://evil.example"}).headers
    )
