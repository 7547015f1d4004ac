"""Retrieval quality metrics, computed by ir-measures (pytrec_eval underneath).

Metrics are not hand-rolled: trec_eval's definitions are the ones papers and BEIR report,
and small differences (ties, gain functions, cut-offs) matter when comparing numbers.

Conventions (those of ir-measures/trec_eval):

* Every query in ``qrels`` counts; a query missing from the run scores 0. Queries in the
  run without judgments are ignored.
* Documents are ranked by run score descending; ties are broken by the tool, not by the
  order of the dict. Use :func:`run_from_rankings` to turn ranked lists into a run whose
  scores reproduce the intended order exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METRIC_NAMES", "evaluate", "evaluate_per_query", "run_from_rankings"]

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

METRIC_NAMES: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")
"""Keys of :func:`evaluate`'s result, in report order."""


def _measures() -> dict[str, Any]:
    # Imported here: ir-measures is only needed by evaluation code, not by serving.
    from ir_measures import RR, R, nDCG

    return {"ndcg@10": nDCG @ 10, "recall@10": R @ 10, "recall@100": R @ 100, "mrr@10": RR @ 10}


def _plain(run: Run, qrels: Qrels) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    # ir-measures wants plain dicts of dicts with str keys.
    return (
        {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()},
        {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()},
    )


def evaluate(run: Run, qrels: Qrels) -> dict[str, float]:
    """Mean nDCG@10, R@10, R@100 and RR@10 over the judged queries.

    Args:
        run: ``query_id -> {doc_id: score}`` (higher is better).
        qrels: ``query_id -> {doc_id: relevance}`` (``> 0`` is relevant).

    Returns:
        ``{"ndcg@10", "recall@10", "recall@100", "mrr@10"}`` → value in [0, 1]; all 0.0 when
        ``qrels`` is empty.
    """
    import ir_measures

    measures = _measures()
    plain_run, plain_qrels = _plain(run, qrels)
    if not plain_qrels:
        return dict.fromkeys(measures, 0.0)
    result = ir_measures.calc_aggregate(list(measures.values()), plain_qrels, plain_run)
    return {name: float(result.get(measure, 0.0)) for name, measure in measures.items()}


def evaluate_per_query(run: Run, qrels: Qrels) -> dict[str, dict[str, float]]:
    """Per-query values of the :func:`evaluate` metrics, for every judged query.

    Returns:
        ``query_id -> {metric name -> value}``; queries absent from the run get 0.0.
    """
    import ir_measures

    measures = _measures()
    by_measure = {measure: name for name, measure in measures.items()}
    plain_run, plain_qrels = _plain(run, qrels)
    out: dict[str, dict[str, float]] = {q: dict.fromkeys(measures, 0.0) for q in plain_qrels}
    for metric in ir_measures.iter_calc(list(measures.values()), plain_qrels, plain_run):
        if metric.query_id in out:
            out[metric.query_id][by_measure[metric.measure]] = float(metric.value)
    return out


def run_from_rankings(rankings: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Turn ranked doc-id lists into a run with strictly decreasing scores.

    Fused scores often tie; giving the i-th of n documents the score ``n - i`` makes the
    evaluation follow our ranking rather than the evaluator's tie-breaking.

    Raises:
        ValueError: If a ranking lists a document twice.
    """
    run: dict[str, dict[str, float]] = {}
    for query_id, docs in rankings.items():
        scores = {doc: float(len(docs) - i) for i, doc in enumerate(docs)}
        if len(scores) != len(docs):
            raise ValueError(f"query {query_id!r}: a document is ranked twice")
        run[query_id] = scores
    return run
