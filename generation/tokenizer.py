"""Token counting for context fitting.

The context-fitting functions in :mod:`generation.context` are pure and synchronous: they
take a ``count_tokens(text) -> int`` callable. The model server counts asynchronously (an
HTTP call to ``/tokenize``), so :class:`CachedTokenCounter` bridges the two: the answer loop
``await``s :meth:`CachedTokenCounter.prime` with the strings it is about to fit, and the sync
call then answers exactly from the cache, or with a conservative estimate for strings it has
not seen (a trimmed source, say). The final prompt is always re-counted exactly before it is
sent, so an estimate can waste a little context but never overflow it.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable

__all__ = ["CHARS_PER_TOKEN_ESTIMATE", "CachedTokenCounter", "TokenCount", "estimate_tokens"]

TokenCount = Callable[[str], int]
"""``count_tokens(text) -> int``: what the pure context-fitting functions are given."""

# BPE tokenizers of English-trained models average ~4 characters per token on prose; 3 keeps the
# estimate on the safe (over-counting) side for code, numbers and non-English text.
CHARS_PER_TOKEN_ESTIMATE = 3.0


def estimate_tokens(text: str, chars_per_token: float = CHARS_PER_TOKEN_ESTIMATE) -> int:
    """A conservative token count for ``text`` without a tokenizer: ``ceil(len(text) / chars_per_token)``."""
    return math.ceil(len(text) / chars_per_token)


class CachedTokenCounter:
    """A synchronous token counter backed by an asynchronous exact one.

    Args:
        count_exact: Usually ``LLMClient.count_tokens``.
        max_entries: Size of the LRU cache of exact counts.
        concurrency: How many exact counts :meth:`prime` runs at once.

    Calling the instance returns the exact count when the text was primed (or counted before)
    and :func:`estimate_tokens` otherwise; it never blocks.
    """

    def __init__(
        self, count_exact: Callable[[str], Awaitable[int]], *, max_entries: int = 4096, concurrency: int = 4
    ) -> None:
        self._count_exact = count_exact
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._max_entries = max_entries
        self._concurrency = concurrency

    def __call__(self, text: str) -> int:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        return estimate_tokens(text)

    def is_exact(self, text: str) -> bool:
        """Whether ``text`` has an exact count in the cache."""
        return text in self._cache

    async def count(self, text: str) -> int:
        """The exact count of ``text`` (from the cache, else asked and cached)."""
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        n = await self._count_exact(text)
        self._cache[text] = n
        if len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return n

    async def prime(self, texts: Iterable[str]) -> None:
        """Count every text not yet cached, a few at a time, so later sync calls are exact."""
        todo = [t for t in dict.fromkeys(texts) if t and t not in self._cache]
        semaphore = asyncio.Semaphore(self._concurrency)

        async def one(text: str) -> None:
            async with semaphore:
                await self.count(text)

        await asyncio.gather(*(one(t) for t in todo))
