"""The websocket chat protocol of ``/v1/chat`` (documented in ``docs/websocket.md``).

One :class:`ChatSocket` per connection:

* authenticates from the ``Authorization`` header, the ``api_key`` query parameter, or a first
  ``{"type": "auth", "api_key"}`` message (browsers cannot set headers), then sends ``ready``;
* reads client messages in one loop and runs each ``ask`` in a task of its own, keyed by its
  ``id``, so several questions may be in flight; their events are sent with the ``id`` added;
* ``watch_job`` follows an ingestion job the same way (its ``file``/``progress``/``job_end``
  events, from :mod:`app.api.job_events`, with the ``id`` added);
* ``cancel`` cancels that task: the answer generator is closed, which closes the upstream model
  request, and the ask (or watch) ends with an ``error`` event of code ``cancelled``;
* a disconnect cancels every task the same way;
* a malformed message gets an ``error`` event (with the ``id`` when one could be read); the
  socket stays open;
* ``ping`` gets ``pong``; an idle socket gets ``{"type": "ping"}`` every ``ws_ping_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.api import answering, job_events
from app.api.deps import principal_for_token
from app.api.errors import error_event
from app.api.input_limits import BadInput, check_json_depth, decode_utf8
from app.resources import Resources
from app.schemas.events import wire_dict
from app.schemas.websocket import ClientMessage, WsAsk, WsAuth, WsCancel, WsPing, WsWatchJob
from app.services.errors import Unauthorized
from app.services.keys import Principal
from generation.client import aclosing_iter

logger = logging.getLogger(__name__)

_CLIENT_MESSAGE: TypeAdapter[WsAsk | WsWatchJob | WsCancel | WsPing | WsAuth] = TypeAdapter(ClientMessage)
POLICY_VIOLATION = 1008

_tracer = trace.get_tracer(__name__)


def bearer_token(ws: WebSocket) -> str | None:
    """The API key from the ``Authorization: Bearer`` header or the ``api_key`` query parameter."""
    header = ws.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ws.query_params.get("api_key") or None


def _error(code: str, message: str, *, id: str | None = None, retryable: bool = False) -> dict[str, Any]:
    return {"type": "error", "id": id, "code": code, "message": message, "retryable": retryable}


class ChatSocket:
    """One websocket connection speaking the chat protocol."""

    def __init__(self, ws: WebSocket, resources: Resources) -> None:
        self.ws = ws
        self.resources = resources
        self.settings = resources.settings
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._started: set[str] = set()
        """Ids whose answer task has begun running (a task cancelled before that never runs)."""
        self._send_lock = asyncio.Lock()
        self._last_sent = asyncio.get_running_loop().time()
        self._revoked = False

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message (serialized: tasks share the socket)."""
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        async with self._send_lock:
            if WebSocketState.DISCONNECTED in (self.ws.application_state, self.ws.client_state):
                raise WebSocketDisconnect(1006)
            await self.ws.send_text(text)
            self._last_sent = asyncio.get_running_loop().time()

    async def serve(self) -> None:
        """Run the connection until the client leaves."""
        await self.ws.accept()
        self.resources.metrics.websockets_open.inc()
        pinger = asyncio.create_task(self._ping())
        watcher: asyncio.Task[None] | None = None
        try:
            authenticated = await self._authenticate()
            if authenticated is None:
                return
            principal, token = authenticated
            await self.send({"type": "ready", "principal": principal.name})
            if self.settings.auth.enabled:
                watcher = asyncio.create_task(self._watch_key(token, asyncio.current_task()))
            await self._loop(principal)
        except WebSocketDisconnect:
            pass
        except asyncio.CancelledError:
            if not self._revoked:
                raise  # cancelled from outside, not by a revoked key
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        finally:
            pinger.cancel()
            if watcher is not None:
                watcher.cancel()
            tasks = list(self.tasks.values())
            for task in tasks:
                task.cancel()
            # Wait for the cancelled answers to close their upstream requests.
            await asyncio.gather(pinger, *tasks, return_exceptions=True)
            self.resources.metrics.websockets_open.dec()

    async def _receive(self) -> str | BadInput | None:
        """The next text (or UTF-8 bytes) message; ``None`` when the client has gone.

        A message that cannot be read as JSON text (not UTF-8, nested too deep) comes back as the
        :class:`BadInput` that says why, so the loop answers it with an ``error`` event.
        """
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None
        try:
            if message.get("text") is not None:
                text = str(message["text"])
                check_json_depth(text.encode("utf-8", "surrogatepass"))
                return text
            data = message.get("bytes") or b""
            check_json_depth(data)
            return decode_utf8(data)
        except BadInput as e:
            return e

    async def _watch_key(self, token: str | None, connection: asyncio.Task[Any] | None) -> None:
        """Check the key again every ``auth.recheck_seconds``; once it is revoked (or deleted), send
        an ``unauthorized`` error, close the socket with 1008 and cancel the connection's work."""
        while True:
            await asyncio.sleep(self.settings.auth.recheck_seconds)
            try:
                await principal_for_token(self.resources, token)
            except Unauthorized as e:
                self._revoked = True
                await self._refuse("unauthorized", e.message)
                if connection is not None:
                    connection.cancel()
                return
            except Exception:  # the database blinked: keep the socket, check again next time
                logger.warning("could not re-check a websocket's API key", exc_info=True)

    async def _authenticate(self) -> tuple[Principal, str | None] | None:
        token = bearer_token(self.ws)
        if self.settings.auth.enabled and token is None:
            try:
                raw = await asyncio.wait_for(self._receive(), self.settings.api.ws_auth_timeout_seconds)
            except TimeoutError:
                raw = ""
            if raw is None:
                return None
            try:
                first = None if isinstance(raw, BadInput) else _CLIENT_MESSAGE.validate_json(raw)
            except ValidationError:
                first = None
            if not isinstance(first, WsAuth):
                await self._refuse("unauthorized", 'send {"type": "auth", "api_key": "rag_..."} first')
                return None
            token = first.api_key
        try:
            return await principal_for_token(self.resources, token), token
        except Unauthorized as e:
            await self._refuse("unauthorized", e.message)
            return None

    async def _refuse(self, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(_error(code, message))
            await self.ws.close(code=POLICY_VIOLATION, reason=code)

    async def _ping(self) -> None:
        interval = self.settings.api.ws_ping_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, self._last_sent + interval - loop.time()))
            if loop.time() - self._last_sent >= interval:
                try:
                    await self.send({"type": "ping"})
                except Exception:
                    return

    async def _loop(self, principal: Principal) -> None:
        while True:
            raw = await self._receive()
            if raw is None:
                return
            if isinstance(raw, BadInput):
                await self.send(_error("invalid_message", f"invalid message: {raw}"))
                continue
            try:
                message = _CLIENT_MESSAGE.validate_json(raw)
            except ValidationError as e:
                await self.send(_invalid(raw, e))
                continue
            if isinstance(message, WsPing):
                await self.send({"type": "pong"})
            elif isinstance(message, WsAuth):
                await self.send({"type": "ready", "principal": principal.name})
            elif isinstance(message, WsCancel):
                task = self.tasks.get(message.id)
                if task is None:
                    await self.send(_error("not_found", f"no answer in flight with id {message.id!r}", id=message.id))
                else:
                    task.cancel()
                    if message.id not in self._started:
                        # Cancelled before its first step, the task never runs its own handler:
                        # the promised terminal event is sent here.
                        self.tasks.pop(message.id, None)
                        await self.send(_error("cancelled", "the answer was cancelled", id=message.id))
            elif message.id in self.tasks:
                await self.send(_error("conflict", f"an answer with id {message.id!r} is in flight", id=message.id))
            elif len(self.tasks) >= self.settings.api.ws_max_in_flight:
                await self.send(
                    _error(
                        "too_many_requests",
                        f"at most {self.settings.api.ws_max_in_flight} answers in flight per socket",
                        id=message.id,
                        retryable=True,
                    )
                )
            elif isinstance(message, WsWatchJob):
                self.tasks[message.id] = asyncio.create_task(self._follow(principal, message))
            else:
                self.tasks[message.id] = asyncio.create_task(self._answer(principal, message))

    async def _answer(self, principal: Principal, ask: WsAsk) -> None:
        self._started.add(ask.id)
        # One trace per question (a socket lives for many): a new root span, linked to the
        # connection's span when tracing is on.
        link = trace.get_current_span().get_span_context()
        with _tracer.start_as_current_span(
            "websocket ask",
            context=otel_context.Context(),
            kind=trace.SpanKind.SERVER,
            links=[trace.Link(link)] if link.is_valid else None,
            attributes={"rag.request_id": ask.id},
        ):
            await self._answer_traced(principal, ask)

    async def _answer_traced(self, principal: Principal, ask: WsAsk) -> None:
        try:
            self.resources.admission.keys.hit(principal)  # a question counts like a REST request
            plan = await answering.prepare(self.resources, principal, ask)
            events = answering.events(self.resources, plan, principal, transport="websocket")
            async with aclosing_iter(events) as stream:
                async for event in stream:
                    await self.send({"id": ask.id, **wire_dict(event)})
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.send(_error("cancelled", "the answer was cancelled", id=ask.id))
            raise
        except WebSocketDisconnect:
            pass
        except Exception as exc:  # every failure ends this ask with an error event
            with contextlib.suppress(Exception):
                await self.send({"id": ask.id, **wire_dict(error_event(exc))})
        finally:
            self.tasks.pop(ask.id, None)
            self._started.discard(ask.id)

    async def _follow(self, principal: Principal, watch: WsWatchJob) -> None:
        """Send a job's events until its ``job_end`` (or an ``error``); holds no connection in between."""
        self._started.add(watch.id)
        try:
            await job_events.check_visible(self.resources, principal, watch.job_id)
            events = job_events.job_events(self.resources, principal, watch.job_id, after=watch.after)
            async with aclosing_iter(events) as stream:
                async for _event_id, event in stream:
                    await self.send({"id": watch.id, **event.model_dump(mode="json")})
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.send(_error("cancelled", "the job watch was cancelled (the job goes on)", id=watch.id))
            raise
        except WebSocketDisconnect:
            pass
        except Exception as exc:  # a missing job, a database error: this watch ends with an error event
            with contextlib.suppress(Exception):
                await self.send({"id": watch.id, **wire_dict(error_event(exc))})
        finally:
            self.tasks.pop(watch.id, None)
            self._started.discard(watch.id)


def _invalid(raw: str, exc: ValidationError) -> dict[str, Any]:
    """An ``error`` event for a malformed message, with its ``id`` when it has a readable one."""
    request_id: str | None = None
    with contextlib.suppress(ValueError, AttributeError):
        data = json.loads(raw)
        candidate = data.get("id") if isinstance(data, dict) else None
        request_id = candidate if isinstance(candidate, str) and len(candidate) <= 64 else None
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'message'}: {err['msg']}" for err in exc.errors()[:5]
    )
    return _error("invalid_message", f"invalid message: {problems}", id=request_id)
