"""Answer streams shared by the REST, SSE, OpenAI-compatible and websocket transports.

The transaction boundaries live here (the caller owns the transaction): one short session to
prepare the question, none while the model talks, one short session to store the turn when
the ``done`` event arrives (before it is sent, so a client that reads the conversation after
``done`` finds the turn).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from app.api.streaming import EventPump
from app.resources import Resources
from app.schemas.ask import AskRequest
from app.services import answers
from app.services.errors import AnswerFailed
from app.services.keys import Principal
from generation.client import aclosing_iter
from generation.types import AnswerEvent, DoneEvent, ErrorEvent


async def prepare(resources: Resources, principal: Principal, request: AskRequest) -> answers.AskPlan:
    """Resolve and check a question in a short transaction of its own."""
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
    resources: Resources, plan: answers.AskPlan, *, transport: answers.Transport
) -> AsyncIterator[AnswerEvent]:
    """The answer's events; the turn is stored (new transaction) before ``done`` is yielded."""
    stream = answers.run(
        plan,
        retriever=resources.retriever,
        llm=resources.llm,
        settings=resources.settings,
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
    resources: Resources, plan: answers.AskPlan, *, transport: answers.Transport
) -> tuple[EventPump[AnswerEvent], list[AnswerEvent]]:
    """Start an answer and wait (up to one ping interval) for its first event.

    An answer that fails before anything was generated (the model server is down, the question
    does not fit the context window) is then reported with its HTTP status (``503`` with
    ``Retry-After``, ``422``, ...) instead of a ``200`` stream holding a single error event.

    Returns:
        The running pump and the events already taken from it.

    Raises:
        AnswerFailed: The first event is an error.
    """
    pump = EventPump(events(resources, plan, transport=transport)).start()
    try:
        first = await pump.get(resources.settings.api.sse_ping_seconds)
    except StopAsyncIteration:
        return pump, []
    except BaseException:
        await pump.aclose()
        raise
    if isinstance(first, ErrorEvent):
        await pump.aclose()
        raise AnswerFailed(first.code, first.message, retryable=first.retryable)
    return pump, [] if first is None else [first]
