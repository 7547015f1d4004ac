"""Stage spans that cost a request almost nothing: timed inline, created off the request path.

A search has four short stages (query embedding, dense leg, BM25 leg, fusion) of a few
milliseconds in all. Creating an OpenTelemetry SDK span costs 40-60 µs of Python on these CPUs
(measured: ``bench/tracing.py``), so four child spans made inline cost a recorded search 3-6 %
of its latency. :class:`Stages` instead records each stage as two clock readings and a dict of
attributes (about a microsecond), and :meth:`Stages.publish` hands the finished list to one
background thread that creates the spans with their real start and end times under the
recorded parent. The spans carry the same names, parents, timings and attributes as inline
ones; they reach the span processor a moment later.

When the parent span is not recording (no SDK configured, or the trace not sampled) nothing is
timed or queued at all.

:func:`flush` waits until every published stage has become a span: the process's tracing
shutdown calls it before flushing the exporter, and tests call it before reading spans.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

__all__ = ["Stages", "flush"]

log = logging.getLogger(__name__)

_Stage = tuple[str, int, int, dict[str, Any]]


class Stages:
    """The timed stages of one operation under ``parent`` (the current span by default).

    Use :meth:`stage` around each stage and call :meth:`publish` once when the operation ends
    (also when it failed: the stages that finished are still worth seeing). Thread-safe for
    stages running on different threads (appending to a list is atomic).
    """

    __slots__ = ("_context", "_stages", "_tracer")

    def __init__(self, tracer: trace.Tracer, parent: trace.Span | None = None) -> None:
        span = parent if parent is not None else trace.get_current_span()
        self._tracer = tracer
        self._context = trace.set_span_in_context(span) if span.is_recording() else None
        self._stages: list[_Stage] = []

    @property
    def recording(self) -> bool:
        """Whether stages become spans (the parent is recording)."""
        return self._context is not None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; the yielded dict becomes its span's attributes (ignored when not recording)."""
        attributes: dict[str, Any] = {}
        if self._context is None:
            yield attributes
            return
        started = time.time_ns()
        try:
            yield attributes
        finally:
            self._stages.append((name, started, time.time_ns(), attributes))

    def publish(self) -> None:
        """Queue the recorded stages for span creation (a no-op when nothing was recorded)."""
        if self._context is not None and self._stages:
            _emitter.submit(self._tracer, self._context, self._stages)
            self._stages = []


class _Emitter:
    """One daemon thread that turns published stages into spans, in publication order."""

    def __init__(self) -> None:
        self._queue: deque[tuple[trace.Tracer, otel_context.Context, list[_Stage]]] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._thread: threading.Thread | None = None

    def submit(self, tracer: trace.Tracer, ctx: otel_context.Context, stages: list[_Stage]) -> None:
        with self._cond:
            self._queue.append((tracer, ctx, stages))
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rag-stage-spans", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                tracer, ctx, stages = self._queue.popleft()
            try:
                for name, started, ended, attributes in stages:
                    span = tracer.start_span(name, context=ctx, start_time=started, attributes=attributes or None)
                    span.end(end_time=ended)
            except Exception:  # a broken exporter must not stop the spans of later requests
                log.exception("could not record stage spans")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()


_emitter = _Emitter()


def flush(timeout: float = 5.0) -> bool:
    """Wait until every published stage is a span; ``False`` if ``timeout`` seconds passed first."""
    return _emitter.flush(timeout)
