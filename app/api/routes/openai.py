"""OpenAI-compatible facade: ``POST /v1/chat/completions`` and ``GET /v1/models``."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter
from fastapi.responses import Response

from app.api import answering, openai_compat
from app.api.deps import PrincipalDep, ResourcesDep, SessionDep
from app.api.errors import RESPONSES, error_event
from app.api.streaming import SSEResponse
from app.schemas.common import ErrorResponse
from app.schemas.openai import ChatCompletion, ChatCompletionRequest, ModelList, ModelOut
from app.services import answers, collections
from generation.types import AnswerEvent

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], responses=RESPONSES)
logger = logging.getLogger(__name__)


@router.get("/models", summary="Models (OpenAI-compatible)")
async def list_models(session: SessionDep, principal: PrincipalDep) -> ModelList:
    """`rag` (every collection the key may read) and `rag:<collection>` for each visible collection."""
    now = int(time.time())
    names = await collections.visible_names(session, principal)
    return ModelList(data=[ModelOut(id="rag", created=now), *(ModelOut(id=f"rag:{n}", created=now) for n in names)])


@router.post(
    "/chat/completions",
    summary="Chat completions (OpenAI-compatible)",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "A `chat.completion`, or with `stream: true` a stream of `chat.completion.chunk` "
            "events ending with `data: [DONE]`. Both carry the extra field `citations`.",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
        },
        503: {"model": ErrorResponse, "description": "The model server is unavailable (`Retry-After`)."},
    },
)
async def chat_completions(body: ChatCompletionRequest, principal: PrincipalDep, resources: ResourcesDep) -> Response:
    """Use the service as a "model" from any OpenAI client: the last user message is the question;
    choose the collection and mode with the model name `rag:<collection>[:<mode>]` or the extra
    fields `collection` and `mode`. Citations stay in the content as `[n]` and come structured in
    the extra field `citations`."""
    ignored = sorted(set(body.model_extra or {}))
    if ignored:
        logger.info("ignored chat-completions fields", extra={"fields": ignored})
    plan = await answering.prepare(resources, principal, openai_compat.to_ask(body))
    if not body.stream:
        done = await answers.collect(answering.events(resources, plan, principal, transport="openai"))
        result = openai_compat.completion(done, model=body.model)
        return Response(result.model_dump_json(), media_type="application/json")
    encoder = openai_compat.ChunkEncoder(
        model=body.model, include_usage=bool(body.stream_options and body.stream_options.include_usage)
    )
    pump, first = await answering.open_stream(resources, plan, principal, transport="openai")

    def on_error(exc: BaseException) -> bytes:
        return openai_compat.error_frame(error_event(exc))

    return SSEResponse[AnswerEvent](
        pump,
        encode=encoder.encode,
        ping_seconds=resources.settings.api.sse_ping_seconds,
        prefix=first,
        suffix=b"data: [DONE]\n\n",
        on_error=on_error,
    )
