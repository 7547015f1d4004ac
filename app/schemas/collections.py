"""Collections on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import CollectionName, Request, Text


class CollectionCreate(Request):
    """A new collection."""

    name: CollectionName = Field(description="1-128 letters, digits, `_`, `-`, `.`; starts with a letter or digit.")
    description: Annotated[Text, StringConstraints(max_length=2000)] | None = None


class CollectionOut(BaseModel):
    """A collection with its counts."""

    name: str
    description: str | None
    created_at: datetime
    documents: int = Field(description="Documents recorded (indexed or failed).")
    failed_documents: int
    chunks: int = Field(description="Chunks indexed.")


class CollectionList(BaseModel):
    """The collections the caller may see."""

    collections: list[CollectionOut]
