"""``/v1/conversations``: stored multi-turn history."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from app.api.deps import PrincipalDep, SessionDep
from app.api.errors import RESPONSES
from app.schemas.common import Page
from app.schemas.conversations import (
    ConversationCreate,
    ConversationDetail,
    ConversationList,
    ConversationOut,
    MessageOut,
)
from app.services import conversations
from core.db.models import Conversation

router = APIRouter(prefix="/v1/conversations", tags=["conversations"], responses=RESPONSES)

ConversationId = Annotated[str, Path(min_length=1, max_length=36)]


def _out(c: Conversation, collection: str) -> ConversationOut:
    return ConversationOut(
        id=c.id, collection=collection, title=c.title, created_at=c.created_at, updated_at=c.updated_at
    )


@router.post("", status_code=status.HTTP_201_CREATED, summary="Start a conversation")
async def create_conversation(
    body: ConversationCreate, session: SessionDep, principal: PrincipalDep
) -> ConversationOut:
    """A conversation over one collection; pass its `id` as `conversation_id` to `/v1/ask`,
    `/v1/ask/stream` or a websocket `ask` to use and extend its history."""
    conversation, collection = await conversations.create(
        session, principal, collection=body.collection, title=body.title
    )
    await session.commit()
    return _out(conversation, collection)


@router.get("", summary="List conversations")
async def list_conversations(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> ConversationList:
    """The key's conversations (all of them for admins), most recently active first."""
    rows, total = await conversations.list_visible(session, principal, limit=limit, offset=offset)
    return ConversationList(
        conversations=[_out(c, name) for c, name in rows], page=Page(total=total, limit=limit, offset=offset)
    )


@router.get("/{conversation_id}", summary="Get a conversation with its messages")
async def get_conversation(
    conversation_id: ConversationId, session: SessionDep, principal: PrincipalDep
) -> ConversationDetail:
    """The conversation and every message, oldest first, with the citations of each answer."""
    conversation, collection = await conversations.get(session, principal, conversation_id)
    messages = await conversations.messages(session, conversation.id)
    return ConversationDetail(
        **_out(conversation, collection).model_dump(),
        messages=[
            MessageOut(
                id=m.id,
                role=m.role,
                content=m.content,
                mode=m.mode,
                citations=list(m.citations or []),
                usage=m.usage,
                created_at=m.created_at,
            )
            for m in messages
        ],
    )
