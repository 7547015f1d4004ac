"""An OTLP span exporter that encodes between searches, not during them.

The SDK's ``BatchSpanProcessor`` hands its exporter up to 512 spans at once; the OTLP exporter
encodes them to protobuf in Python (about 30 µs a span on these CPUs) holding the GIL, so a
search that wants the GIL back meanwhile waits for the interpreter's switch interval again and
again. :class:`IdleFirstExporter` cuts a batch into slices and, before each slice, waits until
no recorded search is running (:func:`retrieval.tracing.wait_for_idle`, bounded), so the
encoding happens in the gaps between searches. Under steady load the wait times out and the
slice is exported anyway: spans are delayed, never dropped by this wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from retrieval import tracing as stage_spans

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

SLICE = 32
"""Spans encoded and sent per request: about 1 ms of encoding, short enough to fit between searches."""


class IdleFirstExporter(SpanExporter):
    """Exports through ``inner`` in slices of :data:`SLICE` spans, each started while searches are idle."""

    def __init__(self, inner: SpanExporter, *, max_wait_seconds: float = stage_spans.MAX_DELAY_SECONDS) -> None:
        self.inner = inner
        self.max_wait_seconds = max_wait_seconds

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export every slice; ``FAILURE`` if any slice failed (the others are still sent)."""
        result = SpanExportResult.SUCCESS
        for start in range(0, len(spans), SLICE):
            stage_spans.wait_for_idle(self.max_wait_seconds)
            if self.inner.export(spans[start : start + SLICE]) is not SpanExportResult.SUCCESS:
                result = SpanExportResult.FAILURE
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)
