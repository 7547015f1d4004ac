"""``POST /v1/ask`` (whole answer as JSON) and ``POST /v1/ask/stream`` (Server-Sent Events)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api import answering
from app.api.deps import PrincipalDep, ResourcesDep
from app.api.errors import RESPONSES, error_event
from app.api.streaming import SSEResponse, sse_event
from app.schemas.ask import AskRequest, AskResponse
from app.schemas.common import ErrorResponse
from app.schemas.events import to_wire, wire_dict
from app.services import answers
from generation.types import AnswerEvent

router = APIRouter(prefix="/v1", tags=["answers"], responses=RESPONSES)

_ANSWER_ERRORS: dict[int | str, dict[str, Any]] = {
    502: {"model": ErrorResponse, "description": "The model server failed."},
    503: {
        "model": ErrorResponse,
        "description": "The model server is unavailable; retry after `Retry-After` seconds.",
    },
    504: {"model": ErrorResponse, "description": "The model server timed out."},
}


@router.post("/ask", summary="Answer a question (whole answer)", responses=_ANSWER_ERRORS)
async def ask(body: AskRequest, principal: PrincipalDep, resources: ResourcesDep) -> AskResponse:
    """Answer from the collection's documents: the text with `[n]` markers, the cited passages
    (chunk ids, paths, pages, character spans, snippets), every retrieval round, timings and usage.
    With `conversation_id`, the conversation's history is used and the turn is stored."""
    plan = await answering.prepare(resources, principal, body)
    done = await answers.collect(answering.events(resources, plan, principal, transport="rest"))
    wire = to_wire(done)
    return AskResponse.model_validate({**wire.model_dump(exclude={"type"}), "conversation_id": plan.conversation_id})


def _frame(event: AnswerEvent) -> bytes:
    return sse_event(event.type, wire_dict(event))


def _error_frame(exc: BaseException) -> bytes:
    event = error_event(exc)
    return sse_event(event.type, wire_dict(event))


@router.post(
    "/ask/stream",
    summary="Answer a question as Server-Sent Events",
    response_class=SSEResponse,
    response_model=None,
    status_code=200,
    responses={
        200: {
            "description": "`retrieval`, `citation`, `token` events, then `done` or `error` (see `AnswerEvent`). "
            "Comment lines (`: ping`) keep idle connections open.",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/AnswerEvent"}}},
        },
        **_ANSWER_ERRORS,
    },
)
async def ask_stream(body: AskRequest, principal: PrincipalDep, resources: ResourcesDep) -> SSEResponse[AnswerEvent]:
    """The answer as it is generated. Each event is `event: <type>` + `data: <json>`; the stream
    always ends with a `done` or an `error` event. Closing the connection stops the generation."""
    plan = await answering.prepare(resources, principal, body)
    pump, first = await answering.open_stream(resources, plan, principal, transport="sse")
    return SSEResponse(
        pump,
        encode=_frame,
        ping_seconds=resources.settings.api.sse_ping_seconds,
        prefix=first,
        on_error=_error_frame,
    )
