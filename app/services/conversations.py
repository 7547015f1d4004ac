"""Conversations: multi-turn history stored per API key and collection.

A conversation belongs to the key that created it (admins see all) and to one collection; a
key sees it only while the collection is in its scope. Turns are appended after an answer is
complete, in a short transaction of their own: nothing is held open while the model talks.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.services import collections as collections_service
from app.services.errors import NotFound
from app.services.keys import Principal
from core.db.base import utcnow
from core.db.models import Collection, Conversation, Message
from generation.types import ChatMessage, DoneEvent

_TITLE_CHARS = 80


def _visible(principal: Principal) -> list[Any]:
    where: list[Any] = []
    if not principal.admin:
        where.append(Conversation.api_key_id == principal.key_id)
        where.append(Collection.name.in_(sorted(principal.collections)))
    return where


def title_for(question: str) -> str:
    """A title from the first question: its first line, shortened."""
    line = " ".join(question.split())
    return line if len(line) <= _TITLE_CHARS else line[: _TITLE_CHARS - 1] + "…"


async def create(
    session: AsyncSession, principal: Principal, *, collection: str, title: str | None = None
) -> tuple[Conversation, str]:
    """Start a conversation (flushes, never commits).

    Raises:
        NotFound: The collection is missing or outside the principal's scope.
    """
    coll = await collections_service.require(session, principal, collection)
    now = utcnow()
    conversation = Conversation(
        id=str(uuid.uuid4()),
        collection_id=coll.id,
        title=title or "New conversation",
        api_key_id=principal.key_id,
        created_at=now,
        updated_at=now,
    )
    session.add(conversation)
    await session.flush()
    return conversation, coll.name


async def get(session: AsyncSession, principal: Principal, conversation_id: str) -> tuple[Conversation, str]:
    """A visible conversation and its collection's name.

    Raises:
        NotFound: Missing or not visible to the principal.
    """
    row = (
        await session.execute(
            select(Conversation, Collection.name)
            .join(Collection, Collection.id == Conversation.collection_id)
            .where(Conversation.id == conversation_id, *_visible(principal))
        )
    ).first()
    if row is None:
        raise NotFound(f"conversation {conversation_id!r} not found")
    return row[0], row[1]


async def list_visible(
    session: AsyncSession, principal: Principal, *, limit: int = 50, offset: int = 0
) -> tuple[list[tuple[Conversation, str]], int]:
    """Visible conversations, most recently active first, and their total count."""
    where = _visible(principal)
    joined = select(Conversation, Collection.name).join(Collection, Collection.id == Conversation.collection_id)
    total = await session.scalar(
        select(func.count(Conversation.id)).join(Collection, Collection.id == Conversation.collection_id).where(*where)
    )
    rows = await session.execute(
        joined.where(*where).order_by(Conversation.updated_at.desc(), Conversation.id).limit(limit).offset(offset)
    )
    return [(c, name) for c, name in rows], int(total or 0)


async def messages(session: AsyncSession, conversation_id: str, *, last: int | None = None) -> list[Message]:
    """A conversation's messages, oldest first (only the ``last`` ones if given)."""
    stmt = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id.desc())
    if last is not None:
        stmt = stmt.limit(last)
    return list(reversed(list(await session.scalars(stmt))))


async def history(
    session: AsyncSession, principal: Principal, conversation_id: str, *, last: int
) -> tuple[Conversation, str, list[ChatMessage]]:
    """A visible conversation, its collection, and its latest ``last`` turns as chat history.

    Raises:
        NotFound: Missing or not visible to the principal.
    """
    conversation, collection = await get(session, principal, conversation_id)
    turns = await messages(session, conversation_id, last=last) if last > 0 else []
    chat = [ChatMessage(role="assistant" if m.role == "assistant" else "user", content=m.content) for m in turns]
    return conversation, collection, chat


async def append_turn(
    session: AsyncSession, conversation_id: str, *, question: str, done: DoneEvent, citations: Sequence[dict[str, Any]]
) -> None:
    """Store a question and its answer (flushes, never commits)."""
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None:  # deleted (with its collection) while the model was answering
        return
    now = utcnow()
    if conversation.title == "New conversation":
        conversation.title = title_for(question)
    conversation.updated_at = now
    usage = {
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "total_tokens": done.usage.total_tokens,
    }
    session.add(Message(conversation_id=conversation_id, role="user", content=question, citations=[], created_at=now))
    session.add(
        Message(
            conversation_id=conversation_id,
            role="assistant",
            content=done.answer,
            mode=done.mode,
            citations=list(citations),
            usage=usage,
            created_at=now,
        )
    )
    await session.flush()
