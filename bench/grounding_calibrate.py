"""Calibrate the grounding guard's extractive answer and abstention rule on a dev set (no model server).

Usage (the dev set is the first N questions by id; never calibrate on the held-back questions)::

    RAG_DATA_DIR=... python bench/grounding_calibrate.py --dataset ../shared/eval/faq-dev-small -n 40

For every question it retrieves once (as ``single`` mode does, k from settings), scores every source
sentence's relevance to the question with the support scorer, then sweeps:

- the extractive answer's ``rank_bonus`` and ``extra_threshold`` (token F1 vs the gold passage, and the
  share of quoted sentences from a gold passage), next to the top-1 80-word baseline;
- the abstention thresholds over the answerable set and its derived unanswerable set
  (``evaluation.derived``): precision, recall and the answerable abstain rate per grid point.

It prints JSON; docs/grounding.md records the chosen values and the plateau they sit on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from core.settings import Settings
from evaluation.answers import load_items, open_scratch_collection, token_f1
from evaluation.beir import load_dataset
from evaluation.derived import derive_unanswerable
from generation.grounding import SupportScorer, extractive_answer
from retrieval.types import SearchFilters


async def features(settings: Settings, root: Path, n: int, *, unanswerable: bool, w: float) -> list[dict[str, Any]]:
    data = load_dataset(root)
    scratch = await open_scratch_collection(settings, data)
    out: list[dict[str, Any]] = []
    try:
        for item in load_items(data, n, unanswerable=unanswerable):
            hits = await scratch.retriever.search(
                item.question, k=settings.llm.k, filters=SearchFilters(collections=(scratch.collection,))
            )
            scorer = SupportScorer(scratch.context.embedder, dense_weight=w)
            scorer.add_sources({i: h.chunk for i, h in enumerate(hits, start=1)})
            relevance = scorer.relevance(item.question)
            dense = [h.dense.score for h in hits if h.dense is not None]
            out.append(
                {
                    "item": item,
                    "relevance": relevance,
                    "retrieval": max(dense) if dense else None,
                    "best": max((r for _, r in relevance), default=0.0),
                    "gold_paths": {p for p, pid in scratch.mapping.items() if pid in item.gold_ids},
                    "top1": " ".join(hits[0].chunk.text.split()[:80]) if hits else "",
                }
            )
    finally:
        await scratch.aclose()
    return out


def sweep_extractive(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for bonus in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        for extra in (0.4, 0.5, 0.6, 0.7, 2.0):
            f1s, gold_share = [], []
            for row in rows:
                picks = extractive_answer(row["relevance"], max_words=100, rank_bonus=bonus, extra_threshold=extra)
                text = " ".join(p.sentence.text for p in picks)
                f1s.append(token_f1(text, row["item"].gold_texts))
                if picks:
                    gold_share.append(
                        sum(Path(p.sentence.chunk.path).name in row["gold_paths"] for p in picks) / len(picks)
                    )
            results.append(
                {
                    "rank_bonus": bonus,
                    "extra_threshold": extra,
                    "f1": round(sum(f1s) / len(f1s), 4),
                    "gold_sentence_share": round(sum(gold_share) / max(1, len(gold_share)), 4),
                }
            )
    return results


def sweep_abstention(answerable: list[dict[str, Any]], missing: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for rt in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 9.0):
        for qt in (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 9.0):

            def abstain(row: dict[str, Any], rt: float = rt, qt: float = qt) -> bool:
                weak = row["best"] < qt
                return weak if row["retrieval"] is None else weak and row["retrieval"] < rt

            tp = sum(abstain(r) for r in missing)
            fp = sum(abstain(r) for r in answerable)
            results.append(
                {
                    "retrieval": rt,
                    "relevance": qt,
                    "precision": round(tp / (tp + fp), 3) if tp + fp else None,
                    "recall": round(tp / len(missing), 3),
                    "answerable_abstain": round(fp / len(answerable), 3),
                }
            )
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("--dense-weight", type=float, default=0.5)
    args = parser.parse_args()
    settings = Settings()
    source = load_dataset(args.dataset)
    derived = derive_unanswerable(source, settings.data_dir / "eval" / "derived", args.n)
    answerable = await features(settings, args.dataset, args.n, unanswerable=False, w=args.dense_weight)
    missing = await features(settings, derived, args.n, unanswerable=True, w=args.dense_weight)
    baseline = sum(token_f1(r["top1"], r["item"].gold_texts) for r in answerable) / len(answerable)
    print(
        json.dumps(
            {
                "baseline_f1_top1_80w": round(baseline, 4),
                "extractive": sweep_extractive(answerable),
                "abstention": sweep_abstention(answerable, missing),
                "features": {
                    "answerable": [(r["item"].qid, r["retrieval"], round(r["best"], 3)) for r in answerable],
                    "unanswerable": [(r["item"].qid, r["retrieval"], round(r["best"], 3)) for r in missing],
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
