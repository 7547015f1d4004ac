"""Traces leave the process over OTLP/HTTP: the API under uvicorn with ``telemetry.otlp_endpoint``
pointing at a tiny receiver in this test (``POST /v1/traces``, protobuf decoded with
opentelemetry-proto); a real ``/v1/ask/stream`` answer (packaged embedding model, ingested corpus,
the real model server) arrives as one trace with a span per stage."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from app.main import create_app
from core.settings import Settings
from ingest.worker import build_ingest_context, enqueue_path, run_job
from tests.corpus_factory import write_corpus
from tests.integration.test_service import LiveServer
from tests.llm_server import LLMServerInfo

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.llm]


class Receiver:
    """Accepts OTLP/HTTP protobuf exports and keeps every span (name, trace id, attributes)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.paths.append(self.path)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                    for ss in rs.scope_spans:
                        for span in ss.spans:
                            outer.spans.append(
                                {
                                    "name": span.name,
                                    "trace": span.trace_id.hex(),
                                    "id": span.span_id.hex(),
                                    "parent": span.parent_span_id.hex(),
                                    "service": service,
                                    "ms": (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6,
                                    "start": span.start_time_unix_nano,
                                    "end": span.end_time_unix_nano,
                                    "attributes": {a.key: a.value for a in span.attributes},
                                }
                            )
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_a_traced_answer_reaches_an_otlp_receiver(tmp_path: Any, embedder: Any, llm_server: LLMServerInfo) -> None:
    receiver = Receiver()
    data = tmp_path / "data"
    corpus = write_corpus(tmp_path / "corpus")
    settings = Settings(
        data_dir=data,
        database={"url": f"sqlite+aiosqlite:///{data / 'rag.db'}"},
        llm={"base_url": llm_server.base_url, "model": llm_server.model, "max_tokens": 24},
        telemetry={"otlp_endpoint": receiver.url, "service_name": "ragsvc-test"},
    )

    async def ingest() -> None:
        ctx = await build_ingest_context(settings, embedder=embedder)
        try:
            job_id, _ = await enqueue_path(ctx.sessionmaker, corpus.root, collection="manuals")
            await run_job(ctx, job_id)
        finally:
            await ctx.aclose()

    asyncio.run(ingest())
    with LiveServer(create_app(settings, embedder=embedder)) as server:
        r = httpx.post(f"{server.url}/v1/ask/stream", json={"question": "Which port does quokka use?"}, timeout=300)
        assert r.status_code == 200 and '"type":"done"' in r.text.replace(" ", "")
    # Leaving the server ran the lifespan's shutdown, which flushed the batch exporter.
    assert set(receiver.paths) == {"/v1/traces"}
    request = [s for s in receiver.spans if s["name"] == "POST /v1/ask/stream"]
    assert len(request) == 1 and request[0]["service"] == "ragsvc-test"
    trace = [s for s in receiver.spans if s["trace"] == request[0]["trace"]]
    names = {s["name"] for s in trace}
    assert {
        "answer.prepare",
        "retrieval.search",
        "retrieval.embed_query",
        "retrieval.dense",
        "retrieval.bm25",
        "retrieval.fusion",
        "generation.prompt",
        "llm.request",
        "generation.citations",
    } <= names
    # With the real model, the stages account for the request's time within 10 %. Covered time is the
    # union of the stage spans (the grounding guard judges sentences while the model's request is
    # open, so its checks overlap llm.request; a plain sum would count that time twice).
    stages = (
        "answer.prepare",
        "retrieval.search",
        "generation.prompt",
        "llm.request",
        "generation.citations",
        "grounding.check",
    )
    intervals = sorted((s["start"], s["end"]) for s in trace if s["name"] in stages)
    covered_ns, reach = 0, 0
    for start, end in intervals:
        covered_ns += max(0, end - max(start, reach))
        reach = max(reach, end)
    covered = covered_ns / 1e6
    total = request[0]["ms"]
    print(f"\nrequest {total:.1f} ms, stages {covered:.1f} ms ({(total - covered) / total:.1%} outside)")
    assert abs(total - covered) / total < 0.10
    model = next(s for s in trace if s["name"] == "llm.request")
    assert model["attributes"]["rag.completion_tokens"].int_value > 0
    assert model["attributes"]["rag.ttft_ms"].double_value > 0
