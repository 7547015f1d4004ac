"""Fusion of the dense and sparse legs' ranked lists. Pure functions, no I/O, no numpy.

Each leg is a best-first sequence of ``(chunk_id, raw_score)`` pairs (a chunk at most
once per leg). Both fusions return :class:`Fused` rows sorted by fused score descending,
ties broken by ascending chunk id so that equal inputs always give equal output; each row
carries the chunk's :class:`~retrieval.types.LegScore` (1-based rank and raw score) in
every leg that found it.

* :func:`rrf` (reciprocal rank fusion, Cormack et al. 2009) uses ranks only:
  ``score = Σ_leg weight_leg / (k + rank_leg)``; a leg that missed the chunk adds 0.
* :func:`weighted` uses scores: each leg's scores are normalized (min-max to [0, 1] or
  z-scores), then ``score = alpha · dense + (1 − alpha) · sparse``.

  A chunk missing from a leg gets **that leg's minimum normalized value**: the leg was
  cut at a depth, so the chunk scored at most as well as the worst chunk it returned, and
  "as good as the worst returned" is the most favourable value consistent with that. (Zero
  would be wrong for z-scores, where zero is the *mean* and would rank a missing chunk
  above every returned chunk with a below-average score.) A leg whose scores are all equal
  (including a single result) cannot discriminate: every chunk, present or missing, gets 0
  from it. An empty leg contributes 0 to everyone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from retrieval.types import LegScore, Normalization

__all__ = ["Fused", "LegResults", "Legs", "leg_scores", "rrf", "weighted"]

LegResults = Sequence[tuple[int, float]]
"""One leg's results, best first: ``(chunk_id, raw_score)`` pairs."""


@dataclass(frozen=True, slots=True)
class Legs:
    """The two legs' ranked results (either may be empty)."""

    dense: LegResults = ()
    sparse: LegResults = ()


class Fused(NamedTuple):
    """A fused result row."""

    id: int
    score: float
    dense: LegScore | None
    sparse: LegScore | None


def leg_scores(leg: LegResults, *, name: str = "leg") -> dict[int, LegScore]:
    """Rank one leg: ``chunk_id -> LegScore(rank, score)`` with 1-based ranks in input order.

    Raises:
        ValueError: If a chunk id appears twice.
    """
    out: dict[int, LegScore] = {}
    for rank, (chunk_id, score) in enumerate(leg, start=1):
        if chunk_id in out:
            raise ValueError(f"chunk {chunk_id} appears twice in the {name} leg")
        out[chunk_id] = LegScore(rank=rank, score=float(score))
    return out


def _sorted(rows: list[Fused]) -> list[Fused]:
    rows.sort(key=lambda r: (-r.score, r.id))
    return rows


def rrf(legs: Legs, *, k: int = 60, weights: tuple[float, float] = (1.0, 1.0)) -> list[Fused]:
    """Weighted reciprocal rank fusion.

    Args:
        legs: The dense and sparse results, each best first.
        k: RRF constant (60 in the original paper); larger flattens the rank curve.
        weights: ``(dense_weight, sparse_weight)``.

    Returns:
        Every chunk of either leg, by ``Σ weight / (k + rank)`` descending, then id ascending.

    Raises:
        ValueError: If ``k < 0``, a weight is negative, or a leg repeats a chunk.
    """
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    w_dense, w_sparse = weights
    if w_dense < 0 or w_sparse < 0:
        raise ValueError(f"rrf weights must be >= 0, got {weights}")
    dense = leg_scores(legs.dense, name="dense")
    sparse = leg_scores(legs.sparse, name="sparse")
    rows: list[Fused] = []
    for chunk_id in dense.keys() | sparse.keys():
        d = dense.get(chunk_id)
        s = sparse.get(chunk_id)
        score = 0.0
        if d is not None:
            score += w_dense / (k + d.rank)
        if s is not None:
            score += w_sparse / (k + s.rank)
        rows.append(Fused(chunk_id, score, d, s))
    return _sorted(rows)


def _normalize(leg: dict[int, LegScore], method: Normalization) -> tuple[dict[int, float], float]:
    """Normalized score per chunk, and the value a chunk missing from the leg gets."""
    if not leg:
        return {}, 0.0
    values = [s.score for s in leg.values()]
    if method == "minmax":
        lo, hi = min(values), max(values)
        if hi == lo:
            return dict.fromkeys(leg, 0.0), 0.0
        span = hi - lo
        return {cid: (s.score - lo) / span for cid, s in leg.items()}, 0.0
    if method == "zscore":
        n = len(values)
        mean = math.fsum(values) / n
        # Population standard deviation: the leg's list is the whole population we rank.
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n)
        if std == 0.0:
            return dict.fromkeys(leg, 0.0), 0.0
        normalized = {cid: (s.score - mean) / std for cid, s in leg.items()}
        return normalized, min(normalized.values())
    raise ValueError(f"unknown normalization {method!r}")


def weighted(legs: Legs, *, alpha: float, normalization: Normalization = "minmax") -> list[Fused]:
    """Convex combination of per-leg normalized scores.

    Args:
        legs: The dense and sparse results, each best first (scores: higher is better).
        alpha: Weight of the dense leg in [0, 1]; the sparse leg gets ``1 - alpha``.
        normalization: ``"minmax"`` maps each leg to [0, 1]; ``"zscore"`` to
            ``(score - mean) / std`` (population std) over the leg's returned list.

    Returns:
        Every chunk of either leg, by fused score descending, then id ascending. A chunk
        missing from a leg gets that leg's minimum normalized value (see the module doc).

    Raises:
        ValueError: If ``alpha`` is outside [0, 1], the normalization is unknown, or a leg
            repeats a chunk.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dense = leg_scores(legs.dense, name="dense")
    sparse = leg_scores(legs.sparse, name="sparse")
    dense_norm, dense_floor = _normalize(dense, normalization)
    sparse_norm, sparse_floor = _normalize(sparse, normalization)
    rows: list[Fused] = []
    for chunk_id in dense.keys() | sparse.keys():
        score = alpha * dense_norm.get(chunk_id, dense_floor) + (1.0 - alpha) * sparse_norm.get(chunk_id, sparse_floor)
        rows.append(Fused(chunk_id, score, dense.get(chunk_id), sparse.get(chunk_id)))
    return _sorted(rows)
