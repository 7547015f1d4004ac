"""Value types of the generation package: sampling parameters, model output, answer events.

Everything here is a frozen dataclass. The answer events (:data:`AnswerEvent`) are the one
schema every transport uses: the SSE endpoint, the websocket and the CLI all send the
dicts produced by :func:`event_to_dict`, discriminated on ``type``
(``retrieval | token | citation | support | done | error``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from retrieval.types import Chunk, ScoredChunk

__all__ = [
    "AnswerEvent",
    "ChatMessage",
    "CitationEvent",
    "Completion",
    "DoneEvent",
    "ErrorEvent",
    "GenerationParams",
    "RetrievalEvent",
    "Role",
    "StreamDelta",
    "SupportEvent",
    "TokenEvent",
    "TokenLogprob",
    "Usage",
    "chunk_to_dict",
    "event_to_dict",
]

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling parameters of one request.

    Attributes:
        max_tokens: Upper bound on generated tokens.
        temperature: 0 means greedy.
        top_p: Nucleus sampling mass.
        top_k: vLLM/llama.cpp extension; ``None`` leaves the server default (no top-k).
        stop: Extra stop strings (the chat template adds its own end-of-turn markers).
        logprobs: Number of alternatives to return per token (``None``: no log-probabilities).
            vLLM refuses more than its ``--max-logprobs``.
        seed: Per-request seed for reproducible sampling.
        repetition_penalty: vLLM extension (>1 discourages repeats). vLLM applies it to the prompt's
            tokens as well, so it also pushes the model away from the words of its sources.
        frequency_penalty: OpenAI parameter: subtracted once per earlier occurrence of a token in the
            generated text only (vLLM, llama.cpp and OpenAI agree); curbs loops without penalising
            words copied from the sources.
        presence_penalty: OpenAI parameter: subtracted once from every token already generated.
    """

    max_tokens: int = 256
    temperature: float = 0.2
    top_p: float = 0.9
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token with its log-probability and the top alternatives (best first).

    ``logprob`` is NaN when the server did not report one.
    """

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()

    @property
    def prob(self) -> float:
        """The token's probability, ``exp(logprob)``."""
        return math.exp(self.logprob)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting as reported by the server (or counted by us when it did not report)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """A piece of a streamed completion.

    ``tokens`` is empty unless log-probabilities were requested. ``finish_reason`` is set on
    the delta that ends the choice (``"stop"``, ``"length"``, ...). At most one delta of a
    stream carries ``usage`` and it is the last one.
    """

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole completion: the concatenated deltas of a stream."""

    text: str
    tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation."""

    role: Role
    content: str


# --- answer events ----------------------------------------------------------------------------
# ``type`` is a real dataclass field (so ``dataclasses.asdict`` and pydantic see it) that callers
# never pass: ``init=False`` keeps it out of ``__init__`` and lets it come first.


@dataclass(frozen=True, slots=True)
class RetrievalEvent:
    """The retriever was asked; sent before the tokens that were generated with these sources.

    Attributes:
        round: 0 for the initial retrieval, then 1, 2, ... for re-retrievals.
        query: The text sent to the retriever.
        chunks: What the retriever returned, best first.
        numbers: For each of ``chunks``, the citation number it has in the prompt, or ``None``
            when it did not fit the context window.
        trigger: The low-confidence tokens that caused an active re-retrieval (FLARE), else ``None``.
        reason: Why retrieval happened: ``"initial"``, ``"interval"``, ``"low_confidence"``.
        elapsed_ms: Time spent in the retriever.
    """

    round: int
    query: str
    chunks: tuple[ScoredChunk, ...]
    numbers: tuple[int | None, ...] = ()
    trigger: tuple[TokenLogprob, ...] | None = None
    reason: str = "initial"
    elapsed_ms: float = 0.0
    type: Literal["retrieval"] = field(default="retrieval", init=False)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A piece of answer text, already cleaned of invalid citation markers."""

    text: str
    type: Literal["token"] = field(default="token", init=False)


@dataclass(frozen=True, slots=True)
class CitationEvent:
    """The answer cited source ``[n]`` for the first time.

    ``start``/``end`` are character offsets of ``snippet`` in the document's extracted text
    (``extracted[start:end] == snippet``): the passage of the chunk that best matches the
    sentence that cited it, so a client can highlight exactly that. ``inferred`` is true when
    the model wrote no marker and the source was attributed afterwards by word overlap
    (:func:`generation.citations.infer_citations`).
    """

    n: int
    chunk_id: int
    document_id: int
    path: str
    title: str | None
    page: int | None
    start: int
    end: int
    snippet: str
    chunk: Chunk
    inferred: bool = False
    type: Literal["citation"] = field(default="citation", init=False)


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """The answer is complete. Always the last event of a successful answer.

    Attributes:
        answer: The full answer text (the concatenation of every ``TokenEvent``).
        citations: Cited sources in order of first use.
        retrievals: Every retrieval round, in order.
        usage: Tokens summed over every model request of this answer.
        timings: Milliseconds: ``retrieval_ms``, ``ttft_ms`` (time to first token), ``total_ms``, ...
        mode: The answer mode (``"single"``, ``"interval"``, ...).
        finish_reason: Why the answer ended: ``"stop"`` (the model ended it), ``"length"`` (the token
            cap, or the grounding guard's word budget), ``"repetition"`` (a loop), ``"guard"`` (the
            grounding guard cut or replaced the model's answer, or abstained).
        no_answer: The answer says the sources do not answer the question (grounding guard).
        supports: The grounding guard's judgement of every shown sentence, in order (empty when the
            guard is off).
    """

    answer: str
    citations: tuple[CitationEvent, ...]
    retrievals: tuple[RetrievalEvent, ...]
    usage: Usage
    timings: Mapping[str, float]
    mode: str
    finish_reason: str | None
    no_answer: bool = False
    supports: tuple[SupportEvent, ...] = ()
    type: Literal["done"] = field(default="done", init=False)


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The answer failed; always the last event. ``code`` is the exception's ``code``."""

    code: str
    message: str
    retryable: bool = False
    type: Literal["error"] = field(default="error", init=False)


# --- grounding (generation.guard) ---------------------------------------------------------------
# Kept in one block: the grounding guard's event and its wire form.


@dataclass(frozen=True, slots=True)
class SupportEvent:
    """The grounding guard's verdict on one sentence of the answer, sent right after its tokens.

    Attributes:
        index: The sentence's position among the shown sentences (0-based).
        sentence: The sentence as shown (display citation numbers included).
        verdict: ``"supported"`` or ``"unsupported"``.
        score: The support score (``w · cosine + (1 − w) · lexical``, see :mod:`generation.grounding`).
        origin: ``"model"`` (generated) or ``"extractive"`` (quoted from a source by the guard).
        n: The display citation number of the supporting source (``None`` when unsupported).
        chunk_id: The supporting chunk (also given for an unsupported sentence: its closest chunk).
        start: Start of the supporting sentence in that chunk's text (``chunk.text[start:end]``).
        end: Its end.
        reason: Why an unsupported sentence is unsupported (``"low_support"``, ``"number"``,
            ``"source_header"``, ``"no_sources"``), else ``None``.
    """

    index: int
    sentence: str
    verdict: Literal["supported", "unsupported"]
    score: float
    origin: Literal["model", "extractive"]
    n: int | None
    chunk_id: int | None
    start: int | None
    end: int | None
    reason: str | None = None
    type: Literal["support"] = field(default="support", init=False)


def _support_to_dict(event: SupportEvent) -> dict[str, Any]:
    return {
        "type": event.type,
        "index": event.index,
        "sentence": event.sentence,
        "verdict": event.verdict,
        "score": event.score,
        "origin": event.origin,
        "n": event.n,
        "chunk_id": event.chunk_id,
        "start": event.start,
        "end": event.end,
        "reason": event.reason,
    }


# --- the union and the wire form ------------------------------------------------------------------

AnswerEvent = RetrievalEvent | TokenEvent | CitationEvent | SupportEvent | DoneEvent | ErrorEvent


def chunk_to_dict(chunk: Chunk) -> dict[str, Any]:
    """A JSON-ready dict of a chunk (every field, ``metadata`` as a plain dict)."""
    return {
        "id": chunk.id,
        "document_id": chunk.document_id,
        "collection": chunk.collection,
        "path": chunk.path,
        "ordinal": chunk.ordinal,
        "text": chunk.text,
        "start": chunk.start,
        "end": chunk.end,
        "page": chunk.page,
        "title": chunk.title,
        "metadata": dict(chunk.metadata),
    }


def _token_to_dict(token: TokenLogprob) -> dict[str, Any]:
    return {
        "token": token.token,
        "logprob": None if math.isnan(token.logprob) else token.logprob,
        "top": [[alt, lp] for alt, lp in token.top],
    }


def _citation_to_dict(event: CitationEvent) -> dict[str, Any]:
    # The chunk's full text is left out: ``snippet`` is what the client shows and the chunk was
    # already sent whole in the retrieval event.
    return {
        "type": event.type,
        "n": event.n,
        "chunk_id": event.chunk_id,
        "document_id": event.document_id,
        "path": event.path,
        "title": event.title,
        "page": event.page,
        "start": event.start,
        "end": event.end,
        "snippet": event.snippet,
        "inferred": event.inferred,
    }


def _retrieval_to_dict(event: RetrievalEvent) -> dict[str, Any]:
    return {
        "type": event.type,
        "round": event.round,
        "query": event.query,
        "reason": event.reason,
        "elapsed_ms": event.elapsed_ms,
        "trigger": None if event.trigger is None else [_token_to_dict(t) for t in event.trigger],
        "chunk_ids": [sc.chunk.id for sc in event.chunks],
        "chunks": [
            {
                "chunk": chunk_to_dict(sc.chunk),
                "score": sc.score,
                "rank": sc.rank,
                "n": event.numbers[i] if i < len(event.numbers) else None,
            }
            for i, sc in enumerate(event.chunks)
        ],
    }


def event_to_dict(event: AnswerEvent) -> dict[str, Any]:
    """The JSON-ready wire form of an answer event, shared by SSE, websocket and CLI.

    Args:
        event: Any answer event.

    Returns:
        A dict of JSON types with ``type`` as discriminator. Citations omit the chunk's full text.
    """
    if isinstance(event, TokenEvent):
        return {"type": event.type, "text": event.text}
    if isinstance(event, CitationEvent):
        return _citation_to_dict(event)
    if isinstance(event, RetrievalEvent):
        return _retrieval_to_dict(event)
    if isinstance(event, SupportEvent):
        return _support_to_dict(event)
    if isinstance(event, ErrorEvent):
        return {
            "type": event.type,
            "code": event.code,
            "message": event.message,
            "retryable": event.retryable,
        }
    return {
        "type": event.type,
        "answer": event.answer,
        "citations": [_citation_to_dict(c) for c in event.citations],
        "retrievals": [_retrieval_to_dict(r) for r in event.retrievals],
        "usage": {
            "prompt_tokens": event.usage.prompt_tokens,
            "completion_tokens": event.usage.completion_tokens,
            "total_tokens": event.usage.total_tokens,
        },
        "timings": dict(event.timings),
        "mode": event.mode,
        "finish_reason": event.finish_reason,
        "no_answer": event.no_answer,
        "supports": [_support_to_dict(s) for s in event.supports],
    }
