"""Metrics through ir-measures, on hand-checked runs."""

from __future__ import annotations

import math

import pytest

from retrieval.metrics import METRIC_NAMES, evaluate, evaluate_per_query, run_from_rankings

pytestmark = pytest.mark.unit

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}
RUN = {
    "q1": {"d1": 3.0, "d9": 2.0},  # relevant at rank 1
    "q2": {"d9": 3.0, "d2": 2.0},  # relevant at rank 2
    # q3 is missing from the run: it must count as 0, not be skipped
}


def test_evaluate_hand_computed() -> None:
    # nDCG@10 per query (one relevant doc, so ideal DCG = 1): q1 = 1/log2(2) = 1,
    # q2 = 1/log2(3) = 0.630930, q3 = 0  -> mean 0.543643
    # R@10 = R@100: 1, 1, 0 -> 2/3;  RR@10: 1, 1/2, 0 -> 0.5
    result = evaluate(RUN, QRELS)
    assert list(result) == list(METRIC_NAMES)
    assert result["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert result["recall@10"] == pytest.approx(2 / 3)
    assert result["recall@100"] == pytest.approx(2 / 3)
    assert result["mrr@10"] == pytest.approx(0.5)


def test_cutoffs() -> None:
    # The relevant doc at rank 20: outside @10 (R@10 = 0, RR@10 = 0, nDCG@10 = 0), inside @100.
    ranking = [f"x{i}" for i in range(19)] + ["rel"] + [f"y{i}" for i in range(30)]
    result = evaluate(run_from_rankings({"q": ranking}), {"q": {"rel": 1}})
    assert result == {"ndcg@10": 0.0, "recall@10": 0.0, "recall@100": 1.0, "mrr@10": 0.0}


def test_per_query() -> None:
    per_query = evaluate_per_query(RUN, QRELS)
    assert set(per_query) == {"q1", "q2", "q3"}
    assert per_query["q1"] == {"ndcg@10": 1.0, "recall@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    assert per_query["q2"]["mrr@10"] == pytest.approx(0.5)
    assert per_query["q3"] == dict.fromkeys(METRIC_NAMES, 0.0)


def test_run_from_rankings_keeps_our_order() -> None:
    run = run_from_rankings({"q": ["b", "a", "c"]})
    assert run == {"q": {"b": 3.0, "a": 2.0, "c": 1.0}}
    assert evaluate(run, {"q": {"a": 1}})["mrr@10"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="twice"):
        run_from_rankings({"q": ["a", "a"]})


def test_empty_qrels() -> None:
    assert evaluate({"q": {"d": 1.0}}, {}) == dict.fromkeys(METRIC_NAMES, 0.0)
