"""The ``LLMClient`` protocol: what the answer loop needs from a model server.

Backends (``generation.backends``) implement it; tests use a scripted fake. Capabilities are
attributes (``supports_logprobs``), not isinstance checks, so a mode that needs
log-probabilities (FLARE) can refuse a backend that lacks them up front.

Errors: every method raises only :class:`generation.errors.LLMError` subclasses for server
or transport failures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar, runtime_checkable

from generation.types import ChatMessage, Completion, GenerationParams, StreamDelta

__all__ = ["LLMClient", "aclosing_iter"]

_T = TypeVar("_T")


@runtime_checkable
class LLMClient(Protocol):
    """An OpenAI-style text generator.

    ``stream``/``stream_chat`` are async generators: the caller must close them
    (``contextlib.aclosing``) when it stops early, which closes the upstream response so the
    server stops generating. A stream never retries once the server has started answering.
    """

    @property
    def model(self) -> str:
        """The model name sent with every request."""
        ...

    @property
    def supports_logprobs(self) -> bool:
        """Whether ``GenerationParams.logprobs`` yields ``StreamDelta.tokens``."""
        ...

    async def complete(self, prompt: str, params: GenerationParams) -> Completion:
        """Complete a raw prompt (no chat template applied by the server)."""
        ...

    def stream(self, prompt: str, params: GenerationParams) -> AsyncIterator[StreamDelta]:
        """Stream the completion of a raw prompt, one delta per server chunk."""
        ...

    async def chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> Completion:
        """Answer a conversation; the server applies the model's chat template."""
        ...

    def stream_chat(self, messages: Sequence[ChatMessage], params: GenerationParams) -> AsyncIterator[StreamDelta]:
        """Stream the answer to a conversation."""
        ...

    async def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens (special tokens in the text are parsed).

        Raises:
            TokenizeUnsupported: The server cannot tokenize.
        """
        ...

    async def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text``; exact when the server can tokenize, else a conservative estimate."""
        ...

    async def aclose(self) -> None:
        """Release connections. The client is unusable afterwards."""
        ...


@asynccontextmanager
async def aclosing_iter(iterator: AsyncIterator[_T]) -> AsyncIterator[AsyncIterator[_T]]:
    """Like :func:`contextlib.aclosing` for any async iterator: ``aclose()`` it on exit if it has one.

    Streams are typed as ``AsyncIterator`` in the protocol but are async generators in practice;
    closing them deterministically (not at garbage collection) is what stops the server's work
    when the consumer goes away.
    """
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
