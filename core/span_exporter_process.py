"""The child process behind :class:`core.span_export.SpanShipper`: reads span records, exports OTLP.

    python -m core.span_exporter_process ENDPOINT TIMEOUT_SECONDS

Reads frames from stdin (a 4-byte big-endian length, then a pickled list of records; length 0 asks
for a flush, answered with ``b"1"`` on stdout once everything received has been exported), rebuilds
the spans and exports them with the SDK's ``OTLPSpanExporter`` in batches of :data:`EXPORT_BATCH`.
Ends after a last export when stdin closes (the service shut down or died). It runs at a lower
priority than the service and ignores Ctrl-C (the terminal sends it to the whole process group;
the service's own shutdown closes the pipe once its last spans are sent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from typing import BinaryIO

from core.span_export import readable_spans

EXPORT_BATCH = 512
"""Spans per OTLP request (the SDK's ``BatchSpanProcessor`` default)."""

log = logging.getLogger("core.span_exporter_process")


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(endpoint: str, timeout_seconds: float, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Export every frame read from ``stdin`` until it closes."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, timeout=timeout_seconds)
    try:
        while True:
            header = _read_exactly(stdin, 4)
            if header is None:
                return
            size = int.from_bytes(header, "big")
            if size == 0:
                stdout.write(b"1")
                stdout.flush()
                continue
            payload = _read_exactly(stdin, size)
            if payload is None:
                return
            try:
                spans = readable_spans(pickle.loads(payload))
            except Exception:  # one bad batch must not end the export of the next ones
                log.exception("could not decode a batch of spans")
                continue
            for start in range(0, len(spans), EXPORT_BATCH):
                exporter.export(spans[start : start + EXPORT_BATCH])  # failures are logged by the SDK
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated


def main() -> None:
    """Entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(5)
    logging.basicConfig(level=logging.WARNING, format="span-exporter: %(levelname)s %(message)s")
    endpoint, timeout = sys.argv[1], float(sys.argv[2])
    serve(endpoint, timeout, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
