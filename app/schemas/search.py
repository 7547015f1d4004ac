"""Search on the wire."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from app.schemas.common import LOCATION_DESCRIPTION, Collections, CollectionsField, Request, Text
from retrieval.documents import DocumentHit
from retrieval.types import ScoredChunk, SearchOptions


class SearchFilters(Request):
    """What to search in."""

    collections: Collections | None = Field(
        default=None,
        description="Deprecated: use the top-level `collections` (the same field as on every other route).",
        json_schema_extra={"deprecated": True},
    )
    path_prefix: Annotated[Text, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        default=None, description="Only chunks of documents whose path starts with this."
    )


class SearchParams(Request):
    """How to search; omitted fields take the server's configured defaults."""

    mode: Literal["hybrid", "dense", "sparse"] | None = None
    fusion: Literal["rrf", "weighted"] | None = Field(default=None, description="Hybrid only.")
    alpha: float | None = Field(default=None, ge=0.0, le=1.0, description="Dense weight of weighted fusion.")
    rrf_k: int | None = Field(default=None, ge=1, le=10_000, description="RRF constant.")
    depth: int | None = Field(default=None, ge=1, le=1000, description="Candidates per leg before fusion.")


class SearchRequest(CollectionsField, SearchParams):
    """A search in the named collections (``collections``)."""

    query: Annotated[Text, StringConstraints(min_length=1, max_length=4000)]
    k: int = Field(default=10, ge=1, le=100, description="Number of results (chunks, or documents when grouped).")
    filters: SearchFilters = Field(default_factory=SearchFilters)
    group_by: Literal["chunk", "document"] = Field(
        default="chunk",
        description="`document`: return the `k` best documents (`documents`), each with its best chunks as "
        "evidence; a document ranks by its best chunk.",
    )
    evidence: int = Field(default=3, ge=1, le=10, description="Chunks per document when `group_by` is `document`.")

    @model_validator(mode="after")
    def _one_scope(self) -> Any:
        legacy = self.filters.collections
        if legacy is not None and super().requested() not in (None, list(dict.fromkeys(legacy))):
            raise ValueError("`filters.collections` (deprecated) and `collections` name different collections")
        return self

    def requested(self) -> list[str] | None:
        """The named collections (top-level, or the deprecated ``filters.collections``), or ``None``."""
        named = super().requested()
        if named is None and self.filters.collections is not None:
            named = list(dict.fromkeys(self.filters.collections))
        return named


class LegOut(BaseModel):
    """Where one leg (dense or BM25) ranked a hit."""

    rank: int
    score: float


class HitOut(BaseModel):
    """One search result."""

    rank: int
    score: float = Field(description="Fused score (hybrid) or the leg's raw score (dense/sparse).")
    dense: LegOut | None
    sparse: LegOut | None
    chunk_id: int
    document_id: int
    collection: str
    path: str
    title: str | None
    page: int | None
    location: str | None = Field(
        default=None,
        description=LOCATION_DESCRIPTION,
    )
    start: int
    end: int
    text: str

    @classmethod
    def from_scored(cls, hit: ScoredChunk) -> HitOut:
        """The wire form of a search result (the API and ``rag search --json`` both print this)."""
        c = hit.chunk
        return cls(
            rank=hit.rank,
            score=hit.score,
            dense=LegOut(rank=hit.dense.rank, score=hit.dense.score) if hit.dense else None,
            sparse=LegOut(rank=hit.sparse.rank, score=hit.sparse.score) if hit.sparse else None,
            chunk_id=c.id,
            document_id=c.document_id,
            collection=c.collection,
            path=c.path,
            title=c.title,
            page=c.page,
            location=c.location,
            start=c.start,
            end=c.end,
            text=c.text,
        )


class DocumentOut(BaseModel):
    """One document of a search grouped by document."""

    rank: int
    score: float = Field(description="The document's score: its best chunk's.")
    document_id: int
    collection: str
    path: str
    title: str | None
    evidence: list[HitOut] = Field(description="Its best chunks in this search, best first.")

    @classmethod
    def from_hit(cls, doc: DocumentHit) -> DocumentOut:
        """The wire form of a grouped result."""
        first = doc.evidence[0].chunk
        return cls(
            rank=doc.rank,
            score=doc.score,
            document_id=first.document_id,
            collection=first.collection,
            path=first.path,
            title=first.title,
            evidence=[HitOut.from_scored(h) for h in doc.evidence],
        )


class OptionsOut(BaseModel):
    """The options the search ran with."""

    mode: str
    fusion: str
    alpha: float
    rrf_k: int
    depth: int


class SearchResponse(BaseModel):
    """Ranked hits with per-leg evidence."""

    query: str
    options: OptionsOut
    collections: list[str] | None = Field(description="Collections searched; null: all of them (admin).")
    hits: list[HitOut] = Field(description="The chunks found; when grouped, the documents' evidence in order.")
    documents: list[DocumentOut] | None = Field(
        default=None, description='The ranked documents when `group_by` is `"document"`, else null.'
    )
    took_ms: float
    unavailable: list[str] = Field(
        default_factory=list,
        description="Collections left out of a search that named none, because their index is unreadable "
        "(the worker is rebuilding it). Naming such a collection is a 503 `index_corrupt`.",
    )

    @classmethod
    def build(
        cls,
        query: str,
        options: SearchOptions,
        collections: Sequence[str] | None,
        hits: Sequence[ScoredChunk],
        took_ms: float,
        unavailable: Sequence[str] = (),
        documents: Sequence[DocumentHit] | None = None,
    ) -> SearchResponse:
        """The wire form of a search (``POST /v1/search`` and ``rag search --json`` both print it)."""
        o = options
        return cls(
            query=query,
            options=OptionsOut(mode=o.mode, fusion=o.fusion, alpha=o.alpha, rrf_k=o.rrf_k, depth=o.depth),
            collections=list(collections) if collections is not None else None,
            hits=[HitOut.from_scored(h) for h in hits],
            documents=[DocumentOut.from_hit(d) for d in documents] if documents is not None else None,
            took_ms=round(took_ms, 3),
            unavailable=list(unavailable),
        )
