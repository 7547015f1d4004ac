"""Ingestion jobs on the wire."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.schemas.common import CollectionName, Page, Request, Text
from core.db.models import IngestJob


class JobCreate(Request):
    """Ingest a server folder (or file) that lies under one of the allowed roots."""

    path: Text = Field(min_length=1, max_length=4096, description="Absolute path on the server.")
    collection: CollectionName
    prune: bool = Field(default=True, description="Delete documents whose files left the folder.")


class JobFiles(BaseModel):
    """Per-file outcome counters."""

    total: int
    seen: int
    new: int
    changed: int
    unchanged: int
    deleted: int
    failed: int
    skipped: int


class JobError(BaseModel):
    """A file that failed and why."""

    path: str
    reason: str


class JobOut(BaseModel):
    """A job and its progress."""

    id: int
    kind: str = Field(
        default="ingest",
        description="`ingest` (a folder or file: `root_path`) or `reindex` (the collection re-chunked and "
        "re-embedded from its stored texts; `root_path` is empty).",
    )
    collection: str
    root_path: str
    prune: bool
    status: str = Field(description="`queued`, `running`, `succeeded`, `failed` or `cancelled`.")
    cancel_requested: bool = Field(
        default=False, description="A cancel was requested; a running job stops at its next batch boundary."
    )
    progress: float = Field(description="0 to 1.")
    attempts: int
    files: JobFiles
    chunks_added: int
    chunks_removed: int
    error: str | None
    errors: list[JobError]
    extraction: dict[str, Any] = Field(
        default_factory=dict,
        description="Extraction totals of the files loaded so far (`files`, `pages`, `pages_ocr`, `characters`, "
        "`ocr_seconds`, `warnings`) and `reports`: the per-file reports of those OCR'd or warned about.",
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None

    @classmethod
    def from_row(cls, job: IngestJob, collection: str) -> JobOut:
        """The wire form of a job row (the API and ``rag jobs --json`` both print this)."""
        return cls(
            id=job.id,
            kind=job.kind or "ingest",
            collection=collection,
            root_path=job.root_path,
            prune=job.prune,
            status=job.status,
            cancel_requested=job.cancel_requested_at is not None,
            progress=job.progress,
            attempts=job.attempts,
            files=JobFiles(**job.file_counts()),
            chunks_added=job.chunks_added,
            chunks_removed=job.chunks_removed,
            error=job.error,
            errors=[JobError(path=e.get("path", ""), reason=e.get("reason", "")) for e in job.errors or []],
            extraction=dict(job.extraction or {}),
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
        )


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[JobOut]
    page: Page
