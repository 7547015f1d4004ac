"""Document-aware dense scores (retrieval.leads) on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.dense import DenseIndex
from retrieval.leads import DocumentLeads
from retrieval.types import Chunk

pytestmark = pytest.mark.unit


def _chunk(cid: int, doc: int, ordinal: int) -> Chunk:
    return Chunk(id=cid, document_id=doc, collection="c", path=f"/d{doc}", ordinal=ordinal, text="t", start=0, end=1)


def _unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


# Document 1: chunks 10 (lead, on topic) and 11 (off topic). Document 2: chunks 20 (lead, off
# topic) and 21 (a stray chunk very close to the query).
VECTORS = {10: _unit(1, 0.2, 0), 11: _unit(0, 1, 0), 20: _unit(0, 0, 1), 21: _unit(1, 0.05, 0.05)}
CHUNKS = [_chunk(10, 1, 0), _chunk(11, 1, 1), _chunk(20, 2, 0), _chunk(21, 2, 1)]
QUERY = _unit(1, 0, 0)


@pytest.fixture
def leads() -> DocumentLeads:
    dense = DenseIndex(3, accelerator=None)
    dense.add(list(VECTORS), np.stack(list(VECTORS.values())))
    return DocumentLeads(CHUNKS, dense)


def cos(cid: int) -> float:
    return float(VECTORS[cid] @ QUERY)


def test_a_chunk_scores_with_its_document_lead(leads: DocumentLeads) -> None:
    assert len(leads) == 2
    ids = np.array([21, 10], dtype=np.int64)
    ids_out, scores = leads.blend(QUERY, ids, np.array([cos(21), cos(10)]), weight=0.5, k=4)
    got = dict(zip(ids_out.tolist(), scores.tolist(), strict=True))
    # The stray chunk 21 is the closest by itself, but its document's lead (20) is off topic.
    assert got[21] == pytest.approx(0.5 * cos(21) + 0.5 * cos(20))
    assert got[10] == pytest.approx(cos(10))  # a lead blends with itself
    assert ids_out[0] == 10
    # Lead 20 joined the candidates although FAISS did not return it; 11 was never a candidate.
    assert set(ids_out.tolist()) == {10, 20, 21}
    assert list(scores) == sorted(scores, reverse=True)


def test_sections_under_their_own_heading_have_their_own_lead() -> None:
    chunks = [
        Chunk(id=1, document_id=1, collection="c", path="/m", ordinal=0, text="t", start=0, end=1),
        Chunk(id=2, document_id=1, collection="c", path="/m", ordinal=1, text="t", start=0, end=1),
        Chunk(
            id=3,
            document_id=1,
            collection="c",
            path="/m",
            ordinal=2,
            text="t",
            start=0,
            end=1,
            metadata={"heading": "Manual > Chapter 2"},
        ),
    ]
    vectors = {1: _unit(0, 0, 1), 2: _unit(0, 1, 0), 3: _unit(1, 0, 0)}
    dense = DenseIndex(3, accelerator=None)
    dense.add(list(vectors), np.stack(list(vectors.values())))
    leads = DocumentLeads(chunks, dense)
    assert len(leads) == 2  # the untitled opening, and chapter 2
    ids, scores = leads.blend(QUERY, np.array([3, 2]), np.array([1.0, 0.0]), weight=0.5, k=3)
    got = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    assert got[3] == pytest.approx(1.0)  # chapter 2's own lead: itself, not the manual's opening
    assert got[2] == pytest.approx(0.5 * 0.0 + 0.5 * 0.0)  # blended with chunk 1, the opening


def test_weight_zero_keeps_own_scores_and_filters_keep_leads_out(leads: DocumentLeads) -> None:
    ids_out, scores = leads.blend(QUERY, np.array([21]), np.array([cos(21)]), weight=0.0, k=1)
    assert ids_out.tolist() == [21] and scores[0] == pytest.approx(cos(21))
    allowed = np.array([20, 21], dtype=np.int64)  # a path filter that only allows document 2
    ids_out, _ = leads.blend(QUERY, np.array([21]), np.array([cos(21)]), weight=0.5, k=4, allowed=allowed)
    assert set(ids_out.tolist()) == {20, 21}
