"""Value types of the generation package: sampling parameters, model output, answer events.

Everything here is a frozen dataclass. The answer events (:data:`AnswerEvent`) are the domain
form of the one event schema, discriminated on ``type`` (``retrieval | token | citation | support |
done | error``); their wire form (what SSE, the websocket and ``rag ask --json`` send) is derived from
them in exactly one place, ``app/schemas/events.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from retrieval.types import Chunk, ScoredChunk

__all__ = [
    "ANSWER_MODES",
    "AnswerEvent",
    "AnswerMode",
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
]

Role = Literal["system", "user", "assistant"]

AnswerMode = Literal["single", "interval", "flare", "extractive"]
"""How :func:`generation.rag.answer` answers (its module docstring describes each mode)."""
ANSWER_MODES: tuple[AnswerMode, ...] = ("single", "interval", "flare", "extractive")


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
# The grounding guard's per-sentence verdict (its wire form is in app/schemas/events.py).


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


AnswerEvent = RetrievalEvent | TokenEvent | CitationEvent | SupportEvent | DoneEvent | ErrorEvent
