"""Errors raised by the generation package.

Exception tree::

    GenerationError                 anything the generation package raises on purpose
    ├── LogprobsUnsupported         a mode needs token log-probabilities the backend cannot give (FLARE)
    └── LLMError                    the model server failed to produce a completion
        ├── LLMUnavailable          cannot connect, connection lost, 429/502/503/504 (``retry_after``)
        ├── LLMTimeout              connect/read/write/pool timeout while talking to the server
        ├── ContextTooLong          the prompt plus ``max_tokens`` exceed the model's context window
        ├── LLMBadRequest           the server refused the request (other 4xx), ``status_code`` set
        │   └── TokenizeUnsupported the server has no tokenize endpoint we know
        └── LLMProtocolError        a malformed response: bad JSON, a stream that ends too early

Every error carries ``code`` (a stable snake_case string used in error events and
HTTP problem bodies) and ``retryable`` (whether asking again later may succeed).
Backends translate transport exceptions at the edge with ``raise ... from e`` so
callers never see ``httpx`` types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "ContextTooLong",
    "GenerationError",
    "LLMBadRequest",
    "LLMError",
    "LLMProtocolError",
    "LLMTimeout",
    "LLMUnavailable",
    "LogprobsUnsupported",
    "TokenizeUnsupported",
    "is_context_length_message",
    "parse_context_too_long",
]


class GenerationError(Exception):
    """Base class of every error raised by the generation package."""

    code: str = "generation_error"
    retryable: bool = False


class LogprobsUnsupported(GenerationError):
    """The answer mode needs per-token log-probabilities and the model backend does not report them."""

    code = "logprobs_unsupported"


class LLMError(GenerationError):
    """The model server failed to produce a completion.

    Args:
        message: Human-readable explanation (safe to show to API clients: no secrets, no prompts).
        status_code: HTTP status the server answered with, when there was one.
    """

    code = "llm_error"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class LLMUnavailable(LLMError):
    """The server cannot be reached or says it is overloaded; trying again later may work.

    Args:
        message: Explanation.
        status_code: HTTP status (429/502/503/504) or ``None`` for connection failures.
        retry_after: Seconds the server asked us to wait (``Retry-After``), if it said.
    """

    code = "llm_unavailable"
    retryable = True

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class LLMTimeout(LLMError):
    """Connecting, sending, or waiting for the next byte took longer than the configured timeout."""

    code = "llm_timeout"
    retryable = True


class ContextTooLong(LLMError):
    """The prompt plus the requested completion length do not fit the model's context window.

    Args:
        message: Explanation (the server's own message when it sent one).
        max_context: The model's context window in tokens, when known.
        prompt_tokens: Tokens in the prompt, when known.
        status_code: HTTP status, when the server reported it.
    """

    code = "context_too_long"

    def __init__(
        self,
        message: str,
        *,
        max_context: int | None = None,
        prompt_tokens: int | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.max_context = max_context
        self.prompt_tokens = prompt_tokens


class LLMBadRequest(LLMError):
    """The server refused the request (a 4xx other than context length): a bug or a misconfiguration."""

    code = "llm_bad_request"


class TokenizeUnsupported(LLMBadRequest):
    """The server has no tokenize endpoint (``/tokenize`` of vLLM/llama.cpp, ``/extras/tokenize``)."""

    code = "tokenize_unsupported"


class LLMProtocolError(LLMError):
    """The server answered something we cannot parse: invalid JSON, missing fields, a truncated stream."""

    code = "llm_protocol_error"


# Servers word "too long" differently; these fragments cover vLLM (several versions), OpenAI,
# llama.cpp's server (``exceed_context_size_error``) and llama-cpp-python.
_CONTEXT_MARKERS = (
    "maximum context length",
    "maximum model length",
    "context window",
    "context size",
    "context_length_exceeded",
    "exceed_context_size_error",
    "is too long and exceeds",
)
_MAX_CONTEXT_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"maximum context length is (\d+)",
        r"maximum model length(?: of| is)? (\d+)",
        r"context window of (\d+)",
        r"exceeds limit of (\d+)",
    )
)
_PROMPT_TOKEN_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        r"your request has (\d+) input tokens",
        r"your prompt contains at least (\d+) input tokens",
        r"\((\d+) in (?:the|your) (?:messages|prompt)",
        r"prompt \(length (\d+)\)",
        r"input prompt \((\d+) tokens\)",
        r"requested tokens \((\d+)\)",
    )
)


def is_context_length_message(text: str) -> bool:
    """Whether a server error message (or error type/code) says the context window was exceeded."""
    lowered = text.lower()
    return any(marker in lowered for marker in _CONTEXT_MARKERS)


def _first_int(patterns: tuple[re.Pattern[str], ...], text: str) -> int | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_context_too_long(
    message: str, *, details: Mapping[str, object] | None = None, status_code: int | None = None
) -> ContextTooLong | None:
    """Build a :class:`ContextTooLong` from a server error, or return ``None`` if it is about something else.

    Args:
        message: The error message the server sent.
        details: The server's error object, if any; llama.cpp puts ``type``, ``n_ctx`` and
            ``n_prompt_tokens`` there.
        status_code: HTTP status to record.

    Returns:
        The parsed error with ``max_context``/``prompt_tokens`` filled in where the text or
        ``details`` state them, or ``None`` when the message is not a context-length error.
    """
    details = details or {}
    kind = " ".join(str(details.get(key, "")) for key in ("type", "code"))
    if not (is_context_length_message(message) or is_context_length_message(kind)):
        return None
    max_context = _as_int(details.get("n_ctx")) or _first_int(_MAX_CONTEXT_PATTERNS, message)
    prompt_tokens = _as_int(details.get("n_prompt_tokens")) or _first_int(_PROMPT_TOKEN_PATTERNS, message)
    return ContextTooLong(
        message or "the prompt does not fit the model's context window",
        max_context=max_context,
        prompt_tokens=prompt_tokens,
        status_code=status_code,
    )
