"""Document-aware ranking on hand-checked cases (expected numbers are derived in the comments)."""

from __future__ import annotations

import pytest

from retrieval.documents import RankedDocument, group_hits, rank_documents
from retrieval.types import Chunk, ScoredChunk

pytestmark = pytest.mark.unit

# Chunks 1-3 belong to document "a", 4-5 to "b", 6 to "c".
OWNER = {1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "c"}
ROWS = [(4, 0.90), (1, 0.89), (2, 0.80), (6, 0.75), (3, 0.70), (5, 0.10)]


def test_decay_zero_is_best_chunk_order() -> None:
    ranked = rank_documents(ROWS, OWNER.get)
    assert [d.key for d in ranked] == ["b", "a", "c"]
    assert ranked[0] == RankedDocument(key="b", score=0.90, chunks=(4, 5))
    assert ranked[1].chunks == (1, 2, 3)
    assert [d.score for d in ranked] == [0.90, 0.89, 0.75]


def test_damped_sum_hand_computed() -> None:
    # decay 0.2, top 3:
    #   a: 0.89 + 0.2·0.80 + 0.04·0.70 = 0.89 + 0.16 + 0.028 = 1.078
    #   b: 0.90 + 0.2·0.10             = 0.92
    #   c: 0.75
    ranked = rank_documents(ROWS, OWNER.get, decay=0.2)
    assert [d.key for d in ranked] == ["a", "b", "c"]
    assert [d.score for d in ranked] == pytest.approx([1.078, 0.92, 0.75])


def test_top_limits_the_counted_chunks_not_the_listed_ones() -> None:
    # top 2: a = 0.89 + 0.2·0.80 = 1.05 (chunk 3 listed, not counted).
    ranked = rank_documents(ROWS, OWNER.get, decay=0.2, top=2)
    assert ranked[0].key == "a"
    assert ranked[0].score == pytest.approx(1.05)
    assert ranked[0].chunks == (1, 2, 3)


def test_negative_scores_lower_a_document() -> None:
    # z-scores: a weak second chunk below the mean pulls its document down.
    rows = [(1, 1.0), (4, 0.99), (2, -1.0)]
    assert [d.key for d in rank_documents(rows, OWNER.get, decay=0.1)] == ["b", "a"]


def test_ties_go_to_the_earlier_best_chunk() -> None:
    rows = [(6, 0.5), (4, 0.5), (1, 0.5)]
    assert [d.key for d in rank_documents(rows, OWNER.get)] == ["c", "b", "a"]
    # Same documents, another input order: the output follows the input, deterministically.
    rows = [(1, 0.5), (6, 0.5), (4, 0.5)]
    assert [d.key for d in rank_documents(rows, OWNER.get)] == ["a", "c", "b"]


def test_unknown_chunks_are_dropped_and_empty_input_is_empty() -> None:
    ranked = rank_documents([(99, 1.0), (6, 0.5)], OWNER.get)
    assert [(d.key, d.chunks) for d in ranked] == [("c", (6,))]
    assert rank_documents([], OWNER.get, decay=0.3) == []


@pytest.mark.parametrize(("decay", "top"), [(-0.1, 3), (1.0, 3), (0.2, 0)])
def test_invalid_arguments(decay: float, top: int) -> None:
    with pytest.raises(ValueError):
        rank_documents(ROWS, OWNER.get, decay=decay, top=top)


def test_repeated_chunk_is_an_error() -> None:
    with pytest.raises(ValueError, match="chunk 1 appears twice"):
        rank_documents([(1, 0.9), (1, 0.8)], OWNER.get)


def _hit(chunk_id: int, document_id: int, score: float, rank: int) -> ScoredChunk:
    chunk = Chunk(
        id=chunk_id,
        document_id=document_id,
        collection="c",
        path=f"/d{document_id}.md",
        ordinal=chunk_id,
        text=f"chunk {chunk_id}",
        start=0,
        end=7,
    )
    return ScoredChunk(chunk=chunk, score=score, rank=rank)


def test_grouped_hits_give_documents_with_their_best_chunks_as_evidence() -> None:
    # Document 10 owns chunks 1-3, document 20 chunks 4-5, document 30 chunk 6 (OWNER above).
    docs = {"a": 10, "b": 20, "c": 30}
    hits = [_hit(cid, docs[OWNER[cid]], score, rank) for rank, (cid, score) in enumerate(ROWS, start=1)]
    grouped = group_hits(hits, k=2, evidence=2)
    assert [(d.rank, d.evidence[0].chunk.document_id) for d in grouped] == [(1, 20), (2, 10)]
    assert [h.chunk.id for h in grouped[0].evidence] == [4, 5]
    assert [h.chunk.id for h in grouped[1].evidence] == [1, 2]  # cut at two, best first
    assert grouped[0].score == pytest.approx(0.90)
    assert len(group_hits(hits, k=10)) == 3  # fewer documents than asked: all of them
    with pytest.raises(ValueError, match="evidence"):
        group_hits(hits, k=2, evidence=0)
