"""Document-aware dense scores: each chunk's similarity blended with its section's lead chunk's.

Chunking costs dense retrieval: a long document gets many chances to place a stray chunk high,
and a chunk deep inside a document no longer says what the document is about. A section's
*lead* chunk (its first: the title and heading context plus the opening text) is the best
single description of the section we already have a vector for. A section is a document's run
of chunks under one heading path (``Chunk.metadata["heading"]``); a document without headings
is one section. The dense leg scores a chunk ``c`` of section ``s`` as

    (1 - w) · cos(q, c) + w · cos(q, lead(s))

with ``w = SearchOptions.lead_weight`` (0 turns this off). Within a section the chunk order is
unchanged (the lead term is the same for all its chunks); across sections, one that is about
the question lifts all its chunks, and a stray chunk of an unrelated section sinks. Sections
rather than whole documents, so an answer deep in a long manual is judged with its own
chapter's opening, not the manual's title page. Measured on the dev sets in docs/retrieval.md;
no extra embedding, no extra storage on disk (the lead vectors are read back from the FAISS
index once per snapshot).

Candidates: the chunks the FAISS search returned (ranked by their own similarity) plus the lead
chunks of the documents whose leads score best, so a document whose lead matches the question
is present even when none of its chunks made the plain top list. Their blended scores are exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from retrieval.types import Chunk

if TYPE_CHECKING:
    import numpy.typing as npt

    from retrieval.dense import DenseIndex

__all__ = ["DocumentLeads", "blend_candidates", "section_leads"]


class DocumentLeads:
    """The lead chunk of every section of one snapshot, with the leads' vectors.

    Immutable once built; safe to share between threads.

    Args:
        chunks: Every chunk of the snapshot.
        dense: The snapshot's dense index (the lead vectors are reconstructed from it).
    """

    __slots__ = ("_chunk_ids", "_lead_ids", "_lead_of", "_vectors")

    def __init__(self, chunks: Iterable[Chunk], dense: DenseIndex) -> None:
        lead_of = section_leads(
            (chunk.id, chunk.document_id, chunk.metadata.get("heading"), chunk.ordinal) for chunk in chunks
        )
        lead_ids = np.array(sorted(set(lead_of.values())), dtype=np.int64)
        row_of_lead = {int(cid): row for row, cid in enumerate(lead_ids.tolist())}
        members = sorted(lead_of.items())
        self._chunk_ids: npt.NDArray[np.int64] = np.array([cid for cid, _ in members], dtype=np.int64)
        # For each chunk (sorted by id), the row of its section's lead in _vectors.
        self._lead_of: npt.NDArray[np.int64] = np.array([row_of_lead[lead] for _, lead in members], dtype=np.int64)
        self._lead_ids = lead_ids
        dim = dense.dimension
        vectors = np.empty((lead_ids.size, dim), dtype=np.float32)
        for row, cid in enumerate(lead_ids.tolist()):
            vectors[row] = dense.reconstruct(cid)
        self._vectors = vectors

    def __len__(self) -> int:
        """The number of sections."""
        return int(self._lead_ids.size)

    def blend(
        self,
        query: npt.NDArray[np.float32],
        ids: npt.NDArray[np.int64],
        scores: npt.NDArray[np.floating],
        *,
        weight: float,
        k: int,
        allowed: npt.NDArray[np.int64] | None = None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Blend a FAISS result with the leads' similarities; returns the ``k`` best, best first.

        Args:
            query: The query vector (normalized).
            ids: Chunk ids FAISS returned, with their own similarities ``scores``.
            weight: ``w`` in the module formula, in [0, 1].
            k: How many to return.
            allowed: Sorted chunk ids a filter allows (``None``: all); leads outside it are not
                added as candidates.
        """
        lead_scores = self._vectors @ np.asarray(query, dtype=np.float32)
        # Leads of the best-matching sections join the candidates with their own similarity.
        candidates = self._lead_ids
        if allowed is not None:
            keep = np.isin(self._lead_ids, allowed, assume_unique=True)
            candidates = self._lead_ids[keep]
            lead_rank_scores = lead_scores[keep]
        else:
            lead_rank_scores = lead_scores
        take = min(k, candidates.size)
        extra_ids = np.zeros(0, dtype=np.int64)
        extra_scores = np.zeros(0, dtype=np.float64)
        if take:
            top = np.argpartition(-lead_rank_scores, take - 1)[:take]
            extra_ids = candidates[top]
            extra_scores = lead_rank_scores[top].astype(np.float64)
        all_ids = np.concatenate([np.asarray(ids, dtype=np.int64), extra_ids])
        own = np.concatenate([np.asarray(scores, dtype=np.float64), extra_scores])
        rows = np.searchsorted(self._chunk_ids, all_ids)
        lead = lead_scores[self._lead_of[rows]].astype(np.float64)
        return blend_candidates(all_ids, own, lead, weight=weight, k=k)


def section_leads(chunks: Iterable[tuple[int, int, str | None, int]]) -> dict[int, int]:
    """The lead chunk of each chunk's section: ``{chunk id: lead chunk id}``.

    Args:
        chunks: ``(chunk id, document id, heading, ordinal)`` of every chunk of the sections
            (a section is a document's chunks under one heading; ``None`` and ``""`` are one).

    The lead is the chunk with the smallest ``(ordinal, id)``: the rule :class:`DocumentLeads`
    applies to a snapshot and the postgres backend's writer to each document it stores.
    """
    rows = list(chunks)
    lead: dict[tuple[int, str], tuple[int, int]] = {}
    for chunk_id, document_id, heading, ordinal in rows:
        section = (document_id, heading or "")
        best = lead.get(section)
        if best is None or (ordinal, chunk_id) < best:
            lead[section] = (ordinal, chunk_id)
    return {chunk_id: lead[(document_id, heading or "")][1] for chunk_id, document_id, heading, _ in rows}


def blend_candidates(
    ids: npt.NDArray[np.int64],
    own: npt.NDArray[np.float64],
    lead: npt.NDArray[np.float64],
    *,
    weight: float,
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The ``k`` best candidates by ``(1 - weight) · own + weight · lead``, best first, ties by id.

    Args:
        ids: Candidate chunk ids; a chunk listed twice (a lead the plain search also found) counts
            once, with its first row's scores.
        own: Each candidate's own similarity to the query.
        lead: The similarity of each candidate's section lead to the query.
        weight: ``w`` in the module formula, in [0, 1].
        k: How many to return.

    The one place the blend is computed, for both retrieval backends: the same floats in give
    the same ranking out.
    """
    ids = np.asarray(ids, dtype=np.int64)
    unique_ids, first = np.unique(ids, return_index=True)
    own = np.asarray(own, dtype=np.float64)[first]
    lead = np.asarray(lead, dtype=np.float64)[first]
    blended = (1.0 - weight) * own + weight * lead
    order = np.lexsort((unique_ids, -blended))[:k]
    return unique_ids[order], blended[order]
