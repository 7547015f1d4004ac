"""Server-Sent Events with keep-alive pings and cancellation on disconnect.

:class:`EventPump` runs an answer's event iterator in a task of its own, feeding a small
queue, so the writer can wait with a timeout (and send a ping comment when the model is
slow) and can stop the producer at any time. Cancelling the producer raises
``CancelledError`` inside the answer generator, whose ``aclosing`` blocks close the upstream
model request: a client that goes away stops generation at once (vLLM's ``with_cancellation``
idea).

:class:`SSEResponse` writes the stream and, whatever the ASGI server's spec version, watches
``receive()`` for ``http.disconnect`` and cancels the writer (Starlette only does so for
servers older than ASGI 2.4; with 2.4 a disconnect is noticed at the next write, which can be
a ping interval away).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PING = b": ping\n\n"


class _End:
    pass


_END = _End()


class EventPump(Generic[T]):
    """Runs ``events`` in a task; :meth:`get` waits for the next item with a timeout.

    The producer stops (and its ``finally`` blocks run) when the iterator ends, when
    :meth:`aclose` is called, or when the task that owns the pump is cancelled and closes it.
    An exception of the producer is re-raised by :meth:`get`.
    """

    def __init__(self, events: AsyncIterator[T], *, maxsize: int = 256) -> None:
        self._events = events
        self._queue: asyncio.Queue[T | _End | BaseException] = asyncio.Queue(maxsize=maxsize)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> EventPump[T]:
        """Start producing (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._produce())
        return self

    async def _produce(self) -> None:
        try:
            async for event in self._events:
                await self._queue.put(event)
        except Exception as exc:  # handed to the consumer, which decides
            await self._queue.put(exc)
            return
        finally:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
        await self._queue.put(_END)

    async def get(self, wait: float | None = None) -> T | None:
        """The next event; ``None`` after ``wait`` seconds without one.

        Raises:
            StopAsyncIteration: The producer finished.
            Exception: Whatever the producer raised.
        """
        self.start()
        try:
            item = await asyncio.wait_for(self._queue.get(), wait)
        except TimeoutError:
            return None
        if isinstance(item, _End):
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Cancel the producer and wait until its cleanup (closing the upstream request) is done."""
        task = self._task
        if task is None:
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
            return
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def sse_event(name: str, data: dict[str, Any] | str, *, event_id: int | str | None = None) -> bytes:
    """One SSE frame (``data`` is sent as one line of JSON, or as is when a string).

    ``event_id`` becomes the frame's ``id:`` line: a reconnecting ``EventSource`` sends the last
    one back as ``Last-Event-ID``.
    """
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {name}\n" if name else ""
    if event_id is not None:
        head += f"id: {event_id}\n"
    return f"{head}data: {payload}\n\n".encode()


class SSEResponse(Response, Generic[T]):
    """Streams ``pump``'s events as SSE frames, pinging every ``ping_seconds`` of silence.

    Args:
        pump: The events (started or not).
        encode: Turns one event into the bytes of its frame(s).
        ping_seconds: Idle time before a ``: ping`` comment.
        prefix: Events already taken from the pump (sent first).
        suffix: Frames written after the last event (e.g. ``data: [DONE]``).
        on_error: Frames to send when the producer raised (the stream must not end silently).
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        pump: EventPump[T],
        *,
        encode: Callable[[T], bytes],
        ping_seconds: float,
        prefix: Iterable[T] = (),
        suffix: bytes = b"",
        on_error: Callable[[BaseException], bytes],
        headers: dict[str, str] | None = None,
    ) -> None:
        # Not Response.__init__: it would render an empty body and send ``content-length: 0``.
        self.status_code = 200
        self.background = None
        self.init_headers({**SSE_HEADERS, **(headers or {})})
        self.pump = pump
        self.encode = encode
        self.ping_seconds = ping_seconds
        self.prefix = list(prefix)
        self.suffix = suffix
        self.on_error = on_error
        self.disconnected = False

    async def _write(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for event in self.prefix:
            await send({"type": "http.response.body", "body": self.encode(event), "more_body": True})
        while True:
            try:
                item = await self.pump.get(self.ping_seconds)
            except StopAsyncIteration:
                break
            except Exception as exc:
                await send({"type": "http.response.body", "body": self.on_error(exc), "more_body": True})
                break
            body = PING if item is None else self.encode(item)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": self.suffix, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.disconnected = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._write(send)
                tg.cancel_scope.cancel()
        except* OSError:  # ASGI 2.4 servers raise on a write to a closed connection
            self.disconnected = True
        finally:
            with anyio.CancelScope(shield=True):
                await self.pump.aclose()
