"""Scores of one answer against its gold answers: SQuAD exact match and token F1, ROUGE-L, and
citation precision. Pure functions; :mod:`evaluation.answers` applies them per question.

SQuAD normalisation (lower case, no punctuation or articles), plus citation markers removed.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from generation.markers import strip_citations

__all__ = ["citation_precision", "exact_match", "normalize_answer", "rouge_l", "token_f1"]

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation, plus citation markers removed."""
    text = strip_citations(text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Best SQuAD token F1 against the gold answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if not pred or not ref or not common:
            continue
        precision, recall = common / len(pred), common / len(ref)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def rouge_l(prediction: str, golds: Sequence[str], scorer: Any | None = None) -> float:
    """Best ROUGE-L F-measure against the gold answers (``rouge-score``, stemmed)."""
    if scorer is None:
        from rouge_score import rouge_scorer  # type: ignore[import-untyped]

        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pred = strip_citations(prediction)
    return max((float(scorer.score(g, pred)["rougeL"].fmeasure) for g in golds), default=0.0)


def citation_precision(cited: Sequence[str | None], gold_ids: Sequence[str]) -> float | None:
    """Share of cited chunks whose passage is a gold passage; ``None`` when nothing was cited."""
    if not cited:
        return None
    gold = set(gold_ids)
    return sum(1 for pid in cited if pid in gold) / len(cited)
