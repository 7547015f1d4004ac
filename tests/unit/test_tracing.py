"""OpenTelemetry traces with the SDK's in-memory exporter: one trace per request, a span per stage,
stage timings that account for the request's time, the trace id in log lines; and nothing
recorded when tracing is off."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.testclient import TestClient

from app.main import create_app
from app.observability import JsonFormatter
from core.wiring import configure_tracing
from retrieval import tracing as stage_spans
from tests.unit.api_support import CORPUS, Api, default_responder
from tests.unit.fakes_llm import FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = pytest.mark.unit

# The stages of an answer; together they should account for the whole request.
STAGES = ("answer.prepare", "retrieval.search", "generation.prompt", "llm.request", "generation.citations")


@pytest.fixture
def traced(make_settings: Any) -> Iterator[tuple[Api, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    settings = make_settings()
    # 30 ms a token: a request long enough for per-request overheads outside the stages to be small,
    # as they are next to a real model.
    llm = FakeLLM(responder=default_responder, token_delay=0.03)
    app = create_app(settings, embedder=HashEmbedder(), llm=llm, span_exporter=exporter)
    with TestClient(app) as client:
        api = Api(client=client, app=app, llm=llm, settings=settings)
        api.seed("docs", CORPUS)
        exporter.clear()
        yield api, exporter


def finished(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    """Every finished span, once the search stages timed inline have become spans."""
    assert stage_spans.flush(), "stage spans were not emitted in time"
    return exporter.get_finished_spans()


def tree(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[ReadableSpan]:
    """Every span under ``root`` (same trace)."""
    return [s for s in spans if s.context.trace_id == root.context.trace_id and s is not root]


def ms(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e6


def test_ask_stream_is_one_trace_whose_stages_add_up(traced: tuple[Api, InMemorySpanExporter]) -> None:
    api, exporter = traced
    r = api.client.post("/v1/ask/stream", json={"question": "How do I join paths in Python?"})
    assert r.status_code == 200 and '"type":"done"' in r.text.replace(" ", "")
    spans = finished(exporter)
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["POST /v1/ask/stream"]
    root = roots[0]
    below = tree(spans, root)
    names = {s.name for s in below}
    assert {*STAGES, "retrieval.embed_query", "retrieval.dense", "retrieval.bm25", "retrieval.fusion"} <= names
    assert "generation.round" in names

    fusion = next(s for s in below if s.name == "retrieval.fusion")
    assert fusion.attributes is not None and fusion.attributes["rag.fusion.method"] in ("rrf", "weighted")
    assert "rag.fusion.alpha" in fusion.attributes and "rag.fusion.rrf_k" in fusion.attributes
    prompt = next(s for s in below if s.name == "generation.prompt")
    assert prompt.attributes is not None and prompt.attributes["rag.prompt_tokens"] > 0
    model = next(s for s in below if s.name == "llm.request")
    assert model.attributes is not None
    assert model.attributes["rag.completion_tokens"] > 0 and model.attributes["rag.ttft_ms"] >= 0
    bm25 = next(s for s in below if s.name == "retrieval.bm25")  # ran on the leg thread, same trace
    search = next(s for s in below if s.name == "retrieval.search")
    assert bm25.parent is not None and bm25.parent.span_id == search.context.span_id

    total = ms(root)
    stages = sum(ms(s) for s in below if s.name in STAGES)
    print(f"\nrequest {total:.1f} ms, stages {stages:.1f} ms ({(total - stages) / total:.1%} outside the stages)")
    assert abs(total - stages) / total < 0.10, {s.name: ms(s) for s in below} | {"request": total}


def test_search_and_mcp_calls_are_traced(traced: tuple[Api, InMemorySpanExporter]) -> None:
    from mcp import Client

    from app.api.mcp_server import Caller, build_server
    from app.services import keys

    api, exporter = traced
    assert api.client.post("/v1/search", json={"query": "join paths"}).status_code == 200
    names = [s.name for s in finished(exporter)]
    assert "POST /v1/search" in names and "retrieval.fusion" in names

    exporter.clear()

    async def resolve(ctx: Any) -> Caller:
        return Caller(api.resources, keys.ANONYMOUS_ADMIN)

    async def work() -> None:
        async with Client(build_server(resolve)) as client:
            await client.call_tool("search", {"query": "join paths"})

    api.run(work)
    spans = finished(exporter)
    call = next(s for s in spans if s.name == "tools/call search")  # the MCP SDK's span
    search = next(s for s in spans if s.name == "retrieval.search")
    assert search.context.trace_id == call.context.trace_id


def recording_tracer() -> tuple[Any, InMemorySpanExporter]:
    """A tracer of its own SDK provider, exporting synchronously to the returned in-memory exporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def search_with_one_stage(tracer: Any) -> stage_spans.Stages:
    """A finished search (span ``done``) with one timed stage (``stage``), not yet published."""
    with tracer.start_as_current_span("done"):
        stages = stage_spans.Stages(tracer)
        with stages.stage("stage"):
            pass
    return stages


def test_log_lines_carry_the_trace_id(traced: tuple[Api, InMemorySpanExporter]) -> None:
    from opentelemetry import trace

    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with trace.get_tracer("test").start_as_current_span("outer") as span:
        line = json.loads(JsonFormatter().format(record))
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert "trace_id" not in json.loads(JsonFormatter().format(record))


def test_tracing_is_off_without_an_endpoint(make_settings: Any) -> None:
    assert configure_tracing(make_settings()) is None


def test_stages_become_spans_under_their_parent_with_their_own_times() -> None:
    tracer, exporter = recording_tracer()
    with tracer.start_as_current_span("parent") as parent:
        stages = stage_spans.Stages(tracer)
        assert stages.recording
        with stages.stage("first") as attributes:
            attributes["rag.depth"] = 7
        with stages.stage("second"):
            pass
        stages.publish()
    assert stage_spans.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    first, second = spans["first"], spans["second"]
    for child in (first, second):
        assert child.parent is not None and child.parent.span_id == parent.get_span_context().span_id
        assert child.context.trace_id == parent.get_span_context().trace_id
    assert first.attributes == {"rag.depth": 7}
    assert first.start_time is not None and first.end_time is not None and second.start_time is not None
    assert first.start_time <= first.end_time <= second.start_time  # the times recorded inline, not emission times
    assert spans["parent"].start_time <= first.start_time  # type: ignore[operator]


def test_stages_under_a_span_that_is_not_recording_cost_nothing() -> None:
    from opentelemetry import trace

    stages = stage_spans.Stages(trace.get_tracer("test"))  # no SDK here: the API's no-op span
    assert not stages.recording
    with stages.stage("x") as attributes:
        attributes["ignored"] = 1
    stages.publish()
    assert stage_spans.flush(timeout=0.1)


def test_stage_spans_wait_while_a_search_runs_and_follow_when_it_ends() -> None:
    """Span work holds the GIL, so it waits for a moment when no search is running."""
    tracer, exporter = recording_tracer()
    finished_search = search_with_one_stage(tracer)
    running = stage_spans.Stages(tracer)  # another search, still running (unsampled: it counts too)
    finished_search.publish()
    assert not stage_spans.flush(timeout=0.1), "a span was made while a search was running"
    assert [s.name for s in exporter.get_finished_spans()] == ["done"]
    running.publish()
    assert stage_spans.flush(timeout=2)
    assert {s.name for s in exporter.get_finished_spans()} == {"done", "stage"}


def test_stage_spans_are_not_held_back_for_long_under_steady_load() -> None:
    tracer, exporter = recording_tracer()
    finished_search = search_with_one_stage(tracer)
    running = stage_spans.Stages(tracer)
    try:
        finished_search.publish()
        assert stage_spans.flush(timeout=stage_spans.MAX_DELAY_SECONDS + 2)
        assert "stage" in {s.name for s in exporter.get_finished_spans()}
    finally:
        running.publish()


def test_span_records_rebuild_the_same_spans_in_the_export_process() -> None:
    """What crosses the pipe to the export process rebuilds every field OTLP carries."""
    import pickle

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    from core.span_export import readable_spans, span_record, stage_records

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "ragsvc-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("rag.test", "1.2")
    other = tracer.start_span("other")
    with tracer.start_as_current_span(
        "root", kind=SpanKind.SERVER, links=[Link(other.get_span_context(), {"why": "x"})]
    ) as root:
        with tracer.start_as_current_span("child", attributes={"rag.k": 5, "rag.collections": ("a", "b")}) as child:
            child.add_event("retry", {"attempt": 2})
            child.set_status(Status(StatusCode.ERROR, "boom"))
        stages = [("retrieval.dense", 10, 20, {"rag.depth": 100}), ("retrieval.bm25", 12, 25, {})]
        stage_record = stage_records(root, stages, dict(root.resource.attributes))  # type: ignore[attr-defined]
    other.end()
    originals = {s.name: s for s in memory.get_finished_spans()}
    resource = dict(originals["root"].resource.attributes)
    records = [span_record(s, resource) for s in originals.values()] + [stage_record]
    rebuilt = {s.name: s for s in readable_spans(pickle.loads(pickle.dumps(records)))}

    for name, original in originals.items():
        copy = rebuilt[name]
        assert copy.context == original.context and copy.parent == original.parent
        assert (copy.start_time, copy.end_time, copy.kind) == (original.start_time, original.end_time, original.kind)
        assert dict(copy.attributes or {}) == dict(original.attributes or {})
        assert (copy.status.status_code, copy.status.description) == (
            original.status.status_code,
            original.status.description,
        )
        assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in copy.events] == [
            (e.name, e.timestamp, dict(e.attributes or {})) for e in original.events
        ]
        assert [(lk.context.span_id, dict(lk.attributes or {})) for lk in copy.links] == [
            (lk.context.span_id, dict(lk.attributes or {})) for lk in original.links
        ]
        assert copy.instrumentation_scope == original.instrumentation_scope
        assert copy.resource.attributes["service.name"] == "ragsvc-test"
    root_ctx = originals["root"].context
    for name, (start, end, attributes) in {
        "retrieval.dense": (10, 20, {"rag.depth": 100}),
        "retrieval.bm25": (12, 25, {}),
    }.items():
        stage = rebuilt[name]
        assert stage.parent is not None and stage.parent.span_id == root_ctx.span_id
        assert stage.context.trace_id == root_ctx.trace_id and stage.context.span_id not in (0, root_ctx.span_id)
        assert (stage.start_time, stage.end_time, dict(stage.attributes or {})) == (start, end, attributes)
        assert stage.instrumentation_scope == originals["root"].instrumentation_scope
    assert rebuilt["retrieval.dense"].context.span_id != rebuilt["retrieval.bm25"].context.span_id


def test_a_stage_sink_receives_the_stages_instead_of_the_span_thread() -> None:
    tracer, exporter = recording_tracer()
    received: list[tuple[Any, list[stage_spans.Stage], bool]] = []
    stage_spans.set_stage_sink(lambda parent, stages, rooted: received.append((parent, stages, rooted)))
    try:
        with tracer.start_as_current_span("parent") as parent:
            stages = stage_spans.Stages(tracer)
            with stages.stage("retrieval.dense") as attributes:
                attributes["rag.depth"] = 3
            stages.publish()
    finally:
        stage_spans.set_stage_sink(None)
    assert stage_spans.flush(timeout=1)
    assert [s.name for s in exporter.get_finished_spans()] == ["parent"]  # no SDK span was made here
    [(sent_parent, sent, rooted)] = received
    assert sent_parent is parent and not rooted
    assert [(name, attrs) for name, _, _, attrs in sent] == [("retrieval.dense", {"rag.depth": 3})]


def test_an_operation_span_is_made_later_with_its_stages_under_it() -> None:
    """``root``: the operation's own span is timed inline too and becomes the stages' parent."""
    tracer, exporter = recording_tracer()
    with tracer.start_as_current_span("request") as request:
        stages = stage_spans.Stages(tracer, root="retrieval.search")
        stages.root_attributes["rag.k"] = 10
        with stages.stage("retrieval.dense"):
            pass
        stages.fail(ValueError("bad"))
        stages.publish()
    assert stage_spans.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    search, dense = spans["retrieval.search"], spans["retrieval.dense"]
    assert search.parent is not None and search.parent.span_id == request.get_span_context().span_id
    assert dense.parent is not None and dense.parent.span_id == search.context.span_id
    assert search.attributes == {"rag.k": 10, "error.type": "ValueError"}
    assert search.status.status_code.name == "ERROR"
    assert search.start_time <= dense.start_time <= dense.end_time <= search.end_time  # type: ignore[operator]


def test_an_unrecorded_operation_has_no_root_to_fill() -> None:
    from opentelemetry import trace

    stages = stage_spans.Stages(trace.NoOpTracer(), root="retrieval.search")
    stages.root_attributes["ignored"] = 1  # a throwaway dict
    stages.fail(RuntimeError("x"))
    stages.publish()
    assert not stages.recording and stages.root_attributes == {}


def test_an_operation_outside_any_trace_starts_one() -> None:
    tracer, exporter = recording_tracer()
    stages = stage_spans.Stages(tracer, root="retrieval.search")  # no current span: a new trace
    assert stages.recording
    stages.root_attributes["rag.k"] = 3
    with stages.stage("retrieval.bm25"):
        pass
    stages.publish()
    assert stage_spans.flush()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    search, bm25 = spans["retrieval.search"], spans["retrieval.bm25"]
    assert search.parent is None and search.attributes == {"rag.k": 3}
    assert bm25.parent is not None and bm25.parent.span_id == search.context.span_id
