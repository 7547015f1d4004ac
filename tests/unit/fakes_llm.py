"""Test doubles for the generation package: a scripted LLM and a scripted retriever.

``FakeLLM`` follows simonw/llm's ``MockModel.enqueue`` idea: tests enqueue the tokens each
request should produce (optionally with log-probabilities) and inspect the recorded calls.
It honours ``max_tokens`` (finish reason ``"length"``) and stop strings like a real server,
reports usage in a last delta, and counts open/closed streams so tests can prove that
abandoning an answer closes the upstream request.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from generation.types import ChatMessage, Completion, GenerationParams, StreamDelta, TokenLogprob, Usage
from retrieval.types import Chunk, ScoredChunk, SearchFilters, SearchOptions

__all__ = [
    "FakeCall",
    "FakeLLM",
    "FakeRetriever",
    "Script",
    "assistant_prefix",
    "count_words",
    "make_chunk",
    "split_tokens",
]

Script = Sequence[str | tuple[str, float]]
"""Tokens of one response: plain strings (log-probability -0.05) or ``(token, logprob)`` pairs."""

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_DEFAULT_LOGPROB = -0.05


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into BPE-like tokens: each word or symbol with the whitespace before it."""
    return re.findall(r"\s*(?:\w+|[^\w\s])|\s+$", text)


def assistant_prefix(prompt: str) -> str:
    """The open assistant turn at the end of a ChatML prompt (the partial answer being continued)."""
    marker = "<|im_start|>assistant\n"
    return prompt[prompt.rfind(marker) + len(marker) :] if marker in prompt else ""


def make_chunk(
    chunk_id: int,
    text: str,
    *,
    path: str | None = None,
    title: str | None = None,
    page: int | None = None,
    start: int = 0,
) -> Chunk:
    """A chunk with plausible defaults."""
    return Chunk(
        id=chunk_id,
        document_id=chunk_id * 10,
        collection="docs",
        path=path or f"docs/doc{chunk_id}.md",
        ordinal=0,
        text=text,
        start=start,
        end=start + len(text),
        page=page,
        title=title,
    )


@dataclass(frozen=True)
class FakeCall:
    """One request the fake received."""

    kind: Literal["completion", "chat"]
    prompt: str
    messages: tuple[ChatMessage, ...]
    params: GenerationParams


@dataclass
class _Response:
    tokens: list[tuple[str, float]]
    finish_reason: str = "stop"
    error: BaseException | None = None


@dataclass
class FakeLLM:
    """A scripted :class:`generation.client.LLMClient`.

    Args:
        responder: Produces the script of a request when the queue is empty (e.g. continue a
            fixed answer from the prompt's assistant prefix). Without one, an empty queue is an
            error.
        token_delay: Seconds to sleep before each token (0 still yields to the event loop).
    """

    responder: Callable[[FakeCall], Script] | None = None
    token_delay: float = 0.0
    model: str = "fake-llm"
    supports_logprobs: bool = True
    calls: list[FakeCall] = field(default_factory=list)
    open_streams: int = 0
    closed_streams: int = 0
    closed: bool = False
    _queue: deque[_Response] = field(default_factory=deque)

    def enqueue(self, tokens: Script, *, finish_reason: str = "stop") -> None:
        """Script the next request's tokens."""
        self._queue.append(_Response(self._normalize(tokens), finish_reason))

    def enqueue_text(self, text: str, *, finish_reason: str = "stop") -> None:
        """Script the next request as ``text`` split into word tokens."""
        self.enqueue(split_tokens(text), finish_reason=finish_reason)

    def enqueue_error(self, error: BaseException, *, after: Script = ()) -> None:
        """Script the next request to produce ``after`` and then raise ``error``."""
        self._queue.append(_Response(self._normalize(after), error=error))

    @staticmethod
    def _normalize(tokens: Script) -> list[tuple[str, float]]:
        return [(t, _DEFAULT_LOGPROB) if isinstance(t, str) else t for t in tokens]

    def _next(self, call: FakeCall) -> _Response:
        self.calls.append(call)
        if self._queue:
            return self._queue.popleft()
        if self.responder is None:
            raise AssertionError("FakeLLM received a request nobody scripted")
        return _Response(self._normalize(self.responder(call)))

    async def _run(self, call: FakeCall) -> AsyncIterator[StreamDelta]:
        response = self._next(call)
        params = call.params
        self.open_streams += 1
        try:
            emitted = 0
            finish = response.finish_reason
            for token, logprob in response.tokens:
                if emitted >= params.max_tokens:
                    finish = "length"
                    break
                if token.strip() and token.strip() in params.stop:
                    finish = "stop"
                    break
                await asyncio.sleep(self.token_delay)
                emitted += 1
                tokens = (TokenLogprob(token, logprob),) if params.logprobs is not None else ()
                yield StreamDelta(token, tokens)
            if response.error is not None:
                raise response.error
            yield StreamDelta("", finish_reason=finish)
            prompt_tokens = await self.count_tokens(call.prompt or " ".join(m.content for m in call.messages))
            yield StreamDelta("", usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=emitted))
        finally:
            self.open_streams -= 1
            self.closed_streams += 1

    def stream(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamDelta]:
        return self._run(FakeCall("completion", prompt, (), params))

    def stream_chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[StreamDelta]:
        return self._run(FakeCall("chat", "", tuple(messages), params))

    async def _gather(self, deltas: AsyncIterator[StreamDelta]) -> Completion:
        text: list[str] = []
        tokens: list[TokenLogprob] = []
        finish: str | None = None
        usage: Usage | None = None
        async for delta in deltas:
            text.append(delta.text)
            tokens.extend(delta.tokens)
            finish = delta.finish_reason or finish
            usage = delta.usage or usage
        return Completion("".join(text), tuple(tokens), finish, usage)

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        return await self._gather(self.stream(prompt, params))

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        return await self._gather(self.stream_chat(messages, params))

    async def tokenize(self, text: str) -> list[int]:
        return list(range(len(_TOKEN_RE.findall(text))))

    async def count_tokens(self, text: str) -> int:
        """One token per word or symbol (a deterministic stand-in for a BPE tokenizer)."""
        return len(_TOKEN_RE.findall(text))

    async def aclose(self) -> None:
        self.closed = True

    @property
    def prompts(self) -> list[str]:
        """Prompts of every completion request, in order."""
        return [c.prompt for c in self.calls]


def count_words(text: str) -> int:
    """The same count as ``FakeLLM.count_tokens``, synchronously."""
    return len(_TOKEN_RE.findall(text))


@dataclass
class FakeRetriever:
    """A scripted :class:`retrieval.types.Retriever`.

    Returns the next enqueued result list, else ``by_query(query)`` when given, else ``chunks``;
    raises ``error`` when set. Records every query.
    """

    chunks: Sequence[Chunk] = ()
    by_query: Callable[[str], Sequence[Chunk]] | None = None
    error: BaseException | None = None
    queries: list[str] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)
    _queue: deque[Sequence[Chunk]] = field(default_factory=deque)

    def enqueue(self, chunks: Sequence[Chunk]) -> None:
        """Script the result of the next search."""
        self._queue.append(chunks)

    async def search(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        self.queries.append(query)
        self.ks.append(k)
        if self.error is not None:
            raise self.error
        if self._queue:
            found = self._queue.popleft()
        elif self.by_query is not None:
            found = self.by_query(query)
        else:
            found = self.chunks
        return [ScoredChunk(chunk=c, score=1.0 / rank, rank=rank) for rank, c in enumerate(found[:k], start=1)]
