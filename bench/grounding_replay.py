"""Replay recorded model answers through the grounding guard, to calibrate it without the model server.

A guard-off run (``rag eval answers ... --guard off --save before.json``) records each answer as the
model wrote it. Greedy decoding makes that the text the model produces again under the guard (the
guard only reads it, or stops it early), so this script re-retrieves each question (k from settings,
numbered 1..k as in the prompt), feeds the recorded answer through
:func:`generation.guard.guard_stream` with each parameter setting of a small grid, and scores the
guarded answers (token F1, chunk citation precision, words) next to the top-1 80-word baseline::

    RAG_DATA_DIR=... python -P bench/grounding_replay.py --dataset ../shared/eval/faq-dev-small \\
        --report before.json

It prints JSON, one row per setting; docs/grounding.md records the chosen values.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from core.settings import Settings
from evaluation.answers import citation_precision, load_items, open_scratch_collection, token_f1
from evaluation.beir import load_dataset
from generation.grounding import word_count
from generation.guard import GroundingParams, guard_stream
from generation.types import AnswerEvent, DoneEvent, RetrievalEvent, TokenEvent, Usage
from retrieval.types import SearchFilters


class CachedEmbedder:
    """The scratch embedder with every vector remembered (the grid replays the same texts)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dimension = inner.dimension
        self.cache: dict[str, Any] = {}

    def embed_documents(self, texts: Any) -> Any:
        import numpy as np

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, vector in zip(missing, self.inner.embed_documents(missing), strict=True):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts]) if texts else self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> Any:
        if text not in self.cache:
            self.cache[text] = self.inner.embed_documents([text])[0]
        return self.cache[text]

    def count_tokens(self, text: str) -> int:
        return int(self.inner.count_tokens(text))


async def replay(hits: Any, question: str, text: str, params: GroundingParams, embedder: Any) -> DoneEvent:
    retrieval = RetrievalEvent(round=0, query=question, chunks=tuple(hits), numbers=tuple(range(1, len(hits) + 1)))

    async def runner() -> AsyncIterator[AnswerEvent]:
        yield retrieval
        yield TokenEvent(text)

    def finish() -> list[AnswerEvent]:
        return [DoneEvent(text, (), (retrieval,), Usage(), {}, "single", "stop")]

    done: DoneEvent | None = None
    async for event in guard_stream(runner(), finish=finish, question=question, params=params, embedder=embedder):
        if isinstance(event, DoneEvent):
            done = event
    assert done is not None
    return done


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args()
    settings = Settings()
    report = json.loads(args.report.read_text(encoding="utf-8"))
    answers = {q["qid"]: q["answer"] for q in report["questions"]}
    data = load_dataset(args.dataset)
    scratch = await open_scratch_collection(settings, data)
    base = GroundingParams(abstain=False)
    grid = [
        replace(base, topic_margin=m, min_support_rate=r, support_threshold=t)
        for m, r, t in itertools.product((0.05, 0.1, 0.15, 0.25, 1.0), (0.5, 0.75, 1.0), (0.65, 0.7, 0.75))
    ]
    rows: list[dict[str, Any]] = []
    embedder = CachedEmbedder(scratch.context.embedder)
    try:
        items = [i for i in load_items(data, len(answers)) if i.qid in answers]
        cases = []
        for item in items:
            hits = await scratch.retriever.search(
                item.question, k=settings.llm.k, filters=SearchFilters(collections=(scratch.collection,))
            )
            cases.append((item, hits))
        baseline = statistics.fmean(
            token_f1(" ".join(h[0].chunk.text.split()[:80]), i.gold_texts) for i, h in cases if h
        )
        for params in grid:
            f1, precision, words, kept = [], [], [], 0
            for item, hits in cases:
                done = await replay(hits, item.question, answers[item.qid], params, embedder)
                f1.append(token_f1(done.answer, item.gold_texts))
                p = citation_precision([scratch.passage_of(c.path) for c in done.citations], item.gold_ids)
                if p is not None:
                    precision.append(p)
                words.append(word_count(done.answer))
                kept += done.finish_reason != "guard"
            rows.append(
                {
                    "topic_margin": params.topic_margin,
                    "min_support_rate": params.min_support_rate,
                    "support_threshold": params.support_threshold,
                    "f1": round(statistics.fmean(f1), 4),
                    "citation_precision": round(statistics.fmean(precision), 4) if precision else None,
                    "words": round(statistics.fmean(words), 1),
                    "model_answers_kept": kept,
                }
            )
    finally:
        await scratch.aclose()
    print(json.dumps({"baseline_f1": round(baseline, 4), "rows": rows}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
