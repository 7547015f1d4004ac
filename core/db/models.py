"""Tables: collections, documents, chunks, ingest jobs and their progress events.

Chunk ids are the join key between the database, the FAISS index and the BM25 index,
so they must never be reused: ``sqlite_autoincrement`` stops SQLite from handing out
the id of a deleted last row again (PostgreSQL sequences never reuse).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db.base import Base, BigIntPK, UTCDateTime, utcnow
from retrieval.types import Chunk as RetrievedChunk


class Collection(Base):
    """A named set of documents, searched and permissioned together."""

    __tablename__ = "collections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    recipe: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The :class:`retrieval.recipe.IndexRecipe` its chunk rows were cut and embedded with (JSON);
    ``None``: unknown (chunks written before recipes were recorded) or never set (no chunks yet).
    Written with the chunks that follow it (the first ingest, a reindex's swap), so the rows and
    their recipe always agree."""

    documents: Mapped[list[Document]] = relationship(
        back_populates="collection", cascade="all, delete-orphan", passive_deletes=True
    )


class Document(Base):
    """One source file of a collection, with the outcome of its last ingestion."""

    __tablename__ = "documents"
    __table_args__ = (UniqueConstraint("collection_id", "path", name="uq_documents_collection_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    mtime: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # indexed | failed
    error: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(16))
    title: Mapped[str | None] = mapped_column(Text)
    page_count: Mapped[int | None] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The extraction report of the last load: format, pages, pages_ocr, characters, ocr_seconds, warnings."""
    last_job_id: Mapped[int | None] = mapped_column(Integer)
    text: Mapped[str | None] = mapped_column(Text)
    """The extracted text the chunks' offsets point into (``None``: ingested before it was kept);
    a reindex re-chunks it without reading the file again."""
    layout: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """What the splitter needs besides the text: page/slide spans, row spans, markdown, page unit
    (``ingest.reindex.layout_of``)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    collection: Mapped[Collection] = relationship(back_populates="documents")
    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True
    )


class Chunk(Base):
    """A passage of a document; its id is also its FAISS id and BM25 id.

    ``start``/``end`` are character offsets into the document's extracted text.
    ``embedding`` keeps the float32 vector so indexes can be rebuilt and reconciled
    from the database alone (the database is the source of truth).
    """

    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_collection_id_id", "collection_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    page: Mapped[int | None] = mapped_column(Integer)
    token_count: Mapped[int] = mapped_column(Integer)
    heading: Mapped[str | None] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(Text)
    """Where a citation says the chunk is (``slide 2, Launch plan``, ``Prices, rows 2-14``)."""
    embedding: Mapped[bytes] = mapped_column(LargeBinary)

    document: Mapped[Document] = relationship(back_populates="chunks")

    def as_chunk(self, *, collection: str, path: str, title: str | None) -> RetrievedChunk:
        """The retrieval form of this row (the index, ``get_document_chunk`` and the document
        resources all read chunks through this one conversion)."""
        return RetrievedChunk(
            id=self.id,
            document_id=self.document_id,
            collection=collection,
            path=path,
            ordinal=self.ordinal,
            text=self.text,
            start=self.start,
            end=self.end,
            page=self.page,
            title=title,
            metadata={"heading": self.heading} if self.heading else {},
            location=self.location,
        )


class IngestJob(Base):
    """A request to (re-)ingest a folder or file into a collection, or to reindex it, and its progress."""

    __tablename__ = "ingest_jobs"
    __table_args__ = (Index("ix_ingest_jobs_status_created_at", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="ingest", server_default="ingest")
    """``ingest`` (a folder or file, ``root_path``) or ``reindex`` (the collection's stored texts
    re-chunked and re-embedded with the configured recipe; ``root_path`` is empty)."""
    root_path: Mapped[str] = mapped_column(String(4096))
    prune: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|succeeded|failed|cancelled
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    files_total: Mapped[int] = mapped_column(Integer, default=0)
    files_seen: Mapped[int] = mapped_column(Integer, default=0)
    files_new: Mapped[int] = mapped_column(Integer, default=0)
    files_changed: Mapped[int] = mapped_column(Integer, default=0)
    files_unchanged: Mapped[int] = mapped_column(Integer, default=0)
    files_deleted: Mapped[int] = mapped_column(Integer, default=0)
    files_failed: Mapped[int] = mapped_column(Integer, default=0)
    files_skipped: Mapped[int] = mapped_column(Integer, default=0)
    chunks_added: Mapped[int] = mapped_column(Integer, default=0)
    chunks_removed: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    extraction: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Extraction totals (pages, pages_ocr, characters, ocr_seconds, warnings) and ``files``: the
    reports of the files that were OCR'd or warned about (``ingest.pipeline`` writes it)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    """Set by a cancel request while the job runs; its worker stops at the next batch boundary."""

    def file_counts(self) -> dict[str, int]:
        """The per-file outcome counters, as every report of a job shows them (API, CLI, summary)."""
        return {
            "total": self.files_total,
            "seen": self.files_seen,
            "new": self.files_new,
            "changed": self.files_changed,
            "unchanged": self.files_unchanged,
            "deleted": self.files_deleted,
            "failed": self.files_failed,
            "skipped": self.files_skipped,
        }


class IngestJobEvent(Base):
    """One progress event of a job, written by the worker, read by the API's event streams.

    The table is how progress crosses from the worker process to the API process: the worker
    appends rows (in the transaction that records a batch, so events never run ahead of the
    counters), and a stream polls for rows with an id above the last one it sent. The id is
    the SSE event id, so a client resumes with ``Last-Event-ID``.
    """

    __tablename__ = "ingest_job_events"
    __table_args__ = (
        Index("ix_ingest_job_events_job_id_id", "job_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))  # file
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """An API key of the HTTP service. Only the sha256 of the token is stored, never the token.

    ``prefix`` (the first characters of the token) lets people recognise their keys in
    listings. A key is either ``admin`` (every collection, every operation) or scoped to the
    collection names in ``collections``.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    collections: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Conversation(Base):
    """A multi-turn conversation over one collection, owned by the API key that created it.

    The id is a random UUID (as text): it is handed to clients and must not be guessable.
    Deleting the collection deletes its conversations (a new collection of the same name
    starts without history).
    """

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_api_key_id_updated_at", "api_key_id", "updated_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    collection: Mapped[Collection] = relationship()
    messages: Mapped[list[Message]] = relationship(
        back_populates="conversation",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Message.id",
    )


class Message(Base):
    """One turn of a conversation: the user's question or the assistant's answer.

    Assistant messages keep the answer mode, the citations (as sent in ``citation`` events)
    and the token usage.
    """

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    content: Mapped[str] = mapped_column(Text)
    mode: Mapped[str | None] = mapped_column(String(16))
    citations: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    usage: Mapped[dict[str, int] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")
