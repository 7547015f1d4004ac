"""Fusion math on hand-checked cases (expected numbers are derived in the comments)."""

from __future__ import annotations

import math

import pytest

from retrieval.fusion import Legs, leg_scores, rrf, weighted
from retrieval.types import LegScore

pytestmark = pytest.mark.unit

DENSE = [(1, 0.9), (2, 0.8), (3, 0.7)]
SPARSE = [(3, 12.0), (4, 10.0)]


def test_rrf_hand_computed() -> None:
    # k = 60, weights 1:1.
    #   1: dense rank 1            -> 1/61          = 0.0163934...
    #   2: dense rank 2            -> 1/62          = 0.0161290...
    #   3: dense rank 3, sparse 1  -> 1/63 + 1/61   = 0.0158730 + 0.0163934 = 0.0322664...
    #   4: sparse rank 2           -> 1/62          = 0.0161290...
    # 2 and 4 tie exactly (both 1/62): the smaller id comes first.
    fused = rrf(Legs(dense=DENSE, sparse=SPARSE), k=60)
    assert [r.id for r in fused] == [3, 1, 2, 4]
    expected = {1: 1 / 61, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 62}
    for row in fused:
        assert row.score == pytest.approx(expected[row.id], abs=1e-15)
    by_id = {r.id: r for r in fused}
    assert by_id[3].dense == LegScore(rank=3, score=0.7)
    assert by_id[3].sparse == LegScore(rank=1, score=12.0)
    assert by_id[1].sparse is None
    assert by_id[4].dense is None


def test_rrf_weights_and_k() -> None:
    # weights (dense 2, sparse 1), k = 60:
    #   1: 2/61 = 0.032787   2: 2/62 = 0.032258   3: 2/63 + 1/61 = 0.048139   4: 1/62 = 0.016129
    fused = rrf(Legs(dense=DENSE, sparse=SPARSE), k=60, weights=(2.0, 1.0))
    assert [r.id for r in fused] == [3, 1, 2, 4]
    assert fused[0].score == pytest.approx(2 / 63 + 1 / 61)
    # k = 0 is plain reciprocal rank: 3 -> 1/3 + 1/1 = 1.3333, 1 -> 1, 2 -> 1/2, 4 -> 1/2.
    fused = rrf(Legs(dense=DENSE, sparse=SPARSE), k=0)
    assert [(r.id, round(r.score, 4)) for r in fused] == [(3, 1.3333), (1, 1.0), (2, 0.5), (4, 0.5)]
    # A zero weight removes a leg's influence but keeps its evidence.
    fused = rrf(Legs(dense=DENSE, sparse=SPARSE), weights=(1.0, 0.0))
    assert [r.id for r in fused][:3] == [1, 2, 3]
    assert fused[-1].id == 4 and fused[-1].score == 0.0 and fused[-1].sparse == LegScore(2, 10.0)


def test_weighted_minmax_hand_computed() -> None:
    # dense  (1: 0.9, 2: 0.5, 3: 0.1) -> min-max: 1 -> 1.0, 2 -> 0.5, 3 -> 0.0
    # sparse (3: 10, 4: 6, 2: 2)      -> min-max: 3 -> 1.0, 4 -> 0.5, 2 -> 0.0
    # missing gets the leg's minimum normalized value, 0.0 for min-max. alpha = 0.7:
    #   1: 0.7*1.0 + 0.3*0.0 (missing) = 0.70
    #   2: 0.7*0.5 + 0.3*0.0           = 0.35
    #   3: 0.7*0.0 + 0.3*1.0           = 0.30
    #   4: 0.7*0.0 (missing) + 0.3*0.5 = 0.15
    legs = Legs(dense=[(1, 0.9), (2, 0.5), (3, 0.1)], sparse=[(3, 10.0), (4, 6.0), (2, 2.0)])
    fused = weighted(legs, alpha=0.7, normalization="minmax")
    assert [r.id for r in fused] == [1, 2, 3, 4]
    assert [r.score for r in fused] == pytest.approx([0.70, 0.35, 0.30, 0.15])
    # alpha = 0 is the sparse order (1 is missing there: 0.0, tied with 2 at 0.0, id order).
    assert [r.id for r in weighted(legs, alpha=0.0, normalization="minmax")] == [3, 4, 1, 2]
    # alpha = 1 is the dense order (4 missing from dense: 0.0, tied with 3, id order).
    assert [r.id for r in weighted(legs, alpha=1.0, normalization="minmax")] == [1, 2, 3, 4]


def test_weighted_zscore_hand_computed() -> None:
    # dense  (1: 3, 2: 1):       mean 2, population std 1          -> z: 1 -> +1, 2 -> -1; floor -1
    # sparse (2: 4, 3: 2, 4: 0): mean 2, std sqrt(8/3) = 1.632993  -> z: 2 -> +1.224745, 3 -> 0,
    #                            4 -> -1.224745; floor -1.224745
    # alpha = 0.5:
    #   1: 0.5*(+1) + 0.5*(-1.224745 floor) = -0.112372
    #   2: 0.5*(-1) + 0.5*(+1.224745)       = +0.112372
    #   3: 0.5*(-1 floor) + 0.5*0           = -0.5
    #   4: 0.5*(-1 floor) + 0.5*(-1.224745) = -1.112372
    legs = Legs(dense=[(1, 3.0), (2, 1.0)], sparse=[(2, 4.0), (3, 2.0), (4, 0.0)])
    fused = weighted(legs, alpha=0.5, normalization="zscore")
    z = 2 / math.sqrt(8 / 3)
    assert [r.id for r in fused] == [2, 1, 3, 4]
    assert [r.score for r in fused] == pytest.approx([0.5 * (-1 + z), 0.5 * (1 - z), -0.5, 0.5 * (-1 - z)], abs=1e-12)


def test_weighted_zscore_missing_is_not_zero() -> None:
    # Why the floor and not 0: with z-scores, 0 is the mean. dense (1: 3, 2: 2, 3: 1) gives
    # z = +1.2247, 0, -1.2247. Chunk 9 is missing from dense and last in sparse. With "missing
    # = 0" it would beat chunk 3 on the dense side; with the floor it ties chunk 3 there.
    legs = Legs(dense=[(1, 3.0), (2, 2.0), (3, 1.0)], sparse=[(3, 5.0), (9, 1.0)])
    by_id = {r.id: r.score for r in weighted(legs, alpha=0.8, normalization="zscore")}
    # sparse z: 3 -> +1, 9 -> -1. 3: 0.8*(-1.2247) + 0.2*(+1) = -0.7798; 9: 0.8*(-1.2247) + 0.2*(-1)
    assert by_id[3] == pytest.approx(0.8 * -math.sqrt(1.5) + 0.2)
    assert by_id[9] == pytest.approx(0.8 * -math.sqrt(1.5) - 0.2)
    assert by_id[9] < by_id[3]


def test_degenerate_and_empty_legs_contribute_nothing() -> None:
    # A single sparse hit cannot be normalized (max == min): the leg adds 0 to everyone, so
    # the order is the dense order.
    legs = Legs(dense=[(1, 0.9), (2, 0.8)], sparse=[(2, 7.0)])
    for norm in ("minmax", "zscore"):
        fused = weighted(legs, alpha=0.5, normalization=norm)  # type: ignore[arg-type]
        assert [r.id for r in fused] == [1, 2]
        assert fused[1].sparse == LegScore(rank=1, score=7.0)
    only_dense = weighted(Legs(dense=[(5, 0.3), (6, 0.1)]), alpha=0.5, normalization="minmax")
    assert [(r.id, r.score) for r in only_dense] == [(5, 0.5), (6, 0.0)]
    assert weighted(Legs(), alpha=0.5) == []
    assert rrf(Legs()) == []


def test_ties_are_deterministic() -> None:
    # Identical evidence for 7 and 3 in mirrored legs: equal scores, smaller id first, in
    # whatever order the legs list them.
    a = rrf(Legs(dense=[(7, 1.0), (3, 0.5)], sparse=[(3, 1.0), (7, 0.5)]))
    b = rrf(Legs(dense=[(3, 1.0), (7, 0.5)], sparse=[(7, 1.0), (3, 0.5)]))
    assert [r.id for r in a] == [r.id for r in b] == [3, 7]
    assert a[0].score == a[1].score


def test_invalid_input() -> None:
    with pytest.raises(ValueError, match="twice"):
        leg_scores([(1, 1.0), (1, 0.5)], name="dense")
    with pytest.raises(ValueError, match="alpha"):
        weighted(Legs(dense=DENSE), alpha=1.5)
    with pytest.raises(ValueError, match="normalization"):
        weighted(Legs(dense=DENSE), alpha=0.5, normalization="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must"):
        rrf(Legs(dense=DENSE), k=-1)
    with pytest.raises(ValueError, match="weights"):
        rrf(Legs(dense=DENSE), weights=(-1.0, 1.0))
