"""Questions and whole answers on the wire."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import CollectionsField, Question, Request, Text
from app.schemas.events import CitationEvent, RetrievalEvent, Usage
from app.schemas.search import SearchParams
from generation.rag import AnswerMode


class HistoryMessage(Request):
    """An earlier turn of the conversation."""

    role: Literal["user", "assistant"]
    content: Annotated[Text, StringConstraints(max_length=20_000)]


class GenerationOptions(Request):
    """Sampling; omitted fields take the configured defaults."""

    max_tokens: int | None = Field(default=None, ge=1, le=4096, description="Cap on answer tokens.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class AskRequest(CollectionsField, GenerationOptions):
    """A question to answer from the documents of the named collections (``collections``)."""

    question: Question
    mode: AnswerMode | None = Field(default=None, description="Answer mode: `single`, `interval` or `flare`.")
    k: int | None = Field(default=None, ge=1, le=50, description="Chunks retrieved per round.")
    path_prefix: Annotated[Text, StringConstraints(min_length=1, max_length=4096)] | None = None
    history: Annotated[list[HistoryMessage], Field(max_length=100)] | None = Field(
        default=None, description="Earlier turns (not with `conversation_id`, which loads them)."
    )
    conversation_id: Annotated[str, StringConstraints(min_length=1, max_length=36)] | None = Field(
        default=None, description="A stored conversation: its history is used and this turn is appended."
    )
    search: SearchParams | None = Field(default=None, description="Retrieval options.")


class AskResponse(BaseModel):
    """The whole answer."""

    answer: str = Field(description="Answer text with `[n]` citation markers.")
    citations: list[CitationEvent]
    retrievals: list[RetrievalEvent]
    usage: Usage
    timings: dict[str, float]
    mode: str
    finish_reason: str | None
    conversation_id: str | None
