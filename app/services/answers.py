"""Answers: prepare a question (scope, history) in a short transaction, then stream the answer.

The three answer transports (``/v1/ask`` and ``/v1/ask/stream``, ``/v1/chat/completions``, the
websocket) share this module:

1. :func:`prepare` resolves the collections the key may use and loads a stored conversation's
   history. It needs a session; the caller closes it before the model is asked, so no pooled
   connection is held while the model talks.
2. :func:`run` streams :mod:`generation.rag` answer events, recording metrics on the way.
   Closing it (client gone, cancel) closes the upstream model request.
3. :func:`collect` gathers a stream into its :class:`~generation.types.DoneEvent`, or raises
   :class:`~app.services.errors.AnswerFailed` for its error event.
4. :func:`record_turn` appends the question and answer to the conversation (a new transaction).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from app.observability import Metrics
from app.schemas.ask import AskRequest
from app.schemas.events import wire_dict
from app.services import conversations
from app.services import search as search_service
from app.services.errors import AnswerFailed, InvalidInput
from app.services.keys import Principal
from core.settings import Settings
from core.wiring import AnswerDefaults, generation_params
from generation.client import LLMClient, aclosing_iter
from generation.rag import AnswerMode, answer
from generation.types import AnswerEvent, ChatMessage, DoneEvent, ErrorEvent, GenerationParams, TokenEvent
from retrieval.types import Embedder, IndexCatalog, Retriever, SearchFilters, SearchOptions

Transport = Literal["rest", "sse", "websocket", "openai", "mcp"]


@dataclass(frozen=True, slots=True)
class AskPlan:
    """Everything :func:`run` needs, resolved and checked."""

    question: str
    collections: tuple[str, ...] | None
    path_prefix: str | None
    mode: AnswerMode
    k: int
    params: GenerationParams
    history: tuple[ChatMessage, ...]
    search_options: SearchOptions | None
    conversation_id: str | None


async def prepare(
    session: AsyncSession,
    principal: Principal,
    request: AskRequest,
    *,
    settings: Settings,
    store: IndexCatalog,
    search_defaults: SearchOptions,
) -> AskPlan:
    """Check and resolve a question before answering it.

    Raises:
        NotFound: The collection or conversation is missing or not visible to the principal.
        InvalidInput: ``history`` together with ``conversation_id``, or a collection that
            differs from the conversation's.
    """
    requested = request.requested()
    history: list[ChatMessage] = [ChatMessage(role=m.role, content=m.content) for m in request.history or ()]
    if request.conversation_id is not None:
        if request.history:
            raise InvalidInput("send either history or conversation_id, not both", field="body.history")
        _, conv_collection, history = await conversations.history(
            session, principal, request.conversation_id, last=settings.api.history_max_messages
        )
        if requested is not None and requested != [conv_collection]:
            raise InvalidInput(
                f"conversation {request.conversation_id!r} is about collection {conv_collection!r}",
                field="body.collections",
            )
        requested = [conv_collection]
    allowed = await search_service.scope(session, principal, store, requested)
    options = None
    if request.search is not None:
        s = request.search
        options = search_service.search_options(
            search_defaults, mode=s.mode, fusion=s.fusion, alpha=s.alpha, rrf_k=s.rrf_k, depth=s.depth
        )
    params = generation_params(
        settings, max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed
    )
    return AskPlan(
        question=request.question,
        collections=allowed,
        path_prefix=request.path_prefix,
        mode=request.mode or settings.api.answer_mode,
        k=request.k or settings.llm.k,
        params=params,
        history=tuple(history),
        search_options=options,
        conversation_id=request.conversation_id,
    )


async def run(
    plan: AskPlan,
    *,
    retriever: Retriever,
    llm: LLMClient,
    defaults: AnswerDefaults,
    metrics: Metrics,
    transport: Transport,
    embedder: Embedder | None = None,
) -> AsyncIterator[AnswerEvent]:
    """Stream the answer events of ``plan``; the last one is ``done`` or ``error``.

    ``embedder`` scores the grounding guard's support (``defaults.grounding``); ``None``: word overlap.

    Closing the iterator early cancels the answer and closes the upstream model request.
    """
    started = time.perf_counter()
    first_token = False
    outcome = "cancelled"
    metrics.streams_open.inc()
    try:
        events = answer(
            plan.question,
            retriever=retriever,
            llm=llm,
            mode=plan.mode,
            params=plan.params,
            history=plan.history,
            filters=SearchFilters(collections=plan.collections, path_prefix=plan.path_prefix),
            search_options=plan.search_options,
            embedder=embedder,
            **defaults.kwargs(k=plan.k),
        )
        async with aclosing_iter(events) as stream:
            async for event in stream:
                if isinstance(event, TokenEvent) and not first_token:
                    first_token = True
                    metrics.ttft.labels(mode=plan.mode, transport=transport).observe(time.perf_counter() - started)
                elif isinstance(event, DoneEvent):
                    outcome = "done"
                    metrics.tokens_generated.labels(mode=plan.mode).inc(event.usage.completion_tokens)
                    metrics.prompt_tokens.labels(mode=plan.mode).inc(event.usage.prompt_tokens)
                elif isinstance(event, ErrorEvent):
                    outcome = event.code
                yield event
    finally:
        metrics.streams_open.dec()
        metrics.answers.labels(mode=plan.mode, outcome=outcome).inc()
        metrics.answer_latency.labels(mode=plan.mode, transport=transport).observe(time.perf_counter() - started)


async def collect(events: AsyncIterator[AnswerEvent]) -> DoneEvent:
    """The ``done`` event of a stream.

    Raises:
        AnswerFailed: The stream ended with an error event.
    """
    async with aclosing_iter(events) as stream:
        async for event in stream:
            if isinstance(event, DoneEvent):
                return event
            if isinstance(event, ErrorEvent):
                raise AnswerFailed(event.code, event.message, retryable=event.retryable)
    raise AnswerFailed("internal_error", "the answer ended without a result")


async def record_turn(session: AsyncSession, plan: AskPlan, done: DoneEvent) -> None:
    """Append the question and answer to the plan's conversation, if it has one (flushes)."""
    if plan.conversation_id is None:
        return
    citations = [wire_dict(c) for c in done.citations]
    await conversations.append_turn(
        session, plan.conversation_id, question=plan.question, done=done, citations=citations
    )
