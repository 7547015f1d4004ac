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
    last_job_id: int | None
    created_at: datetime
    updated_at: datetime


class DocumentList(BaseModel):
    """A page of documents."""

    documents: list[DocumentOut]
    page: Page


class UploadedFile(BaseModel):
    """One file of an upload."""

    filename: str
    path: str = Field(description="Where the server keeps it (the document's path once ingested).")
    size: int
    sha256: str
    status: Literal["new", "replaced", "unchanged"] = Field(
        description="`unchanged`: same bytes as the stored file; nothing to ingest."
    )


class UploadResponse(BaseModel):
    """The stored files and the ingestion job queued for them."""

    collection: str
    files: list[UploadedFile]
    job_id: int | None = Field(description="The queued ingestion job; null when every file was unchanged.")
