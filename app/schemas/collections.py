"""Collections on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import CollectionName, Request, Text

if TYPE_CHECKING:
    from app.services.collections import CollectionInfo


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

    @classmethod
    def from_info(cls, info: CollectionInfo) -> CollectionOut:
        """The wire form of a collection (``/v1/collections`` and the MCP ``list_collections`` tool)."""
        return cls(
            name=info.name,
            description=info.description,
            created_at=info.created_at,
            documents=info.documents,
            failed_documents=info.failed_documents,
            chunks=info.chunks,
        )


class CollectionList(BaseModel):
    """The collections the caller may see."""

    collections: list[CollectionOut]
