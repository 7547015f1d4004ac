"""Conversations on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import CollectionName, Page, Request, Text


class ConversationCreate(Request):
    """A new conversation over one collection."""

    collection: CollectionName
    title: Annotated[Text, StringConstraints(max_length=200)] | None = None


class ConversationOut(BaseModel):
    """A conversation without its messages."""

    id: str
    collection: str
    title: str
    created_at: datetime
    updated_at: datetime


class MessageOut(BaseModel):
    """One turn."""

    id: int
    role: str
    content: str
    mode: str | None
    citations: list[dict[str, Any]] = Field(description="Citation events of an assistant turn.")
    usage: dict[str, int] | None
    created_at: datetime


class ConversationDetail(ConversationOut):
    """A conversation with its messages, oldest first."""

    messages: list[MessageOut]


class ConversationList(BaseModel):
    """A page of conversations, most recently active first."""

    conversations: list[ConversationOut]
    page: Page
