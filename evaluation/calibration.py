"""Choosing FLARE's θ for the served model from the probabilities it actually produces.

FLARE re-retrieves when a look-ahead sentence has a token with probability ≤ θ, so for a given
model the share of sentences that trigger is the share whose **minimum judged-token
probability** is ≤ θ. ``rag flare calibrate`` answers questions with θ = 0 (nothing triggers, so
every sentence is a first look-ahead over the initial sources), records each sentence's minimum
probability, and reports the trigger rate each candidate θ would have.

Recommendation rule: θ is the ``target`` quantile of the per-sentence minimum probabilities
(default 0.4, the middle of the 30–50 % band), rounded down to 0.001, so about that share of
first look-aheads triggers a retrieval — neither FlashRAG's "retrieval never fires" nor
"retrieval on every sentence". β (the masking threshold) keeps the reference's ratio β/θ = 0.5
and never exceeds the reference's 0.4. The rate measured here is the rate on first
look-aheads; in a real answer ``max_rounds`` caps re-retrievals and the sentences after a
re-retrieval differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CANDIDATE_THETAS", "Calibration", "calibrate", "quantile"]

CANDIDATE_THETAS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PERCENTILES: tuple[int, ...] = (5, 10, 25, 40, 50, 75, 90, 95)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of ``values`` (``q`` in [0, 1]); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` found.

    Attributes:
        sentences: Look-ahead sentences measured.
        questions: Questions they came from.
        min_prob_percentiles: Percentile → per-sentence minimum probability.
        token_prob_percentiles: Percentile → probability over all judged tokens.
        trigger_rates: Candidate θ → share of sentences with minimum probability ≤ θ.
        question_trigger_rates: Candidate θ → share of questions with at least one such sentence.
        theta: Recommended θ.
        beta: Recommended β.
        target: Target trigger rate used for ``theta``.
        band: Acceptable trigger-rate band.
        rate_at_theta: Trigger rate at the recommended θ.
    """

    sentences: int
    questions: int
    min_prob_percentiles: dict[int, float]
    token_prob_percentiles: dict[int, float]
    trigger_rates: dict[float, float]
    question_trigger_rates: dict[float, float]
    theta: float
    beta: float
    target: float
    band: tuple[float, float]
    rate_at_theta: float
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready (dict keys as strings)."""
        return {
            "sentences": self.sentences,
            "questions": self.questions,
            "min_prob_percentiles": {f"p{k}": round(v, 4) for k, v in self.min_prob_percentiles.items()},
            "token_prob_percentiles": {f"p{k}": round(v, 4) for k, v in self.token_prob_percentiles.items()},
            "trigger_rates": {str(k): round(v, 4) for k, v in self.trigger_rates.items()},
            "question_trigger_rates": {str(k): round(v, 4) for k, v in self.question_trigger_rates.items()},
            "theta": self.theta,
            "beta": self.beta,
            "target": self.target,
            "band": list(self.band),
            "rate_at_theta": round(self.rate_at_theta, 4),
            "notes": self.notes,
        }


def calibrate(
    sentence_min_probs: Sequence[Sequence[float]],
    token_probs: Sequence[float],
    *,
    target: float = 0.4,
    band: tuple[float, float] = (0.3, 0.5),
    candidates: Sequence[float] = CANDIDATE_THETAS,
    max_beta: float = 0.4,
) -> Calibration:
    """Recommend θ (and β) from per-question lists of per-sentence minimum probabilities.

    Args:
        sentence_min_probs: For each question, the minimum judged-token probability of each of its
            look-ahead sentences.
        token_probs: Every judged token's probability (for the reported distribution only).
        target: Trigger rate θ should give (a quantile of the minimum probabilities).
        band: Rates considered acceptable; a note is added when the recommendation misses it
            (ties in the distribution can make the rate jump over the band).
        candidates: θ values to report rates for.
        max_beta: Upper bound of β.

    Raises:
        ValueError: No sentence to calibrate on, or ``target`` outside ``band``.
    """
    if not band[0] <= target <= band[1]:
        raise ValueError("target must lie inside band")
    flat = [p for question in sentence_min_probs for p in question]
    if not flat:
        raise ValueError("no look-ahead sentence was generated: nothing to calibrate on")
    with_sentences = [q for q in sentence_min_probs if q]

    def rate(theta: float) -> float:
        return sum(1 for p in flat if p <= theta) / len(flat)

    def question_rate(theta: float) -> float:
        return sum(1 for q in with_sentences if min(q) <= theta) / len(with_sentences)

    theta = math.floor(quantile(flat, target) * 1000) / 1000
    theta = min(max(theta, 0.001), 0.999)
    notes: list[str] = []
    achieved = rate(theta)
    if not band[0] <= achieved <= band[1]:
        notes.append(f"trigger rate at θ={theta} is {achieved:.0%}, outside the {band[0]:.0%}–{band[1]:.0%} band")
    return Calibration(
        sentences=len(flat),
        questions=len(with_sentences),
        min_prob_percentiles={p: quantile(flat, p / 100) for p in PERCENTILES},
        token_prob_percentiles={p: quantile(token_probs, p / 100) for p in PERCENTILES},
        trigger_rates={c: rate(c) for c in candidates},
        question_trigger_rates={c: question_rate(c) for c in candidates},
        theta=theta,
        beta=round(min(max_beta, theta / 2), 3),
        target=target,
        band=band,
        rate_at_theta=achieved,
        notes=notes,
    )
