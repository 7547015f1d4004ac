"""Metrics, structured logs and request ids of the API process.

* :class:`Metrics` owns one Prometheus registry per app (tests build many apps in one process).
* :func:`configure_logging` makes every log record one JSON line, with the request id of the
  request being served (a context variable set by the request-id middleware).
* :class:`TimedEmbedder` times query embeddings (the first half of the dense leg) without
  touching the retrieval package.

Nothing here is configured at import time; ``rag serve`` calls :func:`configure_logging`.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from retrieval.types import Embedder

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Latency buckets (seconds) from sub-millisecond searches to minute-long answers.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class Metrics:
    """The service's Prometheus metrics, in a registry of their own.

    Names follow Prometheus conventions (``_seconds``, ``_total``); the HTTP metrics are
    labelled by route template (``/v1/collections/{name}``), never by raw path, so label
    cardinality stays bounded.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "rag_http_requests",
            "HTTP requests by route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_shed = Counter(
            "rag_http_shed",
            "HTTP requests refused (503 overloaded) before any work because too many were in progress;"
            " not in rag_http_requests_total or the access log.",
            registry=r,
        )
        self.http_latency = Histogram(
            "rag_http_request_duration_seconds",
            "Time to the end of the response (streams: the whole stream).",
            ["method", "route"],
            buckets=_SLOW,
            registry=r,
        )
        self.retrieval_latency = Histogram(
            "rag_retrieval_duration_seconds",
            "Retrieval latency per leg: 'embed' is query embedding (the dense leg's model call); "
            "'dense', 'sparse' and 'hybrid' are whole searches in that mode.",
            ["leg"],
            buckets=_FAST,
            registry=r,
        )
        self.ttft = Histogram(
            "rag_answer_ttft_seconds",
            "Time from the answer request to its first answer token.",
            ["mode", "transport"],
            buckets=_SLOW,
            registry=r,
        )
        self.answer_latency = Histogram(
            "rag_answer_duration_seconds", "Whole answers.", ["mode", "transport"], buckets=_SLOW, registry=r
        )
        self.answers = Counter(
            "rag_answers", "Answers by outcome (done, error code, cancelled).", ["mode", "outcome"], registry=r
        )
        self.tokens_generated = Counter(
            "rag_tokens_generated", "Completion tokens generated for answers.", ["mode"], registry=r
        )
        self.prompt_tokens = Counter("rag_prompt_tokens", "Prompt tokens sent to the model.", ["mode"], registry=r)
        self.streams_open = Gauge("rag_streams_open", "Answer streams (SSE and websocket) in progress.", registry=r)
        self.websockets_open = Gauge("rag_websockets_open", "Open websocket connections.", registry=r)
        self.ingest_jobs = Gauge(
            "rag_ingest_jobs", "Ingestion jobs by status (read from the database).", ["status"], registry=r
        )
        self.ingest_files_seen = Gauge(
            "rag_ingest_running_files_seen", "Files processed so far by running ingestion jobs.", registry=r
        )
        self.ingest_files_total = Gauge(
            "rag_ingest_running_files_total", "Files to process by running ingestion jobs.", registry=r
        )
        self.ingest_progress = Gauge(
            "rag_ingest_running_progress", "Mean progress (0-1) of running ingestion jobs.", registry=r
        )
        self.loop_lag = Histogram(
            "rag_event_loop_lag_seconds",
            "How late the event loop woke a 100 ms timer: time the loop was blocked by something.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "rag_event_loop_lag_max_seconds", "Largest event-loop lag of the last 10 to 20 seconds.", registry=r
        )

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class TimedEmbedder:
    """An :class:`~retrieval.types.Embedder` that records query-embedding latency.

    Delegates everything to ``inner``; only :meth:`embed_query` is timed (documents are
    embedded by the worker, not here).
    """

    def __init__(self, inner: Embedder, histogram: Histogram) -> None:
        self._inner = inner
        self._histogram = histogram.labels(leg="embed")

    @property
    def inner(self) -> Embedder:
        """The wrapped embedder."""
        return self._inner

    @property
    def model_id(self) -> str:
        return self._inner.model_id

    @property
    def dimension(self) -> int:
        return self._inner.dimension

    def embed_documents(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return self._inner.embed_documents(texts)

    def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        start = time.perf_counter()
        try:
            return self._inner.embed_query(text)
        finally:
            self._histogram.observe(time.perf_counter() - start)

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)


# Attributes every LogRecord has; anything else was passed with ``extra=`` and is logged as a field.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


# Credentials that can reach a log line: an API key in a query string (browsers' websockets send
# ``?api_key=``; uvicorn logs the websocket's path with it), a bearer header echoed in an error,
# or a token itself. Every log line goes through :func:`redact_secrets`.
_SECRET_PATTERNS = (
    re.compile(r"(?i)((?:api_key|api-key|apikey|token|access_token)=)[^&\s\"']+"),
    re.compile(r"(?i)(bearer\s+)[^\s\"',]+"),
    re.compile(r"()\brag_[A-Za-z0-9_-]{8,}"),
)


def redact_secrets(text: str) -> str:
    """``text`` with API keys and bearer tokens replaced by ``[REDACTED]``."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1[REDACTED]", text)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, ``extra`` fields.

    The whole line passes through :func:`redact_secrets`: no credential reaches a log.
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            out["request_id"] = request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:  # only while tracing is on: the no-op tracer's spans are invalid
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return redact_secrets(json.dumps(out, default=str, ensure_ascii=False))


def configure_logging(level: str = "info") -> None:
    """Route every logger (ours, uvicorn's, SQLAlchemy's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Our middleware logs one line per request; uvicorn's access log would duplicate it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for noisy in ("sentence_transformers", "transformers", "httpx", "httpcore", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


async def watch_loop_lag(metrics: Metrics, *, interval: float = 0.1, window: float = 10.0) -> None:
    """Measure event-loop lag until cancelled: sleep ``interval`` and record how late the wake-up came.

    A late wake-up means something held the loop (synchronous I/O, a large JSON encode, GIL-heavy
    work in a thread): the delay every other request on the loop suffered at that moment.
    """
    loop = asyncio.get_running_loop()
    worst = previous = 0.0
    window_started = loop.time()
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - before - interval)
        metrics.loop_lag.observe(lag)
        worst = max(worst, lag)
        metrics.loop_lag_max.set(max(worst, previous))  # a new worst shows at once
        if loop.time() - window_started >= window:
            previous, worst, window_started = worst, 0.0, loop.time()
