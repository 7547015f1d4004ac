"""Document-aware ranking: turn a best-first list of scored chunks into ranked documents.

A pure function, no I/O. Chunk hits are grouped by their document (any hashable key: a
document id, a path); a document's score is its best chunk's score plus a geometrically
damped sum of its next ones, over its ``top`` best chunks *in the list*:

    score = s1 + decay · s2 + decay² · s3 + ...

``decay = 0`` is "best chunk wins" (the plain first-occurrence order). A small decay lets a
document that several chunks support pass one with a single stray chunk of about the same
score, without letting a long document win on volume: with ``decay`` 0.2 three chunks add at
most 24 % of the best one's score. The scores must be on a scale where adding makes sense
(cosine similarities, BM25, fused scores); on scores that may be negative (z-scores), a
weak second chunk *lowers* its document, which is the intended reading of "evidence below
the mean" but worth knowing.

Ties (equal document scores) go to the document whose best chunk comes first in the input,
so equal inputs always give equal output.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from retrieval.types import ScoredChunk

__all__ = ["DocumentHit", "RankedDocument", "group_hits", "rank_documents"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class RankedDocument(Generic[K]):
    """One document of a :func:`rank_documents` result.

    Attributes:
        key: The document key ``document_of`` returned.
        score: The damped sum of its counted chunks' scores.
        chunks: Ids of its chunks in the input, best first (all of them, not only those counted).
    """

    key: K
    score: float
    chunks: tuple[int, ...]


def rank_documents(
    rows: Iterable[tuple[int, float]],
    document_of: Callable[[int], K | None],
    *,
    decay: float = 0.0,
    top: int = 3,
) -> list[RankedDocument[K]]:
    """Rank the documents of a best-first chunk list.

    Args:
        rows: ``(chunk_id, score)`` pairs, best first (scores non-increasing), a chunk at most once.
        document_of: The document key of a chunk; ``None`` drops the chunk (e.g. unknown).
        decay: Weight ratio of each further chunk of a document, in [0, 1).
        top: How many of a document's chunks count (at least 1).

    Returns:
        Every document with a chunk in ``rows``, by score descending, then by the position of
        its best chunk in ``rows``.

    Raises:
        ValueError: If ``decay`` is outside [0, 1), ``top < 1``, or a chunk id repeats.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    seen: set[int] = set()
    chunks: dict[K, list[int]] = {}
    scores: dict[K, float] = {}
    for chunk_id, score in rows:
        if chunk_id in seen:
            raise ValueError(f"chunk {chunk_id} appears twice")
        seen.add(chunk_id)
        key = document_of(chunk_id)
        if key is None:
            continue
        got = chunks.setdefault(key, [])
        if len(got) < top:
            # The first chunk counts fully even with decay 0 (0.0 ** 0 == 1.0).
            scores[key] = scores.get(key, 0.0) + float(score) * decay ** len(got)
        got.append(chunk_id)
    # dicts keep insertion order: a document's position is that of its best chunk.
    position = {key: i for i, key in enumerate(chunks)}
    order = sorted(chunks, key=lambda key: (-scores[key], position[key]))
    return [RankedDocument(key=key, score=scores[key], chunks=tuple(chunks[key])) for key in order]


@dataclass(frozen=True, slots=True)
class DocumentHit:
    """One document of a search grouped by document (``group_by: "document"``).

    Attributes:
        rank: 1-based rank among the documents.
        score: The document's score (:func:`rank_documents` over the chunk scores).
        evidence: Its best chunks in the result list, best first (at most the requested number).
    """

    rank: int
    score: float
    evidence: tuple[ScoredChunk, ...]


def group_hits(hits: Sequence[ScoredChunk], k: int, *, decay: float = 0.0, evidence: int = 3) -> list[DocumentHit]:
    """The ``k`` best documents of a best-first chunk list, each with its ``evidence`` best chunks.

    The same rule ranks documents everywhere (:func:`rank_documents`): the API's grouped search
    and ``rag eval retrieval``'s passage ranking. Document ids are database keys, unique across
    collections, so hits of several collections group correctly.

    Raises:
        ValueError: If ``evidence < 1`` or ``decay`` is outside [0, 1).
    """
    if evidence < 1:
        raise ValueError(f"evidence must be >= 1, got {evidence}")
    by_id = {h.chunk.id: h for h in hits}
    ranked = rank_documents(((h.chunk.id, h.score) for h in hits), lambda i: by_id[i].chunk.document_id, decay=decay)
    return [
        DocumentHit(rank=rank, score=doc.score, evidence=tuple(by_id[i] for i in doc.chunks[:evidence]))
        for rank, doc in enumerate(ranked[: max(k, 0)], start=1)
    ]
