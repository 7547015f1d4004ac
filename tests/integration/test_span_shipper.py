"""The OTLP export process for real: spans and search stages shipped by :class:`SpanShipper` to its
child process arrive at an OTLP/HTTP receiver with their tree intact; a flush waits for them; the
child ends with the shipper; a dead child costs the service nothing but the spans."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from core.span_export import SpanShipper
from retrieval import tracing as stage_spans
from tests.integration.test_tracing_otlp import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture
def shipped() -> Iterator[tuple[Receiver, SpanShipper, TracerProvider]]:
    receiver = Receiver()
    shipper = SpanShipper(f"{receiver.url}/v1/traces", timeout_seconds=5)
    provider = TracerProvider(resource=Resource.create({"service.name": "ragsvc-test"}))
    provider.add_span_processor(shipper)
    stage_spans.set_stage_sink(shipper.ship_stages)
    try:
        yield receiver, shipper, provider
    finally:
        stage_spans.set_stage_sink(None)
        shipper.shutdown()
        receiver.server.shutdown()


def test_spans_and_stages_reach_the_receiver_through_the_export_process(
    shipped: tuple[Receiver, SpanShipper, TracerProvider],
) -> None:
    receiver, shipper, provider = shipped
    tracer = provider.get_tracer("retrieval.hybrid")
    with tracer.start_as_current_span("POST /v1/search") as request:
        stages = stage_spans.Stages(tracer, root="retrieval.search")  # as HybridRetriever.search does
        stages.root_attributes["rag.k"] = 10
        with stages.stage("retrieval.embed_query"):
            pass
        with stages.stage("retrieval.dense") as attributes:
            attributes["rag.depth"] = 100
        stages.publish()
    assert shipper.force_flush(10_000), "the export process did not confirm the flush"
    spans = {s["name"]: s for s in receiver.spans}
    assert set(spans) == {"POST /v1/search", "retrieval.search", "retrieval.embed_query", "retrieval.dense"}
    assert spans["retrieval.search"]["parent"] == spans["POST /v1/search"]["id"]
    assert (
        spans["retrieval.dense"]["parent"]
        == spans["retrieval.embed_query"]["parent"]
        == spans["retrieval.search"]["id"]
    )
    assert spans["retrieval.search"]["attributes"]["rag.k"].int_value == 10
    trace_id = f"{request.get_span_context().trace_id:032x}"
    assert {s["trace"] for s in spans.values()} == {trace_id}
    assert {s["service"] for s in spans.values()} == {"ragsvc-test"}
    assert spans["retrieval.dense"]["attributes"]["rag.depth"].int_value == 100
    assert spans["retrieval.search"]["start"] <= spans["retrieval.embed_query"]["start"]
    assert spans["retrieval.embed_query"]["end"] <= spans["retrieval.dense"]["start"]
    assert shipper.dropped == 0


def test_shutdown_exports_what_is_queued_and_ends_the_child(
    shipped: tuple[Receiver, SpanShipper, TracerProvider],
) -> None:
    receiver, shipper, provider = shipped
    for i in range(50):
        provider.get_tracer("test").start_span(f"span-{i}").end()
    shipper.shutdown()
    assert shipper._child.returncode == 0
    assert len(receiver.spans) == 50


def test_a_dead_export_process_drops_spans_without_failing_requests(
    shipped: tuple[Receiver, SpanShipper, TracerProvider],
) -> None:
    _, shipper, provider = shipped
    shipper._child.kill()
    shipper._child.wait()
    count = 600  # more than a batch: the feeder writes to the closed pipe
    for i in range(count):
        provider.get_tracer("test").start_span(f"span-{i}").end()
    assert not shipper.force_flush(5_000)
    assert shipper.dropped >= count
