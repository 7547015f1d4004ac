"""Stage spans that cost a request almost nothing: timed inline, created off the request path.

A search has four short stages (query embedding, dense leg, BM25 leg, fusion) of a few
milliseconds in all. Creating an OpenTelemetry SDK span costs 40-60 µs of Python on these CPUs
(measured: ``bench/tracing.py``), so four child spans made inline cost a recorded search 3-6 %
of its latency. :class:`Stages` instead records each stage as two clock readings and a dict of
attributes (about a microsecond), and :meth:`Stages.publish` hands the finished list to one
background thread that creates the spans with their real start and end times under the
recorded parent. The spans carry the same names, parents, timings and attributes as inline
ones; they reach the span processor a moment later.

Moving the work to a thread is not enough on its own: a background thread that holds the GIL
when a search wants it back delays that search by up to the interpreter's switch interval
(5 ms). So the thread creates spans only while no search is running (or once a
backlog has waited :data:`MAX_DELAY_SECONDS`, so spans are never held back for long under steady
load), one span at a time, giving the GIL back between spans.

When the parent span is not recording (no SDK configured, or the trace not sampled) nothing is
timed or queued at all.

A process that exports spans elsewhere can skip span creation here altogether:
:func:`set_stage_sink` installs a callable that receives each operation's parent span and its
stages as plain tuples (``core.span_export.SpanShipper`` sends them to its export process, which
builds the spans there). The background thread then stays idle.

:func:`flush` waits until every published stage has become a span: the process's tracing
shutdown calls it before flushing the exporter, and tests call it before reading spans.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

__all__ = [
    "ERROR_TYPE",
    "MAX_DELAY_SECONDS",
    "Stage",
    "StageSink",
    "Stages",
    "current_stage_sink",
    "flush",
    "set_stage_sink",
    "stage_status",
    "wait_for_idle",
]

log = logging.getLogger(__name__)

Stage = tuple[str, int, int, dict[str, Any]]
"""One timed stage: span name, start and end (ns since the epoch), attributes."""
StageSink = Callable[[trace.Span, list[Stage], bool], None]
"""Receives an operation's recording parent span, its finished stages and whether the first of
them is the operation's own span, the parent of the others (see :func:`set_stage_sink`)."""

_sink: StageSink | None = None

ERROR_TYPE = "error.type"
"""Attribute naming the exception that failed an operation (its span's status is then an error)."""


def stage_status(attributes: dict[str, Any]) -> trace.Status:
    """A stage span's status: an error when :data:`ERROR_TYPE` is among its attributes, else unset."""
    failure = attributes.get(ERROR_TYPE)
    return (
        trace.Status(trace.StatusCode.UNSET) if failure is None else trace.Status(trace.StatusCode.ERROR, str(failure))
    )


MAX_DELAY_SECONDS = 0.5
"""Longest a published stage waits for a moment with no recorded operation running."""


class Stages:
    """The timed stages of one operation under ``parent`` (the current span by default).

    Use :meth:`stage` around each stage and call :meth:`publish` once when the operation ends
    (also when it failed: the stages that finished are still worth seeing). Thread-safe for
    stages running on different threads (appending to a list is atomic). Until it is published,
    an instance counts as a running operation (recorded or not), and span work waits for it.

    With ``root``, the operation itself becomes a span of that name too, from this object's
    creation to :meth:`publish`, with :attr:`root_attributes`, and the stages become its
    children: under a request's span the cost of one more SDK span (~50 µs) leaves the request
    path as well. Outside any trace the operation starts one with a real span made at once (the
    tracer's sampler must decide). :meth:`fail` marks it failed (status error, ``error.type``).
    """

    __slots__ = ("_context", "_open", "_own", "_parent", "_root", "_stages", "_tracer")

    def __init__(self, tracer: trace.Tracer, parent: trace.Span | None = None, *, root: str | None = None) -> None:
        span = parent if parent is not None else trace.get_current_span()
        self._own: trace.Span | None = None
        self._root: Stage | None = None
        if root is not None and not span.get_span_context().is_valid:
            # No trace to join (an operation outside any request): it starts one, as a real span
            # made now, so that the tracer's sampler decides.
            own = tracer.start_span(root)
            if own.is_recording():
                self._own = span = own
                self._root = (root, 0, 0, {})
        self._tracer = tracer
        self._parent = span
        self._context = trace.set_span_in_context(span) if span.is_recording() else None
        self._stages: list[Stage] = []
        if root is not None and self._context is not None and self._root is None:
            self._root = (root, time.time_ns(), 0, {})
        # Every operation counts, recorded or not: an unsampled search is just as slowed down by
        # a span thread holding the GIL.
        self._open = True
        _emitter.started()

    @property
    def root_attributes(self) -> dict[str, Any]:
        """The attributes of the operation's own span (a throwaway dict when there is none)."""
        return self._root[3] if self._root is not None else {}

    def fail(self, error: BaseException) -> None:
        """Mark the operation's own span failed (its status becomes an error)."""
        if self._root is not None:
            self._root[3][ERROR_TYPE] = type(error).__qualname__

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
        """Queue the recorded stages for span creation (a no-op when nothing was recorded).

        Call it once: it also ends this operation's claim on the span thread's idle time.
        """
        rooted = self._root is not None and self._own is None
        if self._own is not None and self._root is not None:
            attributes = self._root[3]
            self._own.set_attributes(attributes)
            self._own.set_status(stage_status(attributes))
            self._own.end()
            self._root = self._own = None
        elif self._root is not None:
            name, started, _, attributes = self._root
            self._stages.insert(0, (name, started, time.time_ns(), attributes))
            self._root = None
        if self._context is not None and self._stages:
            sink = _sink
            if sink is not None:
                try:
                    sink(self._parent, self._stages, rooted)
                except Exception:  # tracing must never fail the operation it observes
                    log.exception("could not hand stage spans to the sink")
            else:
                _emitter.submit(self._tracer, self._context, self._stages, rooted)
            self._stages = []
        if self._open:
            self._open = False
            _emitter.finished()


class _Emitter:
    """One daemon thread that turns published stages into spans, in publication order, while idle."""

    def __init__(self) -> None:
        self._queue: deque[tuple[trace.Tracer, otel_context.Context, list[Stage], bool, float]] = deque()
        self._cond = threading.Condition()
        self._busy = 0
        self._running = 0  # operations in progress (Stages created, not yet published)
        self._thread: threading.Thread | None = None

    def started(self) -> None:
        with self._cond:
            self._running += 1

    def finished(self) -> None:
        with self._cond:
            self._running -= 1
            if not self._running and self._queue:
                self._cond.notify_all()

    def submit(self, tracer: trace.Tracer, ctx: otel_context.Context, stages: list[Stage], rooted: bool) -> None:
        with self._cond:
            self._queue.append((tracer, ctx, stages, rooted, time.monotonic() + MAX_DELAY_SECONDS))
            self._busy += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="rag-stage-spans", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def wait_for_idle(self, timeout: float) -> None:
        with self._cond:
            self._idle(time.monotonic() + timeout)

    def _idle(self, deadline: float) -> None:
        """Wait (holding the condition) until no operation runs, or until ``deadline``."""
        remaining = deadline - time.monotonic()
        if self._running and remaining > 0:
            self._cond.wait_for(lambda: not self._running, remaining)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                tracer, ctx, stages, rooted, deadline = self._queue.popleft()
            try:
                parent = ctx
                for i, (name, started, ended, attributes) in enumerate(stages):
                    with self._cond:
                        self._idle(deadline)
                    span = tracer.start_span(name, context=parent, start_time=started, attributes=attributes or None)
                    span.set_status(stage_status(attributes))
                    span.end(end_time=ended)
                    if rooted and i == 0:
                        parent = trace.set_span_in_context(span, ctx)  # the other stages are its children
                    time.sleep(0)  # give the GIL back: a search may be waiting for it
            except Exception:  # a broken exporter must not stop the spans of later requests
                log.exception("could not record stage spans")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()


_emitter = _Emitter()


def set_stage_sink(sink: StageSink | None) -> None:
    """Send every published operation's stages to ``sink`` instead of making spans here (``None``: back to spans).

    The sink is called on the thread that publishes, once per operation: it must be quick and
    must not block (queue the tuples, as ``core.span_export.SpanShipper.ship_stages`` does).
    """
    global _sink
    _sink = sink


def current_stage_sink() -> StageSink | None:
    """The installed stage sink (``None``: stages become SDK spans on the background thread)."""
    return _sink


def flush(timeout: float = 5.0) -> bool:
    """Wait until every published stage is a span; ``False`` if ``timeout`` seconds passed first."""
    return _emitter.flush(timeout)


def wait_for_idle(timeout: float = MAX_DELAY_SECONDS) -> None:
    """Block until no search is running, or ``timeout`` seconds (for other span work).

    The span exporter calls it between slices of a batch, so that encoding spans (tens of µs
    each, holding the GIL) happens between searches rather than inside them.
    """
    _emitter.wait_for_idle(timeout)
