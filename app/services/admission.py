"""Admission control: bounded work, short queues, fast refusals, per-key limits.

On two cores nothing is gained by letting 200 requests share the CPU and the model server: every
one of them just gets slower. So work is admitted through gates:

* :class:`Gate` — at most ``capacity`` units of a kind of work run at once (answers: the model
  server's useful concurrency; searches: the retrieval threads), at most ``queue`` more wait, and
  none waits longer than ``wait_seconds``. Anything beyond is refused at once with
  :class:`~app.services.errors.Overloaded` (503 + ``Retry-After``), so admitted requests keep a
  bounded latency and a refused client knows to come back.
* :class:`KeyLimits` — per API key: requests per minute (a moving window from the ``limits``
  library, in memory or in Redis so that several replicas share it) and concurrent streams.
  Beyond them: :class:`~app.services.errors.RateLimited` (429 + ``Retry-After``). The state of the
  window is reported as ``RateLimit-Limit``/``-Remaining``/``-Reset`` headers.

The local anonymous admin (auth disabled) has no key and no per-key limits; the gates apply to all.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from limits import RateLimitItemPerMinute, storage, strategies

from app.services.errors import Overloaded, RateLimited
from app.services.keys import Principal


class Gate:
    """At most ``capacity`` holders at once, ``queue`` waiters, ``wait_seconds`` of waiting each."""

    def __init__(self, name: str, *, capacity: int, queue: int, wait_seconds: float, retry_after: float) -> None:
        self.name = name
        self.capacity = capacity
        self.queue = queue
        self.wait_seconds = wait_seconds
        self.retry_after = retry_after
        self._free = asyncio.Semaphore(capacity)
        self.active = 0
        self.waiting = 0

    def _refuse(self) -> Overloaded:
        return Overloaded(
            f"the service is busy: {self.capacity} {self.name} running and {self.waiting} waiting; retry shortly",
            retry_after=self.retry_after,
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one unit for the ``async with`` body.

        Raises:
            Overloaded: No unit became free in time, or the queue was already full.
        """
        if self._free.locked() and self.waiting >= self.queue:
            raise self._refuse()
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), self.wait_seconds)
        except TimeoutError:
            raise self._refuse() from None
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._free.release()


@dataclass(frozen=True, slots=True)
class RateState:
    """A key's request window after a request: for the ``RateLimit-*`` headers."""

    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The IETF ``RateLimit-*`` response headers."""
        return [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_seconds).encode()),
        ]


class KeyLimits:
    """Requests per minute and concurrent streams, per API key."""

    def __init__(self, *, per_minute: int | None, streams: int | None, storage_uri: str = "memory://") -> None:
        self.per_minute = per_minute
        self.streams = streams
        self._item = RateLimitItemPerMinute(per_minute) if per_minute else None
        self._limiter = strategies.MovingWindowRateLimiter(storage.storage_from_string(storage_uri))
        self._open: dict[int, int] = {}

    def hit(self, principal: Principal) -> RateState | None:
        """Count one request of ``principal``'s key (None: no key, or no rate limit).

        Raises:
            RateLimited: The key's window is full (``retry_after`` says when a request frees up).
        """
        if self._item is None or principal.key_id is None:
            return None
        key = str(principal.key_id)
        allowed = self._limiter.hit(self._item, "key", key)
        stats = self._limiter.get_window_stats(self._item, "key", key)
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        state = RateState(self._item.amount, max(0, stats.remaining), reset)
        if not allowed:
            raise RateLimited(
                f"this API key may send {self._item.amount} requests a minute; retry in {max(1, reset)} s",
                retry_after=max(1, reset),
            )
        return state

    @contextlib.contextmanager
    def stream(self, principal: Principal) -> Iterator[None]:
        """Hold one of the key's concurrent streams (answers) for the ``with`` body.

        Raises:
            RateLimited: The key already has ``streams`` answers running.
        """
        if self.streams is None or principal.key_id is None:
            yield
            return
        key = principal.key_id
        if self._open.get(key, 0) >= self.streams:
            raise RateLimited(
                f"this API key may have {self.streams} answers running at once; wait for one to finish",
                retry_after=1,
            )
        self._open[key] = self._open.get(key, 0) + 1
        try:
            yield
        finally:
            self._open[key] -= 1
            if not self._open[key]:
                del self._open[key]


@dataclass
class Admission:
    """The gates and limits of one API process."""

    answers: Gate
    searches: Gate
    keys: KeyLimits
