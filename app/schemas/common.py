"""Shared wire types: constrained strings, the error body, request base class."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

from retrieval.types import COLLECTION_NAME_PATTERN, validate_collection_name

LOCATION_DESCRIPTION = (
    "Where the chunk is, for people: `page 4`, `slide 2, Launch plan`, `Prices, rows 2-14` (sheet and rows), "
    "`Install > Linux` (heading path); null when unknown."
)
"""The one description of a chunk's ``location`` on the wire (chunks, hits, citations)."""


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; refusing it here keeps both backends alike.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        # JSON may spell a lone surrogate ("\ud800"): a str Python holds but no encoder, database
        # or tokenizer can take; refused here instead of failing deep inside a request (was a 500).
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return value


CollectionName = Annotated[
    str, StringConstraints(pattern=COLLECTION_NAME_PATTERN), AfterValidator(validate_collection_name)
]
"""1-128 letters, digits, ``_``, ``-`` or ``.``, starting with a letter or digit, no ``..``
(:func:`retrieval.types.validate_collection_name`, the rule the index store applies)."""


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Collections = Annotated[list[CollectionName], BeforeValidator(_one_or_many), Field(min_length=1, max_length=100)]
"""One collection name or a list of them (``"manuals"`` is ``["manuals"]``), each a :data:`CollectionName`."""

Text = Annotated[str, AfterValidator(_no_nul)]
"""Free text stored or echoed by the service (no NUL characters, no lone surrogates)."""

Question = Annotated[str, StringConstraints(min_length=1, max_length=20_000), AfterValidator(_no_nul)]


class Request(BaseModel):
    """Base of request bodies: unknown fields are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


class CollectionsField(BaseModel):
    """The one way every question and search names its collections: ``collections``, a name or a
    list of names. ``collection`` (a single name) is the deprecated spelling, still accepted.

    Consumers read :meth:`requested` (``None``: every collection the key may read).
    """

    collections: Collections | None = Field(
        default=None,
        description="A collection name or a list of names; omitted: every collection the key may read.",
        examples=["manuals", ["manuals", "notes"]],
    )
    collection: CollectionName | None = Field(
        default=None,
        description="Deprecated: use `collections` (which also takes a single name).",
        json_schema_extra={"deprecated": True},
    )

    @model_validator(mode="after")
    def _one_spelling(self) -> Any:
        if self.collection is not None and self.collections not in (None, [self.collection]):
            raise ValueError("`collection` (deprecated) and `collections` name different collections; send only one")
        return self

    def requested(self) -> list[str] | None:
        """The named collections without duplicates, in order; ``None`` when none was named."""
        names = self.collections if self.collections is not None else None
        if names is None and self.collection is not None:
            names = [self.collection]
        return list(dict.fromkeys(names)) if names is not None else None


class FieldError(BaseModel):
    """One invalid input field."""

    field: str = Field(description="Location, e.g. `body.k` or `query.limit`.")
    message: str


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. `not_found`, `llm_unavailable`.")
    message: str = Field(description="Human-readable explanation.")
    retryable: bool = Field(default=False, description="Whether the same request may succeed later.")
    fields: list[FieldError] | None = Field(default=None, description="Invalid fields (422 only).")


class ErrorResponse(BaseModel):
    """Body of every error response (the shape OpenAI clients also understand)."""

    error: ErrorDetail


class Page(BaseModel):
    """Paging information of a list."""

    total: int
    limit: int
    offset: int


DOCUMENT_URI = "rag://{collection}/documents/{document_id}"
"""A document's address: the MCP resource that serves its text, and the ``url`` of the OpenAI
facade's citation annotations (so a client can read the cited document through MCP)."""


def document_uri(collection: str, document_id: int) -> str:
    """:data:`DOCUMENT_URI` for one document."""
    return DOCUMENT_URI.format(collection=collection, document_id=document_id)
