"""What tracing costs a search: off (the OpenTelemetry API's no-op tracer, the default), on (the
SDK exporting every span over OTLP/HTTP to a local receiver) and on with 10 % of traces sampled,
against a baseline whose tracer does nothing at all (as if the code had no spans).

    PYTHONPATH=. .venv/bin/python bench/tracing.py [-n 300] [--docs 400] [--out bench/results/tracing.json]

Method: ``--docs`` synthetic documents (~150 words each) are ingested by the real worker pipeline
(packaged embedding model, FAISS + BM25 snapshots) into a temporary data dir; then
``HybridRetriever.search`` (hybrid, weighted fusion, k=10, query embedding included, the API's
executor hop included) runs ``-n`` times per configuration, the three configurations interleaved
query by query in random order (so load changes on the shared 2-core machine hit them alike),
after a warm-up. The configuration is switched by swapping the tracer the retrieval module uses,
so all three run in one process on the same index. Each search runs inside a request span made
by the same tracer and timed with it (in the API, FastAPIInstrumentor's span of the HTTP request:
``retrieval.search`` is its child). "On" is set up as
``RAG_TELEMETRY__OTLP_ENDPOINT`` sets it up (``core/span_export.py``): finished spans and the
search stages (timed inline, ``retrieval/tracing.py``) go as tuples to the span export process,
which builds, encodes and posts them to an HTTP receiver, which counts what it received; the
receiver runs in its own process, as a collector does. The latency shown is the request's; the
CPU moved to the export process is counted in ``cpu_ms_per_search`` (this process's and the
export process's CPU time over each configuration's block of searches, spans flushed)
is reported too. Also reported: the cost of one no-op span alone (a micro-benchmark).

Two timed runs: back to back (a saturated service, where span work can only run while searches
do) and paced (``--gap-ms`` of pause after each search, a service that is not saturated: span
work runs in the pauses). Prints both tables; writes JSON with medians, p90, means and the
overheads in percent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = [
    "reactor",
    "port",
    "quokka",
    "vault",
    "index",
    "chunk",
    "python",
    "path",
    "join",
    "file",
    "package",
    "install",
    "kernel",
    "module",
    "network",
    "socket",
    "thread",
    "memory",
    "cache",
    "queue",
    "worker",
    "server",
    "client",
    "token",
    "model",
    "search",
    "answer",
    "citation",
    "document",
    "collection",
    "config",
    "restart",
    "backup",
    "storage",
    "volume",
    "cluster",
    "node",
    "service",
    "deploy",
    "image",
    "build",
    "release",
]


class _NullSpan:
    def is_recording(self) -> bool:
        return False

    def set_attribute(self, *_: Any) -> None:
        pass

    def set_attributes(self, *_: Any) -> None:
        pass

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def end(self) -> None:
        pass


class NullTracer:
    """The baseline: a tracer that does nothing, not even a context switch."""

    _span = _NullSpan()

    def start_as_current_span(self, *_: Any, **__: Any) -> _NullSpan:
        return self._span

    def start_span(self, *_: Any, **__: Any) -> _NullSpan:
        return self._span


class _Handler(BaseHTTPRequestHandler):
    """OTLP/HTTP ``POST /v1/traces`` (counted) and ``GET /count`` (how many spans so far)."""

    spans = 0

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        _Handler.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def do_GET(self) -> None:
        body = str(_Handler.spans).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: Any) -> None:
        pass


def serve_otlp() -> None:
    """The receiver process: print the port, then serve until killed."""
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Receiver:
    """An OTLP/HTTP receiver in its own process, as a collector is: decoding the spans it
    receives does not compete with the searches for this process's interpreter lock."""

    def __enter__(self) -> Receiver:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-otlp"], stdout=subprocess.PIPE, text=True, cwd=ROOT
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> int:
        with urllib.request.urlopen(f"{self.url}/count", timeout=10) as response:
            return int(response.read())

    def __exit__(self, *_: object) -> None:
        self.process.kill()
        self.process.wait()


def write_docs(root: Path, count: int) -> None:
    rng = random.Random(7)
    root.mkdir(parents=True)
    for i in range(count):
        text = " ".join(rng.choice(WORDS) for _ in range(150))
        (root / f"doc{i:04d}.txt").write_text(f"Document {i}. {text}\n")


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "median_ms": statistics.median(values) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
    }


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def noop_span_ns(iterations: int = 200_000) -> float:
    from opentelemetry import trace

    tracer = trace.get_tracer("bench")  # no SDK configured: the API's no-op
    started = time.perf_counter_ns()
    for _ in range(iterations):
        with tracer.start_as_current_span("x") as span:
            span.is_recording()
    return (time.perf_counter_ns() - started) / iterations


def compare(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per configuration: latency summary and overheads against ``baseline`` (median and paired)."""
    results = {name: summary(values) for name, values in times.items()}
    base = results["baseline"]["median_ms"]
    for name in ("off", "on", "on-10%"):
        results[name]["overhead_pct_median"] = (results[name]["median_ms"] / base - 1) * 100
        # Paired: the same query, run back to back in both configurations (load cancels out).
        diffs = [(t - b) * 1000 for t, b in zip(times[name], times["baseline"], strict=True)]
        results[name]["paired_median_diff_ms"] = statistics.median(diffs)
        results[name]["overhead_pct_paired"] = statistics.median(diffs) / base * 100
    return results


async def run(n: int, docs: int, gap_ms: float) -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    import retrieval.hybrid as hybrid
    from core.settings import Settings
    from core.wiring import build_retriever, load_query_embedder, open_store
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    span_ns = noop_span_ns()
    with tempfile.TemporaryDirectory() as tmp, Receiver() as receiver:
        data = Path(tmp) / "data"
        write_docs(Path(tmp) / "docs", docs)
        settings = Settings(data_dir=data, database={"url": f"sqlite+aiosqlite:///{data / 'rag.db'}"})
        ctx = await build_ingest_context(settings)
        try:
            job_id, _ = await enqueue_path(ctx.sessionmaker, Path(tmp) / "docs", collection="bench")
            await run_job(ctx, job_id)
            store = ctx.store
        finally:
            await ctx.aclose()
        embedder = load_query_embedder(settings)
        from concurrent.futures import ThreadPoolExecutor

        executor = ThreadPoolExecutor(2)
        legs = ThreadPoolExecutor(2)
        store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
        retriever = build_retriever(settings, store, embedder, executor=executor, leg_executor=legs)

        from core.span_export import SpanShipper
        from retrieval import tracing as stage_spans

        # As configure_tracing sets it up for RAG_TELEMETRY__OTLP_ENDPOINT: spans and search stages
        # go as tuples to the export process, which encodes and posts them.
        processor = SpanShipper(f"{receiver.url}/v1/traces")
        stage_spans.set_stage_sink(processor.ship_stages)
        provider = TracerProvider()
        provider.add_span_processor(processor)
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampled = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))  # RAG_TELEMETRY__SAMPLE_RATIO=0.1
        sampled.add_span_processor(processor)
        tracers = {
            "baseline": NullTracer(),
            "off": trace.get_tracer("retrieval.hybrid"),
            "on": provider.get_tracer("retrieval.hybrid"),
            "on-10%": sampled.get_tracer("retrieval.hybrid"),
        }
        rng = random.Random(11)
        queries = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(n)]

        async def request(tracer: Any, query: str) -> None:
            # As in the API, a search runs inside its request's span (FastAPIInstrumentor's);
            # that span is made inline, so its cost is timed too.
            with tracer.start_as_current_span("POST /v1/search"):
                await retriever.search(query, k=10)

        async def timed(gap: float) -> dict[str, list[float]]:
            times: dict[str, list[float]] = {name: [] for name in tracers}
            order = list(tracers)
            for i, query in enumerate([*queries[:10], *queries]):
                # A fresh random order per query: with a fixed rotation one configuration would always
                # follow "on" and pay for the span work that runs in the gap after it.
                rng.shuffle(order)
                for name in order:
                    hybrid._tracer = tracers[name]  # type: ignore[assignment]
                    started = time.perf_counter()
                    await request(tracers[name], query)
                    if i >= 10:  # the first ten are the warm-up
                        times[name].append(time.perf_counter() - started)
                    if gap:
                        await asyncio.sleep(gap)
            return times

        # Back to back (a saturated service: span work can only run during searches) and paced
        # (a pause after each search, as in a service that is not saturated).
        paced_times = await timed(gap_ms / 1000) if gap_ms else None
        times = await timed(0.0)
        # CPU per search: each configuration in its own block, its spans created and exported
        # before the block's clock stops, so work moved off the request path is still counted,
        # including the export process's.
        cpu_ms: dict[str, float] = {}
        block = queries[: max(20, n // 2)]
        exporter_pid = processor._child.pid
        for name in tracers:
            hybrid._tracer = tracers[name]  # type: ignore[assignment]
            started_cpu = time.process_time() + process_cpu_seconds(exporter_pid)
            for query in block:
                await request(tracers[name], query)
            stage_spans.flush()
            processor.force_flush()
            used = time.process_time() + process_cpu_seconds(exporter_pid) - started_cpu
            cpu_ms[name] = used / len(block) * 1000
        stage_spans.set_stage_sink(None)
        processor.shutdown()
        executor.shutdown()
        legs.shutdown()
        results = compare(times)
        for name, r in results.items():
            r["cpu_ms_per_search"] = cpu_ms[name]
        base = results["baseline"]["median_ms"]
        return {
            "machine": {"cpus": os.cpu_count(), "load": os.getloadavg(), "python": platform.python_version()},
            "docs": docs,
            "chunks": len(store.load("bench") or ()),
            "searches_per_config": n,
            "noop_span_ns": span_ns,
            "spans_per_search": 6,
            "noop_cost_pct_of_median_search": span_ns * 5 / 1e6 / base * 100,
            "spans_received_by_otlp_receiver": receiver.spans,
            "results": results,
            "paced": None if paced_times is None else {"gap_ms": gap_ms, "results": compare(paced_times)},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument(
        "--gap-ms", type=float, default=5.0, help="pause after each search in the paced run (0: no paced run)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tracing.json")
    parser.add_argument("--serve-otlp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_otlp:
        serve_otlp()
        return
    with contextlib.redirect_stdout(sys.stderr):
        report = asyncio.run(run(args.n, args.docs, args.gap_ms))
    print(f"chunks: {report['chunks']}, searches per configuration: {report['searches_per_config']}")
    print(
        f"{'config':<10} {'median ms':>10} {'p90 ms':>8} {'mean ms':>8} {'vs median':>10} {'paired':>9} {'CPU ms':>7}"
    )
    for name, r in report["results"].items():
        overhead = f"{r['overhead_pct_median']:+.1f} %" if "overhead_pct_median" in r else "-"
        paired = f"{r['overhead_pct_paired']:+.1f} %" if "overhead_pct_paired" in r else "-"
        print(
            f"{name:<10} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {r['mean_ms']:>8.2f} {overhead:>10} {paired:>9}"
            f" {r['cpu_ms_per_search']:>7.2f}"
        )
    if report["paced"] is not None:
        print(f"paced ({report['paced']['gap_ms']:g} ms pause after each search):")
        for name, r in report["paced"]["results"].items():
            overhead = f"{r['overhead_pct_median']:+.1f} %" if "overhead_pct_median" in r else "-"
            paired = f"{r['overhead_pct_paired']:+.1f} %" if "overhead_pct_paired" in r else "-"
            print(
                f"{name:<10} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} {r['mean_ms']:>8.2f}"
                f" {overhead:>10} {paired:>9}"
            )
    print(
        f"no-op span: {report['noop_span_ns']:.0f} ns; x{report['spans_per_search']} spans = "
        f"{report['noop_cost_pct_of_median_search']:.3f} % of a median search; "
        f"OTLP receiver got {report['spans_received_by_otlp_receiver']} spans"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
