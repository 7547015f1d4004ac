"""Value types and protocols shared by retrieval, ingestion and generation.

This module is the contract of the ``retrieval`` package. It is deliberately
light (stdlib + typing only, numpy only for type hints) so that importing it is
instant and ``generation`` can depend on it without pulling FAISS or torch.

Exception tree::

    RetrievalError
    ├── IndexMismatchError      an index on disk was built with another embedding model/dimension
    ├── IndexCorruptError       a snapshot is unreadable or inconsistent
    └── UnknownCollectionError  a search named a collection that has no index
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    FloatMatrix = npt.NDArray[np.float32]
    FloatVector = npt.NDArray[np.float32]

SearchMode = Literal["hybrid", "dense", "sparse"]
FusionMethod = Literal["rrf", "weighted"]
Normalization = Literal["minmax", "zscore"]


COLLECTION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""What a collection name may be: 1-128 letters, digits, ``.``, ``_`` or ``-``, starting with a letter
or digit, never ``..`` (which the pattern alone does not say; :func:`validate_collection_name` does).
A collection name is also a directory name of the index store, so this is
the one rule that the store, the job queue and the API's request models all apply."""

_COLLECTION_NAME_RE = re.compile(COLLECTION_NAME_PATTERN)


def validate_collection_name(name: str) -> str:
    """Return ``name`` if it is a valid collection name (:data:`COLLECTION_NAME_PATTERN`).

    Raises:
        ValueError: With the rule in the message.
    """
    if not _COLLECTION_NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid collection name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


class RetrievalError(Exception):
    """Base class of every error raised by the retrieval package.

    ``code`` is the stable name callers report (API error codes, answer ``error`` events);
    ``retryable`` says whether the same request may succeed later without anyone acting.
    """

    code = "retrieval_error"
    retryable = False


class IndexMismatchError(RetrievalError):
    """The index on disk was built with a different embedding model or dimension than configured."""

    code = "index_mismatch"


class IndexCorruptError(RetrievalError):
    """A snapshot on disk is unreadable or its parts disagree with each other.

    Retryable: the worker rebuilds a corrupt collection from the database when it notices.
    """

    code = "index_corrupt"
    retryable = True


class UnknownCollectionError(RetrievalError):
    """A search named a collection for which no index exists."""

    code = "not_found"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A passage of a document, as indexed and as cited.

    ``id`` is the database primary key of the chunk and, by design, also its
    FAISS id and its BM25 id: the three stores are reconciled on that key.
    ``start``/``end`` are character offsets into the document's extracted text
    (``text == extracted[start:end]``), ``page`` is the 1-based page or slide where known,
    ``location`` the human-readable place a citation names (``page 4``, ``slide 2, Launch
    plan``, ``Prices, rows 2-14``, ``Install > Linux``), where known.
    """

    id: int
    document_id: int
    collection: str
    path: str
    ordinal: int
    text: str
    start: int
    end: int
    page: int | None = None
    title: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON types (``metadata`` a plain dict); :meth:`from_dict` reads it back."""
        return {
            "id": self.id,
            "document_id": self.document_id,
            "collection": self.collection,
            "path": self.path,
            "ordinal": self.ordinal,
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "page": self.page,
            "title": self.title,
            "metadata": dict(self.metadata),
            "location": self.location,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Chunk:
        """The chunk :meth:`to_dict` wrote (values coerced to their types; ``metadata`` read-only)."""
        return cls(
            id=int(data["id"]),
            document_id=int(data["document_id"]),
            collection=str(data["collection"]),
            path=str(data["path"]),
            ordinal=int(data["ordinal"]),
            text=str(data["text"]),
            start=int(data["start"]),
            end=int(data["end"]),
            page=None if data.get("page") is None else int(data["page"]),
            title=None if data.get("title") is None else str(data["title"]),
            metadata=MappingProxyType({str(k): str(v) for k, v in (data.get("metadata") or {}).items()}),
            location=None if data.get("location") is None else str(data["location"]),
        )


@dataclass(frozen=True, slots=True)
class LegScore:
    """Where one retrieval leg (dense or sparse) put a chunk: 1-based rank and raw score."""

    rank: int
    score: float


@dataclass(frozen=True, slots=True)
class ScoredChunk:
    """A retrieved chunk with its final rank/score and the per-leg evidence behind them."""

    chunk: Chunk
    score: float
    rank: int
    dense: LegScore | None = None
    sparse: LegScore | None = None


@dataclass(frozen=True, slots=True)
class SearchFilters:
    """Restricts a search. ``collections=None`` means every collection the caller may see."""

    collections: tuple[str, ...] | None = None
    path_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How to search: mode, fusion and its parameters. Defaults are chosen by measurement (docs/retrieval.md)."""

    mode: SearchMode = "hybrid"
    fusion: FusionMethod = "weighted"
    depth: int = 100
    rrf_k: int = 60
    dense_weight: float = 1.0
    sparse_weight: float = 1.0
    alpha: float = 0.75
    normalization: Normalization = "zscore"
    lead_weight: float = 0.5
    """Weight of a chunk's document lead in its dense score (:mod:`retrieval.leads`); 0: off."""


def validate_search_options(options: SearchOptions) -> None:
    """The one check of search options, for every retrieval backend.

    Raises:
        ValueError: An unknown mode or fusion, ``depth < 1``, or ``lead_weight`` outside [0, 1].
    """
    if options.mode not in ("hybrid", "dense", "sparse"):
        raise ValueError(f"unknown search mode {options.mode!r}")
    if options.fusion not in ("rrf", "weighted"):
        raise ValueError(f"unknown fusion {options.fusion!r}")
    if options.depth < 1:
        raise ValueError(f"depth must be >= 1, got {options.depth}")
    if not 0.0 <= options.lead_weight <= 1.0:
        raise ValueError(f"lead_weight must be in [0, 1], got {options.lead_weight}")


@runtime_checkable
class Embedder(Protocol):
    """Turns text into L2-normalized float32 vectors of a fixed dimension."""

    @property
    def model_id(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def embed_documents(self, texts: Sequence[str]) -> FloatMatrix:
        """Embed passages; returns an array of shape ``(len(texts), dimension)``."""
        ...

    def embed_query(self, text: str) -> FloatVector:
        """Embed one query; returns an array of shape ``(dimension,)``."""
        ...

    def count_tokens(self, text: str) -> int:
        """Number of model tokens in ``text`` (without special tokens)."""
        ...


@runtime_checkable
class Retriever(Protocol):
    """Anything that answers a query with ranked chunks. Implementations keep the event loop free."""

    async def search(
        self,
        query: str,
        *,
        k: int = 10,
        filters: SearchFilters | None = None,
        options: SearchOptions | None = None,
    ) -> list[ScoredChunk]:
        """Return at most ``k`` chunks, best first."""
        ...


@runtime_checkable
class IndexCatalog(Protocol):
    """What the service asks of a retrieval backend's index besides searching it.

    :class:`retrieval.store.IndexStore` (snapshot files, ``transactional = False``: the worker
    publishes by reconciling with the database) and the ``postgres`` backend's index
    (``transactional = True``: written with the chunk rows, nothing to publish) implement it.
    """

    @property
    def transactional(self) -> bool:
        """True when index writes commit with the chunk rows (no reconcile, no publish)."""
        ...

    @property
    def model_id(self) -> str: ...

    @property
    def dimension(self) -> int: ...

    def collections(self) -> list[str]:
        """Names of the collections that have an index, sorted."""
        ...

    def unreadable(self) -> frozenset[str]:
        """Collections whose index exists but cannot be read."""
        ...

    def load(self, collection: str) -> object | None:
        """Make the collection's index ready to search (``None``: it has none).

        Raises:
            RetrievalError: If it cannot be read.
        """
        ...

    def check(self, collection: str) -> None:
        """Verify the collection's index in its storage (raises ``IndexCorruptError``)."""
        ...

    def drop(self, collection: str) -> bool:
        """Remove what a deleted collection left in the index; True if anything was removed."""
        ...
