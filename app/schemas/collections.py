"""Collections on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field, StringConstraints

from app.schemas.common import CollectionName, Request, Text
from retrieval.recipe import IndexRecipe

if TYPE_CHECKING:
    from app.services.collections import CollectionInfo


class CollectionCreate(Request):
    """A new collection."""

    name: CollectionName = Field(description="1-128 letters, digits, `_`, `-`, `.`; starts with a letter or digit.")
    description: Annotated[Text, StringConstraints(max_length=2000)] | None = None


class RecipeOut(BaseModel):
    """An index recipe (``retrieval.recipe.IndexRecipe``) and its fingerprint."""

    fingerprint: str = Field(description="12 hex digits; equal recipes have equal fingerprints.")
    model_id: str
    dimension: int
    chunk_tokens: int
    overlap_tokens: int
    min_piece_tokens: int
    context_tokens: int
    context_version: int
    version: int

    @classmethod
    def from_recipe(cls, recipe: IndexRecipe) -> RecipeOut:
        """The wire form of a recipe."""
        return cls(fingerprint=recipe.fingerprint(), **recipe.to_json())


class ReindexRequest(Request):
    """Options of a reindex."""

    force: bool = Field(default=False, description="Rebuild even when the collection has the configured recipe.")


class CollectionOut(BaseModel):
    """A collection with its counts."""

    name: str
    description: str | None
    created_at: datetime
    documents: int = Field(description="Documents recorded (indexed or failed).")
    failed_documents: int
    chunks: int = Field(description="Chunks indexed.")
    recipe: RecipeOut | None = Field(
        default=None,
        description="How the chunks were cut and embedded; `null`: unknown (indexed before recipes were "
        "recorded) or no chunks yet.",
    )
    reindex_needed: bool = Field(
        default=False,
        description="The chunks' recipe differs from the configured one (or is unknown): search keeps answering "
        "from the existing index; `POST /v1/collections/{name}/reindex` rebuilds it.",
    )

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
            recipe=RecipeOut.from_recipe(info.recipe) if info.recipe is not None else None,
            reindex_needed=info.reindex_needed,
        )


class CollectionList(BaseModel):
    """The collections the caller may see."""

    collections: list[CollectionOut]
