"""Shared wire types: constrained strings, the error body, request base class."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from retrieval.types import COLLECTION_NAME_PATTERN, validate_collection_name


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

Text = Annotated[str, AfterValidator(_no_nul)]
"""Free text stored or echoed by the service (no NUL characters, no lone surrogates)."""

Question = Annotated[str, StringConstraints(min_length=1, max_length=20_000), AfterValidator(_no_nul)]


class Request(BaseModel):
    """Base of request bodies: unknown fields are an error (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")


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
