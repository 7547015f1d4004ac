"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: it would buffer streams and break cancellation).

* :class:`RequestContext`: request id (``X-Request-ID`` taken when sane, else generated, and
  echoed), one structured log line per request, request count and latency by route template.
* :class:`BodyLimit`: bounded bodies whatever their framing (413 at the limit, chunked or not),
  JSON that is UTF-8 and not absurdly nested (400), multipart uploads with a length (411).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.input_limits import BadInput, check_json_depth, decode_utf8
from app.observability import Metrics, request_id_var

logger = logging.getLogger("app.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


class RequestContext:
    """Request id, access log and HTTP metrics for every request and websocket."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                ratelimit = scope.get("state", {}).get("ratelimit")
                if ratelimit is not None:  # a key's request window (app.services.admission.RateState)
                    headers.extend(ratelimit.headers())
                message = {**message, "headers": headers}
            elif message["type"] == "websocket.accept":
                status = 101
            elif message["type"] == "websocket.close" and not status:
                status = 403  # closed before the handshake completed
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            route = _route_template(scope)
            method = scope.get("method", "WS")
            metrics: Metrics | None = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
            if metrics is not None:
                metrics.http_requests.labels(method=method, route=route, status=str(status)).inc()
                metrics.http_latency.labels(method=method, route=route).observe(elapsed)
            logger.info(
                "request",
                extra={
                    "method": method,
                    "path": scope.get("path"),
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000.0, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id_var.reset(token)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passes its limit (caught by :class:`BodyLimit`)."""


class BodyLimit:
    """Bounded request bodies, whatever their framing.

    * A declared ``Content-Length`` over the limit is refused before anything is read (413).
    * A body without one (chunked) is counted as it arrives and refused (413) as soon as it passes
      the limit: reading stops there, so a 200 MiB chunked body costs at most the limit in memory.
    * JSON bodies (and bodies without a content type, which FastAPI reads as JSON) must be UTF-8
      and nest at most :data:`~app.api.input_limits.MAX_JSON_DEPTH` levels; anything else is a 400
      with a message, not a reset connection or a recursion failure.
    * Multipart uploads must state their ``Content-Length`` (every HTTP client does for a form
      upload), so their limit holds before the first byte (411 otherwise).
    """

    # Multipart framing (boundaries, part headers) adds a little to the files' own bytes; the
    # exact per-file limit is enforced by the upload service while it copies.
    FRAMING_ALLOWANCE = 1024 * 1024

    def __init__(self, app: ASGIApp, *, max_upload_mb: int, max_json_bytes: int = 8 * 1024 * 1024) -> None:
        self.app = app
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = max_upload_mb * 1024 * 1024 + self.FRAMING_ALLOWANCE
        self.max_json_bytes = max_json_bytes

    def _too_large(self, multipart: bool) -> str:
        if multipart:
            return f"the upload is larger than the limit of {self.max_upload_mb} MB (RAG_API__MAX_UPLOAD_MB)"
        return f"the request body is larger than {self.max_json_bytes // (1024 * 1024)} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type = (_header(scope, b"content-type") or "").lower()
        multipart = content_type.startswith("multipart/")
        limit = self.max_upload_bytes if multipart else self.max_json_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _reject(send, 413, "payload_too_large", self._too_large(multipart))
            return
        if (length is None or not length.isdigit()) and multipart and _header(scope, b"transfer-encoding"):
            await _reject(send, 411, "length_required", "uploads must state their Content-Length")
            return
        if not content_type or "json" in content_type:
            await self._json(scope, receive, send, limit)
            return
        await self._counted(scope, receive, send, limit, multipart)

    async def _json(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Read the whole JSON body (FastAPI would anyway), check it, then hand it on."""
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before the body was complete
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reject(send, 413, "payload_too_large", self._too_large(False))
                return
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        try:
            decode_utf8(body)
            check_json_depth(body)
        except BadInput as e:
            await _reject(send, 400, "invalid_body", str(e))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send, limit: int, multipart: bool) -> None:
        """Pass the body through, refusing it once more than ``limit`` bytes have arrived."""
        size = 0
        started = False

        async def counting() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise _BodyTooLarge
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, tracking)
        except _BodyTooLarge:
            if started:
                raise
            await _reject(send, 413, "payload_too_large", self._too_large(multipart))


class InFlightLimit:
    """Shed load before any work is done: beyond ``limit`` HTTP requests in progress, answer 503
    ``overloaded`` with ``Retry-After`` at once, without reading the body, routing or authenticating.

    The per-kind gates (:mod:`app.services.admission`) decide what may *run*; this decides what the
    event loop even looks at. On a small machine, a burst of hundreds of requests otherwise costs
    the loop its parsing, validation and auth work for each of them before the gates can refuse
    it, and every request on the loop (``/healthz`` included) waits behind that work. The
    operational endpoints are never shed.

    It is the outermost layer, outside the request id and the access log: a burst of 600 searches
    cost the loop ~1.3 ms each, a fifth of it writing an access line per refusal, and a health
    probe waited half a second behind them. A shed request is counted instead
    (``rag_http_shed_total``), and one warning line per :attr:`LOG_EVERY_SECONDS` says how many.
    """

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
    LOG_EVERY_SECONDS = 10.0

    def __init__(self, app: ASGIApp, *, limit: int, retry_after: int = 1) -> None:
        self.app = app
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self._unlogged = 0
        self._logged_at = 0.0

    def _count_shed(self, scope: Scope) -> None:
        metrics: Metrics | None = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if metrics is not None:
            metrics.http_shed.inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= self.LOG_EVERY_SECONDS:
            logger.warning(
                "shedding load: requests refused with 503 overloaded before any work",
                extra={"shed": self._unlogged, "in_flight_limit": self.limit},
            )
            self._unlogged = 0
            self._logged_at = now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self._count_shed(scope)
            await _reject(
                send,
                503,
                "overloaded",
                f"the service is busy ({self.limit} requests in progress); retry shortly",
                retryable=True,
                headers=[(b"retry-after", str(self.retry_after).encode())],
            )
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _reject(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    retryable: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "retryable": retryable}}
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})
