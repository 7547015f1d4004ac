"""Documents and uploads on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import Page


class DocumentOut(BaseModel):
    """A source file of a collection and the outcome of its last ingestion."""

    id: int
    collection: str
    path: str
    status: Literal["indexed", "failed"] | str
    error: str | None = Field(description="Why the file failed, when it did.")
    format: str | None
    title: str | None
    size: int
    sha256: str
    page_count: int | None
    chunk_count: int
    metadata: dict[str, Any]
    report: dict[str, Any] | None = Field(
        default=None,
        description="The extraction report of the last load: `format`, `pages` (pages, slides or sheets read), "
        "`pages_ocr`, `characters`, `ocr_seconds`, `warnings`.",
    )
    last_job_id: int | None
    created_at: datetime
    updated_at: datetime


class DocumentList(BaseModel):
    """A page of documents."""

    documents: list[DocumentOut]
    page: Page


class UploadedFile(BaseModel):
    """One file of an upload: stored, or rejected on its own (the others are still stored)."""

    filename: str
    path: str | None = Field(
        description="Where the server keeps it (the document's path once ingested); null if rejected."
    )
    size: int | None = Field(description="Bytes stored; null if rejected.")
    sha256: str | None = Field(description="Null if rejected.")
    status: Literal["new", "replaced", "unchanged", "rejected"] = Field(
        description="`unchanged`: same bytes as the stored file; nothing to ingest. "
        "`rejected`: not stored, `error` says why (unsupported type, hidden or invalid name, a name twice)."
    )
    error: str | None = Field(default=None, description="Why the file was rejected.")


class UploadResponse(BaseModel):
    """Every file's outcome, in the order sent, and the ingestion job queued for the stored ones.

    An upload in which every file is rejected fails with 422 instead (nothing was done).
    """

    collection: str
    files: list[UploadedFile]
    job_id: int | None = Field(description="The queued ingestion job; null when every file was unchanged.")
