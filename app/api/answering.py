"""Answer streams shared by the REST, SSE, OpenAI-compatible and websocket transports.

The transaction boundaries live here (the caller owns the transaction): one short session to
prepare the question, none while the model talks, one short session to store the turn when
the ``done`` event arrives (before it is sent, so a client that reads the conversation after
``done`` finds the turn).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from opentelemetry import trace

from app.api.streaming import EventPump
from app.resources import Resources
from app.schemas.ask import AskRequest
from app.services import answers
from app.services.errors import AnswerFailed
from app.services.keys import Principal
from generation.client import aclosing_iter
from generation.types import AnswerEvent, DoneEvent, ErrorEvent, RetrievalEvent

_tracer = trace.get_tracer(__name__)


async def prepare(resources: Resources, principal: Principal, request: AskRequest) -> answers.AskPlan:
    """Resolve and check a question in a short transaction of its own."""
    with _tracer.start_as_current_span("answer.prepare"):
        return await _prepare(resources, principal, request)


async def _prepare(resources: Resources, principal: Principal, request: AskRequest) -> answers.AskPlan:
    async with resources.sessionmaker() as session:
        plan = await answers.prepare(
            session,
            principal,
            request,
            settings=resources.settings,
            store=resources.store,
            search_defaults=resources.retriever.defaults,
        )
        await session.rollback()  # read-only; releases the connection before the model is asked
    return plan


async def events(
    resources: Resources, plan: answers.AskPlan, principal: Principal, *, transport: answers.Transport
) -> AsyncIterator[AnswerEvent]:
    """The answer's events; the turn is stored (new transaction) before ``done`` is yielded.

    The answer holds one of its key's concurrent streams and one answer slot from the first event to
    the last (:mod:`app.services.admission`); when neither is free in time the iterator raises
    ``RateLimited`` or ``Overloaded`` before yielding anything.
    """
    admission = resources.admission
    with admission.keys.stream(principal):
        async with admission.answers.slot():
            stream = answers.run(
                plan,
                retriever=resources.retriever,
                llm=resources.llm,
                defaults=resources.answer_defaults,
                metrics=resources.metrics,
                transport=transport,
                embedder=resources.embedder,
            )
            async with aclosing_iter(stream) as source:
                async for event in source:
                    if isinstance(event, DoneEvent) and plan.conversation_id is not None:
                        async with resources.sessionmaker() as session:
                            await answers.record_turn(session, plan, event)
                            await session.commit()
                    yield event


async def open_stream(
    resources: Resources, plan: answers.AskPlan, principal: Principal, *, transport: answers.Transport
) -> tuple[EventPump[AnswerEvent], list[AnswerEvent]]:
    """Start an answer and wait (up to one ping interval) for its first event from the model.

    Retrieval events come before the model is asked, so they are held back until the first token,
    citation, ``done`` or ``error`` arrives. An answer that fails before anything was generated
    (the model server is down, the question does not fit the context window) is then reported
    with its HTTP status (``503`` with ``Retry-After``, ``422``, ...) instead of a ``200`` stream
    holding a retrieval event and an error event.

    Returns:
        The running pump and the events already taken from it.

    Raises:
        AnswerFailed: The answer failed before the model produced anything.
        Overloaded: No answer slot became free in time (503 with ``Retry-After``).
        RateLimited: The key already has its concurrent streams running (429).
    """
    pump = EventPump(events(resources, plan, principal, transport=transport)).start()
    taken: list[AnswerEvent] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + resources.settings.api.sse_ping_seconds
    try:
        while True:
            event = await pump.get(max(0.0, deadline - loop.time()))
            if event is None:  # the model is slow: start streaming, pings keep the client waiting
                return pump, taken
            if isinstance(event, ErrorEvent):
                await pump.aclose()
                raise AnswerFailed(event.code, event.message, retryable=event.retryable)
            taken.append(event)
            if not isinstance(event, RetrievalEvent):
                return pump, taken
    except StopAsyncIteration:
        return pump, taken
    except AnswerFailed:
        raise
    except BaseException:
        await pump.aclose()
        raise
