"""Span export out of the serving process: finished spans go to a child process that speaks OTLP.

Exporting spans in the process that serves requests costs those requests time even when it runs on
a background thread: the SDK's OTLP exporter encodes every span to protobuf in Python (about
30 µs a span on these CPUs) and the search stages' spans are created in Python too (40-60 µs
each), all holding the GIL that a search needs back each time one of its C calls returns (the
embedding model, FAISS, numpy). ``bench/tracing.py`` measured that as +4 % on a search, with the
work already moved to a background thread that runs between searches.

:class:`SpanShipper` keeps only the cheap part here. It is a span processor: each finished span
becomes a tuple of plain values (:func:`span_record`), and the search stages timed by
:mod:`retrieval.tracing` become tuples without ever being SDK spans (:meth:`SpanShipper.ship_stages`).
A feeder thread pickles what accumulated every :data:`SEND_INTERVAL_SECONDS` (one C call per batch)
and writes it to the stdin of a child process (``python -m core.span_exporter_process``), which
rebuilds the spans (:func:`readable_spans`) and exports them with the SDK's ``OTLPSpanExporter``,
on another core and under another GIL, at a lower priority than the service.

Frames on the pipe are a 4-byte big-endian length and a pickled list of records; a zero length asks
the child to export what it has and answer with one byte on its stdout (:meth:`force_flush`).
Closing the pipe ends the child after a last export. The queue is bounded (:data:`MAX_QUEUE`):
when the child cannot keep up, the oldest records are dropped and counted, never the request
held up. If the child dies, spans are dropped (and the loss logged once) until the process
restarts; requests never see an error from tracing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import select
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import SpanProcessor

from retrieval import tracing as stage_spans

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import Span

__all__ = [
    "MAX_QUEUE",
    "SEND_INTERVAL_SECONDS",
    "SpanShipper",
    "readable_spans",
    "span_record",
    "stage_records",
]

log = logging.getLogger(__name__)

SEND_INTERVAL_SECONDS = 0.5
"""How often the feeder sends what accumulated (sooner when :data:`SEND_BATCH` records wait)."""
SEND_BATCH = 512
"""Records that make the feeder send without waiting for the interval."""
MAX_QUEUE = 16_384
"""Records kept while the child is behind; beyond it the oldest are dropped."""

Record = tuple[Any, ...]
"""One span as plain values (see :func:`span_record` for the layout)."""

_SPAN = 0
_STAGES = 1


def span_record(span: ReadableSpan, resource: dict[str, Any]) -> Record:
    """A finished SDK span as a picklable tuple (``resource``: its resource's attributes, shared)."""
    ctx = span.context
    parent = span.parent
    scope = span.instrumentation_scope
    status = span.status
    return (
        _SPAN,
        span.name,
        ctx.trace_id if ctx is not None else 0,
        ctx.span_id if ctx is not None else 0,
        int(ctx.trace_flags) if ctx is not None else 0,
        None if parent is None else (parent.span_id, parent.is_remote),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes) if span.attributes else None,
        (status.status_code.value, status.description),
        [(e.name, e.timestamp, dict(e.attributes) if e.attributes else None) for e in span.events] or None,
        [
            (link.context.trace_id, link.context.span_id, dict(link.attributes) if link.attributes else None)
            for link in span.links
        ]
        or None,
        _scope_record(scope),
        resource,
    )


def _scope_record(scope: Any) -> tuple[Any, ...] | None:
    """An instrumentation scope as the ``InstrumentationScope`` arguments :func:`readable_spans` passes back."""
    return None if scope is None else (scope.name, scope.version, scope.schema_url)


def stage_records(
    parent: Span, stages: Sequence[stage_spans.Stage], resource: dict[str, Any], rooted: bool = False
) -> Record:
    """The timed stages of one operation under ``parent`` (a recording SDK span) as one record.

    ``rooted``: the first stage is the operation's own span and the parent of the others.
    """
    ctx = parent.get_span_context()
    scope = getattr(parent, "instrumentation_scope", None)
    return (
        _STAGES,
        ctx.trace_id,
        ctx.span_id,
        int(ctx.trace_flags),
        list(stages),
        _scope_record(scope),
        resource,
        rooted,
    )


def readable_spans(records: Iterable[Record]) -> list[ReadableSpan]:
    """Rebuild SDK spans from records (in the exporting process); stage spans get fresh span ids."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event
    from opentelemetry.sdk.trace import ReadableSpan as Readable
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

    resources: dict[int, Resource] = {}
    scopes: dict[tuple[Any, ...], InstrumentationScope] = {}

    def resource_of(attributes: dict[str, Any]) -> Resource:
        key = id(attributes)  # unpickled once per batch: records of one resource share the dict
        if key not in resources:
            resources[key] = Resource(attributes)
        return resources[key]

    def scope_of(scope: tuple[Any, ...] | None) -> InstrumentationScope | None:
        if scope is None:
            return None
        if scope not in scopes:
            scopes[scope] = InstrumentationScope(*scope)
        return scopes[scope]

    spans: list[ReadableSpan] = []
    for record in records:
        if record[0] == _SPAN:
            (
                _,
                name,
                trace_id,
                span_id,
                flags,
                parent,
                kind,
                start,
                end,
                attributes,
                status,
                events,
                links,
                scope,
                res,
            ) = record
            trace_flags = TraceFlags(flags)
            spans.append(
                Readable(
                    name=name,
                    context=SpanContext(trace_id, span_id, is_remote=False, trace_flags=trace_flags),
                    parent=None
                    if parent is None
                    else SpanContext(trace_id, parent[0], is_remote=parent[1], trace_flags=trace_flags),
                    resource=resource_of(res),
                    attributes=attributes,
                    events=[Event(n, a, t) for n, t, a in events or ()],
                    links=[
                        Link(SpanContext(t, s, is_remote=True), a)  # a link's flags do not travel in OTLP
                        for t, s, a in links or ()
                    ],
                    kind=SpanKind(kind),
                    status=Status(StatusCode(status[0]), status[1]),
                    start_time=start,
                    end_time=end,
                    instrumentation_scope=scope_of(scope),
                )
            )
        else:
            _, trace_id, parent_id, flags, stages, scope, res, rooted = record
            trace_flags = TraceFlags(flags)
            parent_ctx = SpanContext(trace_id, parent_id, is_remote=False, trace_flags=trace_flags)
            for i, (name, start, end, attributes) in enumerate(stages):
                context = SpanContext(trace_id, random.getrandbits(64) or 1, is_remote=False, trace_flags=trace_flags)
                spans.append(
                    Readable(
                        name=name,
                        context=context,
                        parent=parent_ctx,
                        resource=resource_of(res),
                        attributes=attributes or None,
                        status=stage_spans.stage_status(attributes),
                        start_time=start,
                        end_time=end,
                        instrumentation_scope=scope_of(scope),
                    )
                )
                if rooted and i == 0:
                    parent_ctx = context  # the operation's own span: the other stages are its children
    return spans


class SpanShipper(SpanProcessor):
    """Hands finished spans (and search stages) to a child process that exports them over OTLP/HTTP.

    Install it as the provider's span processor and register :meth:`ship_stages` with
    :func:`retrieval.tracing.set_stage_sink` (``core.wiring.configure_tracing`` does both).
    ``on_end`` and ``ship_stages`` only build a tuple and append it to a queue: no I/O, no lock
    held for longer than an append.
    """

    def __init__(self, endpoint: str, *, timeout_seconds: float = 10.0, max_queue: int = MAX_QUEUE) -> None:
        self._queue: deque[Record] = deque()
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._resources: dict[int, dict[str, Any]] = {}
        self.dropped = 0
        """Records dropped because the queue was full or the child was gone."""
        self._closed = False
        self._timeout = timeout_seconds
        self._flush_requested = 0
        self._flushed = 0
        self._flush_ok = False
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_import_root(), env.get("PYTHONPATH", "")) if p)
        self._child = subprocess.Popen(
            [sys.executable, "-m", "core.span_exporter_process", endpoint, str(timeout_seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._broken = False
        self._thread = threading.Thread(target=self._feed, name="rag-span-shipper", daemon=True)
        self._thread.start()

    # --- the request path: tuples into a queue --------------------------------------------------

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        """Nothing happens when a span starts."""

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished, sampled span."""
        ctx = span.context
        if ctx is None or not ctx.trace_flags.sampled:
            return
        self._put(span_record(span, self._resource(span.resource)))

    def ship_stages(self, parent: Span, stages: Sequence[stage_spans.Stage], rooted: bool = False) -> None:
        """Queue an operation's timed stages as child spans of ``parent`` (a stage sink)."""
        self._put(stage_records(parent, stages, self._resource(getattr(parent, "resource", None)), rooted))

    def _resource(self, resource: Any) -> dict[str, Any]:
        key = id(resource)
        found = self._resources.get(key)
        if found is None:
            found = dict(resource.attributes) if resource is not None else {}
            self._resources[key] = found
        return found

    def _put(self, record: Record) -> None:
        with self._cond:
            if self._closed or self._broken:
                self.dropped += 1
                return
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(record)
            if len(self._queue) >= SEND_BATCH:
                self._cond.notify()

    # --- the feeder thread: batches down the pipe -----------------------------------------------

    def _feed(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._closed or self._flush_requested > self._flushed or len(self._queue) >= SEND_BATCH,
                    SEND_INTERVAL_SECONDS,
                )
                closed = self._closed
                flush = self._flush_requested
            if self._queue:
                if not closed and flush == self._flushed:
                    stage_spans.wait_for_idle(0.1)  # pickling a batch holds the GIL: do it between searches
                with self._cond:
                    batch = list(self._queue)
                    self._queue.clear()
                self._send(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL), len(batch))
            if flush > self._flushed:
                self._send(b"", 0)  # the flush marker: the child answers once it has exported
                ok = self._await_ack()
                with self._cond:
                    self._flushed = flush
                    self._flush_ok = ok
                    self._cond.notify_all()
            if closed:
                return

    def _send(self, payload: bytes, records: int) -> None:
        if self._broken:
            self.dropped += records
            return
        stdin = self._child.stdin
        assert stdin is not None
        try:
            stdin.write(len(payload).to_bytes(4, "big") + payload)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            with self._cond:  # from now on nothing is queued: what waits and what comes is dropped
                self._broken = True
                self.dropped += records + len(self._queue)
                self._queue.clear()
            log.error("the span export process is gone; spans are dropped until the service restarts")

    def _await_ack(self, timeout: float = 30.0) -> bool:
        stdout = self._child.stdout
        if self._broken or stdout is None:
            return False
        ready, _, _ = select.select([stdout], [], [], timeout)
        return bool(ready) and stdout.read(1) == b"1"

    # --- flushing and shutdown ------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send everything queued and wait until the child has exported it."""
        if self._closed or self._broken:
            return False
        with self._cond:
            self._flush_requested += 1
            wanted = self._flush_requested
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._flushed >= wanted, timeout_millis / 1000)
        return done and self._flush_ok

    def shutdown(self) -> None:
        """Send what is queued, let the child export it and exit.

        Bounded: the child gets one export timeout (plus a little) after the pipe closes; a child
        still retrying an unreachable collector then is killed, and its spans are lost.
        """
        if self._closed:
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self._timeout + 5)
        if self._child.stdin is not None:
            with contextlib.suppress(OSError):
                self._child.stdin.close()
        try:
            self._child.wait(timeout=self._timeout + 5)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        if self.dropped:
            log.warning("spans dropped by the span export queue", extra={"dropped": self.dropped})


def _import_root() -> str:
    """The directory that holds the ``core`` package (this checkout or site-packages)."""
    return str(Path(__file__).resolve().parents[1])
