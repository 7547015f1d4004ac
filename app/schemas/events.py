"""The events on the wire (answers and ingestion jobs): the one place they become JSON.

One schema, every transport: ``POST /v1/ask/stream`` sends each event as a Server-Sent Event
(``event: <type>``, ``data: <json>``), the websocket ``/v1/chat`` sends the same JSON with the
request's ``id`` added, and ``rag ask --json`` prints the ``done`` event. :func:`to_wire` builds
these models from :mod:`generation.types`' dataclasses field by field (a citation leaves out the
chunk's full text: the retrieval event already carried it), so the documented schema in OpenAPI
is the one that is sent.

An ingestion job's progress uses the same schema and transports: ``GET /v1/jobs/{id}/events``
(SSE) and the websocket's ``watch_job`` send :data:`JobEventOut` (``file``, ``progress``, then
``job_end``; ``error`` when the stream itself fails).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter

from app.schemas.common import LOCATION_DESCRIPTION
from app.schemas.jobs import JobFiles, JobOut
from generation import types as domain
from retrieval.types import Chunk


class ChunkOut(BaseModel):
    """A retrieved passage, whole."""

    id: int = Field(description="Chunk id (also its FAISS and BM25 id).")
    document_id: int
    collection: str
    path: str = Field(description="Source file path.")
    ordinal: int = Field(description="Position of the chunk in its document.")
    text: str
    start: int = Field(description="Character offset of the chunk in the document's extracted text.")
    end: int
    page: int | None = Field(description="1-based page (PDF) or slide (PPTX), when known.")
    title: str | None
    metadata: dict[str, str]
    location: str | None = Field(
        default=None,
        description=LOCATION_DESCRIPTION,
    )


class TokenLogprobOut(BaseModel):
    """A generated token with its log-probability and the top alternatives."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]]


class RetrievedChunk(BaseModel):
    """One result of a retrieval round."""

    chunk: ChunkOut
    score: float
    rank: int
    n: int | None = Field(description="Citation number of the chunk in the prompt; null if it did not fit.")


class RetrievalEvent(BaseModel):
    """The retriever was asked; comes before the tokens generated from these sources."""

    type: Literal["retrieval"] = "retrieval"
    round: int = Field(description="0 for the initial retrieval, then 1, 2, ...")
    query: str
    reason: str = Field(description="`initial`, `interval` or `low_confidence`.")
    elapsed_ms: float
    trigger: list[TokenLogprobOut] | None = Field(description="Low-confidence tokens that caused the round.")
    chunk_ids: list[int] = Field(description="Ids of `chunks`, in order.")
    chunks: list[RetrievedChunk]


class TokenEvent(BaseModel):
    """A piece of answer text."""

    type: Literal["token"] = "token"
    text: str


class CitationEvent(BaseModel):
    """The answer cited source `[n]` for the first time (sent right before that token)."""

    type: Literal["citation"] = "citation"
    n: int
    chunk_id: int
    document_id: int
    path: str
    title: str | None
    page: int | None
    location: str | None = Field(
        default=None,
        description=LOCATION_DESCRIPTION,
    )
    start: int = Field(description="Offset of `snippet` in the document's extracted text.")
    end: int
    snippet: str = Field(description="The passage of the chunk that best supports the citing sentence.")
    inferred: bool = Field(
        default=False,
        description="The model wrote no marker; the source was attributed to the answer by word overlap.",
    )


class SupportEvent(BaseModel):
    """The grounding guard's verdict on one shown sentence (sent right after its tokens)."""

    type: Literal["support"] = "support"
    index: int
    sentence: str
    verdict: Literal["supported", "unsupported"]
    score: float
    origin: Literal["model", "extractive"] = Field(description="Generated, or quoted from a source by the guard.")
    n: int | None = Field(description="Display citation number of the supporting source.")
    chunk_id: int | None
    start: int | None = Field(description="Start of the supporting sentence in the chunk's text.")
    end: int | None
    reason: str | None = Field(
        default=None, description="Why unsupported: `low_support`, `number`, `source_header`, ..."
    )


class Usage(BaseModel):
    """Tokens used by every model request of the answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DoneEvent(BaseModel):
    """The answer is complete; always the last event of a successful answer."""

    type: Literal["done"] = "done"
    answer: str
    citations: list[CitationEvent]
    retrievals: list[RetrievalEvent]
    usage: Usage
    timings: dict[str, float] = Field(description="Milliseconds: `retrieval_ms`, `ttft_ms`, `total_ms`, ...")
    mode: str
    finish_reason: str | None = Field(description="`stop`, `length`, `repetition`, or `guard` (the grounding guard).")
    no_answer: bool = Field(default=False, description="The sources do not answer the question.")
    supports: list[SupportEvent] = Field(default_factory=list, description="Support verdicts of the shown sentences.")


class ErrorEvent(BaseModel):
    """The answer failed (or was cancelled); always the last event."""

    type: Literal["error"] = "error"
    code: str = Field(description="`llm_unavailable`, `llm_timeout`, `context_too_long`, `cancelled`, ...")
    message: str
    retryable: bool = False


AnswerEventOut = Annotated[
    RetrievalEvent | TokenEvent | CitationEvent | SupportEvent | DoneEvent | ErrorEvent, Field(discriminator="type")
]
"""Every answer event, discriminated on ``type``."""

ANSWER_EVENT_ADAPTER: TypeAdapter[
    RetrievalEvent | TokenEvent | CitationEvent | SupportEvent | DoneEvent | ErrorEvent
] = TypeAdapter(AnswerEventOut)
"""Parses and validates wire events (clients, tests)."""


WireEvent = RetrievalEvent | TokenEvent | CitationEvent | SupportEvent | DoneEvent | ErrorEvent


class JobFileEvent(BaseModel):
    """A file of an ingestion job changed state (written by the worker, in file order per state)."""

    type: Literal["file"] = "file"
    event_id: int = Field(description="Increasing per job; resume after it (`Last-Event-ID`, `after`).")
    job_id: int
    path: str
    status: Literal["started", "indexed", "unchanged", "failed", "deleted"] = Field(
        description="`started` (new or changed, being read), then `indexed` or `failed`; `unchanged` (same "
        "hash, skipped); `deleted` (its file left the folder, its document was pruned)."
    )
    chunks: int = Field(default=0, description="Chunks recorded for the file (`indexed`).")
    error: str | None = Field(default=None, description="Why the file failed (`failed`).")


class JobProgressEvent(BaseModel):
    """Counters, rate and ETA of a job; sent when they change (at least once per stream)."""

    type: Literal["progress"] = "progress"
    job_id: int
    status: str = Field(description="`queued` or `running` (the end comes as `job_end`).")
    cancel_requested: bool
    done: int = Field(description="Files handled so far (any outcome, skipped ones included).")
    total: int = Field(description="Files under the folder (0 until the worker has listed it).")
    files: JobFiles
    chunks_added: int
    elapsed_seconds: float = Field(description="Since the worker started the job.")
    files_per_second: float | None
    chunks_per_second: float | None
    eta_seconds: float | None = Field(description="At the average rate so far; null until a file is done.")


class JobEndEvent(BaseModel):
    """The job ended (`succeeded`, `failed` or `cancelled`): its final record. Always the last event."""

    type: Literal["job_end"] = "job_end"
    job: JobOut


JobWireEvent = JobFileEvent | JobProgressEvent | JobEndEvent | ErrorEvent

JobEventOut = Annotated[JobWireEvent, Field(discriminator="type")]
"""Every ingestion job event, discriminated on ``type``."""

JOB_EVENT_ADAPTER: TypeAdapter[JobWireEvent] = TypeAdapter(JobEventOut)
"""Parses and validates job events (clients, tests)."""


def chunk_out(chunk: Chunk) -> ChunkOut:
    """The wire form of a chunk."""
    return ChunkOut(**chunk.to_dict())


def _token(token: domain.TokenLogprob) -> TokenLogprobOut:
    return TokenLogprobOut(
        token=token.token,
        logprob=None if math.isnan(token.logprob) else token.logprob,
        top=[(alt, lp) for alt, lp in token.top],
    )


def _citation(event: domain.CitationEvent) -> CitationEvent:
    return CitationEvent(
        n=event.n,
        chunk_id=event.chunk_id,
        document_id=event.document_id,
        path=event.path,
        title=event.title,
        page=event.page,
        location=event.chunk.location,
        start=event.start,
        end=event.end,
        snippet=event.snippet,
        inferred=event.inferred,
    )


def _support(event: domain.SupportEvent) -> SupportEvent:
    return SupportEvent(
        index=event.index,
        sentence=event.sentence,
        verdict=event.verdict,
        score=event.score,
        origin=event.origin,
        n=event.n,
        chunk_id=event.chunk_id,
        start=event.start,
        end=event.end,
        reason=event.reason,
    )


def _retrieval(event: domain.RetrievalEvent) -> RetrievalEvent:
    return RetrievalEvent(
        round=event.round,
        query=event.query,
        reason=event.reason,
        elapsed_ms=event.elapsed_ms,
        trigger=None if event.trigger is None else [_token(t) for t in event.trigger],
        chunk_ids=[sc.chunk.id for sc in event.chunks],
        chunks=[
            RetrievedChunk(
                chunk=chunk_out(sc.chunk),
                score=sc.score,
                rank=sc.rank,
                n=event.numbers[i] if i < len(event.numbers) else None,
            )
            for i, sc in enumerate(event.chunks)
        ],
    )


def to_wire(event: domain.AnswerEvent) -> WireEvent:
    """The wire model of a domain answer event."""
    if isinstance(event, domain.TokenEvent):
        return TokenEvent(text=event.text)
    if isinstance(event, domain.CitationEvent):
        return _citation(event)
    if isinstance(event, domain.RetrievalEvent):
        return _retrieval(event)
    if isinstance(event, domain.SupportEvent):
        return _support(event)
    if isinstance(event, domain.ErrorEvent):
        return ErrorEvent(code=event.code, message=event.message, retryable=event.retryable)
    return DoneEvent(
        answer=event.answer,
        citations=[_citation(c) for c in event.citations],
        retrievals=[_retrieval(r) for r in event.retrievals],
        usage=Usage(
            prompt_tokens=event.usage.prompt_tokens,
            completion_tokens=event.usage.completion_tokens,
            total_tokens=event.usage.total_tokens,
        ),
        timings=dict(event.timings),
        mode=event.mode,
        finish_reason=event.finish_reason,
        no_answer=event.no_answer,
        supports=[_support(s) for s in event.supports],
    )


def wire_dict(event: domain.AnswerEvent) -> dict[str, Any]:
    """The JSON-ready dict of a domain event, as every transport sends it."""
    return to_wire(event).model_dump(mode="json")
