"""``rag eval answers``: answer quality of one answer mode over a QA dataset in BEIR layout.

Dataset layout (any folder in it works; see ``docs/flare.md``)::

    corpus.jsonl     {"_id", "title", "text"}  passages (ingested into a scratch collection)
    queries.jsonl    {"_id", "text"}           questions
    qrels/test.tsv   query-id, corpus-id, score (header line optional)

The gold answer of a question is the text of its relevant passages (score > 0): each metric
takes the best match over them. The same passages are the gold citations.

Per question: exact match and token F1 (SQuAD normalisation: lower case, no punctuation,
articles or citation markers), ROUGE-L F-measure (Google's ``rouge-score``, Porter stemming),
citation precision (share of cited chunks that belong to a gold passage: the scratch
collection maps every chunk's file name back to its passage id; answers citing nothing are
left out of the mean and counted in ``cited_rate``), retrieval rounds, whether a gold passage
was in any prompt (``gold_in_context``), latency and time to first token. Questions are taken
in ``_id`` order, so ``questions=N`` is the same subset for every mode and run.

Grounding metrics (docs/grounding.md), the same for every mode and guard policy:

- ``support_rate``: share of answer sentences the support scorer (:mod:`generation.grounding`,
  the calibrated threshold) finds supported by the chunks in the prompt; computed after the fact
  on the shown answer, so runs with and without the guard are scored alike;
- ``sentence_citation_precision``: of the (sentence, cited source) pairs of ``[n]`` markers, the
  share whose source is a gold passage; ``sentence_citation_recall``: share of answer sentences
  that cite a gold passage (gold-based, independent of the scorer);
- ``words``: answer length; ``repeats`` / ``source_ids``: answers that repeat a sentence or
  print a source header, file name or document id;
- ``baseline_f1`` / ``baseline_rouge_l``: the first 80 words of the top-1 retrieved chunk, same
  run; ``top1_accuracy``: the top-1 chunk is a gold passage;
- on an unanswerable set (``unanswerable=True``: gold passages removed from the corpus), the
  ``no_answer`` rate is the abstention recall; :func:`abstention` combines both runs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from core.pgindex.index import PgRetriever
from core.settings import Settings
from core.wiring import answer_defaults, build_llm_client, build_retriever, generation_params
from evaluation.answer_metrics import citation_precision, exact_match, normalize_answer, rouge_l, token_f1
from evaluation.beir import Dataset
from evaluation.derived import derive_followups
from evaluation.retrieval import materialize_dataset, scratch_collection
from generation.flare import FlareParams, SentenceJudgement
from generation.grounding import (
    SupportScorer,
    copies_source_header,
    marker_numbers,
    normalise_sentence,
    split_sentences,
    word_count,
)
from generation.guard import GroundingParams
from generation.prompts import NO_ANSWER
from generation.rag import AnswerMode, answer
from generation.types import ChatMessage, DoneEvent, ErrorEvent
from ingest.worker import IngestContext, build_ingest_context, enqueue_path, run_job
from retrieval.hybrid import HybridRetriever
from retrieval.types import Chunk, Embedder, SearchFilters

__all__ = [
    "AnswerEvalReport",
    "QAItem",
    "QuestionResult",
    "ScratchCollection",
    "abstention",
    "citation_precision",
    "evaluate_answers",
    "evaluate_followups",
    "exact_match",
    "load_items",
    "normalize_answer",
    "open_scratch_collection",
    "rouge_l",
    "summarize_flare",
    "token_f1",
]


# --- dataset -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QAItem:
    """A question with its gold passages."""

    qid: str
    question: str
    gold_ids: tuple[str, ...]
    gold_texts: tuple[str, ...]


def load_items(dataset: Dataset, questions: int | None = None, *, unanswerable: bool = False) -> list[QAItem]:
    """The first ``questions`` judged questions by ``_id`` (all when ``None``), with gold passage texts.

    Questions whose relevant passages are all missing from the corpus are skipped, unless
    ``unanswerable`` (a derived set whose gold passages were removed on purpose; no gold texts).
    """
    qids = sorted(dataset.queries)
    wanted: dict[str, tuple[str, ...]] = {}
    for qid in qids:
        gold = tuple(pid for pid, rel in dataset.qrels.get(qid, {}).items() if rel > 0)
        if gold:
            wanted[qid] = gold
    needed = {pid for gold in wanted.values() for pid in gold}
    texts = {p.id: p.text for p in dataset.passages() if p.id in needed}
    items: list[QAItem] = []
    for qid, gold in wanted.items():
        present = tuple(pid for pid in gold if pid in texts)
        if unanswerable:
            items.append(QAItem(qid, dataset.queries[qid], gold, ()))
        elif present:
            items.append(QAItem(qid, dataset.queries[qid], present, tuple(texts[pid] for pid in present)))
        if questions is not None and len(items) >= questions:
            break
    return items


# --- the scratch collection ---------------------------------------------------------------------


@dataclass
class ScratchCollection:
    """A dataset ingested into its scratch collection, ready to answer from."""

    context: IngestContext
    collection: str
    mapping: dict[str, str]
    """Chunk file name → passage id."""
    retriever: HybridRetriever | PgRetriever

    def passage_of(self, path: str) -> str | None:
        """The passage id of a chunk's document path."""
        return self.mapping.get(Path(path).name)

    async def aclose(self) -> None:
        """Close the ingestion context (database engine, index store)."""
        await self.context.aclose()


async def open_scratch_collection(
    settings: Settings, dataset: Dataset, *, log: Callable[[str], None] | None = None
) -> ScratchCollection:
    """Ingest ``dataset``'s corpus into its scratch collection (incremental, as ``rag eval retrieval`` does).

    The caller must ``aclose()`` the result.
    """
    collection = scratch_collection(dataset)
    folder, mapping = await asyncio.to_thread(materialize_dataset, dataset, settings.data_dir, collection)
    ctx = await build_ingest_context(settings)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=collection)
        if log:
            log(f"ingesting {len(mapping)} passages into collection {collection} (incremental)…")
        summary = await run_job(ctx, job_id)
        if summary is not None and log:
            log(f"ingested: {summary.files} in {summary.seconds:.1f}s")
    except BaseException:
        await ctx.aclose()
        raise
    retriever = build_retriever(settings, ctx.store, ctx.embedder)
    return ScratchCollection(ctx, collection, mapping, retriever)


# --- the evaluation ---------------------------------------------------------------------------------


@dataclass
class QuestionResult:
    """One answered question."""

    qid: str
    question: str
    answer: str
    exact_match: float
    f1: float
    rouge_l: float
    cited: list[str | None]
    citation_precision: float | None
    explicit_citations: int
    retrievals: int
    gold_in_context: bool
    latency_ms: float
    ttft_ms: float
    completion_tokens: int
    no_answer: bool
    sentences: int = 0
    error: str | None = None
    words: int = 0
    support_rate: float | None = None
    sentence_citation_precision: float | None = None
    sentence_citation_recall: float | None = None
    repeats: bool = False
    source_ids: bool = False
    baseline_f1: float = 0.0
    baseline_rouge_l: float = 0.0
    top1_gold: bool = False
    retrieval_score: float | None = None
    best_relevance: float = 0.0
    finish_reason: str | None = None


@dataclass
class AnswerEvalReport:
    """Means over the questions, plus every question's result."""

    dataset: str
    collection: str
    mode: str
    params: dict[str, Any]
    results: list[QuestionResult] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float | int | None]:
        """Aggregates: means of the per-question metrics, latency percentiles, rates."""
        ok = [r for r in self.results if r.error is None]
        precisions = [r.citation_precision for r in ok if r.citation_precision is not None]
        latencies = sorted(r.latency_ms for r in ok)

        def mean(values: Sequence[float]) -> float | None:
            return round(statistics.fmean(values), 4) if values else None

        def pct(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)

        return {
            "questions": len(self.results),
            "errors": len(self.results) - len(ok),
            "exact_match": mean([r.exact_match for r in ok]),
            "f1": mean([r.f1 for r in ok]),
            "rouge_l": mean([r.rouge_l for r in ok]),
            "citation_precision": mean(precisions),
            "cited_rate": mean([float(bool(r.cited)) for r in ok]),
            "explicit_citation_rate": mean([float(r.explicit_citations > 0) for r in ok]),
            "gold_in_context": mean([float(r.gold_in_context) for r in ok]),
            "retrievals_per_question": mean([float(r.retrievals) for r in ok]),
            "reretrievals_per_question": mean([float(r.retrievals - 1) for r in ok]),
            "no_answer_rate": mean([float(r.no_answer) for r in ok]),
            "completion_tokens": mean([float(r.completion_tokens) for r in ok]),
            "latency_ms_mean": mean(latencies),
            "latency_ms_p50": pct(0.5),
            "latency_ms_p95": pct(0.95),
            "ttft_ms_mean": mean([r.ttft_ms for r in ok]),
            "words": mean([float(r.words) for r in ok]),
            "support_rate": mean([r.support_rate for r in ok if r.support_rate is not None]),
            "sentence_citation_precision": mean(
                [r.sentence_citation_precision for r in ok if r.sentence_citation_precision is not None]
            ),
            "sentence_citation_recall": mean(
                [r.sentence_citation_recall for r in ok if r.sentence_citation_recall is not None]
            ),
            "repeats": sum(1 for r in ok if r.repeats),
            "source_ids": sum(1 for r in ok if r.source_ids),
            "baseline_f1": mean([r.baseline_f1 for r in ok]),
            "baseline_rouge_l": mean([r.baseline_rouge_l for r in ok]),
            "top1_accuracy": mean([float(r.top1_gold) for r in ok]),
        }

    def as_json(self) -> dict[str, Any]:
        """``{"dataset", "collection", "mode", "params", "metrics", "seconds", "questions": [...]}``."""
        return {
            "dataset": self.dataset,
            "collection": self.collection,
            "mode": self.mode,
            "params": self.params,
            "metrics": self.metrics(),
            "seconds": round(self.seconds, 1),
            "questions": [asdict(r) for r in self.results],
        }


async def evaluate_answers(
    settings: Settings,
    dataset: Dataset,
    scratch: ScratchCollection,
    *,
    mode: AnswerMode,
    questions: int | None = None,
    max_tokens: int | None = None,
    k: int | None = None,
    flare: FlareParams | None = None,
    observer: Callable[[SentenceJudgement], None] | None = None,
    progress: Callable[[int, int, QuestionResult], None] | None = None,
    grounding: GroundingParams | None = None,
    unanswerable: bool = False,
    score_params: GroundingParams | None = None,
) -> AnswerEvalReport:
    """Answer the first ``questions`` questions of ``dataset`` with ``mode`` and score every answer.

    Args:
        settings: Model server, sampling and answer defaults.
        dataset: A BEIR-layout QA dataset.
        scratch: Its ingested scratch collection (:func:`open_scratch_collection`).
        mode: The answer mode.
        questions: How many questions (first by ``_id``); ``None``: all.
        max_tokens: Answer length cap (default: ``llm.max_tokens``).
        k: Chunks per retrieval (default: ``llm.k``).
        flare: ``flare`` mode parameters (default: the served model's, :func:`core.wiring.flare_defaults`).
        observer: ``flare`` mode: sees every judged look-ahead sentence.
        progress: Called after each question with (done, total, result).
        grounding: The grounding guard's settings (``None``: no guard).
        unanswerable: ``dataset`` is a derived unanswerable set (:mod:`evaluation.derived`).
        score_params: Scorer settings of the after-the-fact grounding metrics (default: ``grounding``'s,
            else :class:`GroundingParams`' defaults), so runs with and without the guard compare.

    Returns:
        The report; a question whose answer ended in an error event is kept with ``error`` set
        and left out of the means.
    """
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    items = await asyncio.to_thread(load_items, dataset, questions, unanswerable=unanswerable)
    embedder: Embedder = scratch.context.embedder
    scoring = score_params or grounding or GroundingParams()
    defaults = answer_defaults(settings)
    kwargs = defaults.kwargs(k=k, flare=flare)
    kwargs.pop("grounding", None)
    params = generation_params(settings, max_tokens=max_tokens)
    filters = SearchFilters(collections=(scratch.collection,))
    report = AnswerEvalReport(
        dataset=str(dataset.root),
        collection=scratch.collection,
        mode=mode,
        params={
            "k": kwargs["k"],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "interval_tokens": kwargs["interval_tokens"],
            "flare": kwargs["flare"].to_dict() if mode == "flare" else None,
            "model": settings.llm.model,
            "grounding": None if grounding is None else asdict(grounding),
            "unanswerable": unanswerable,
        },
    )
    llm = build_llm_client(settings)
    started = time.perf_counter()
    sentences = 0

    def count(judgement: SentenceJudgement) -> None:
        nonlocal sentences
        sentences += 1
        if observer is not None:
            observer(judgement)

    try:
        for index, item in enumerate(items, start=1):
            sentences = 0
            t0 = time.perf_counter()
            done: DoneEvent | None = None
            error: str | None = None
            async for event in answer(
                item.question,
                retriever=scratch.retriever,
                llm=llm,
                mode=mode,
                params=params,
                filters=filters,
                flare_observer=count,
                grounding=grounding,
                embedder=embedder,
                **kwargs,
            ):
                if isinstance(event, DoneEvent):
                    done = event
                elif isinstance(event, ErrorEvent):
                    error = f"{event.code}: {event.message}"
            latency = (time.perf_counter() - t0) * 1000.0
            result = _score(item, done, error, latency, scratch, scorer, sentences)
            if done is not None:
                await asyncio.to_thread(_ground_metrics, result, item, done, scratch, embedder, scoring)
            report.results.append(result)
            if progress is not None:
                progress(index, len(items), result)
    finally:
        await llm.aclose()
    report.seconds = time.perf_counter() - started
    return report


async def evaluate_followups(
    settings: Settings,
    dataset: Dataset,
    scratch: ScratchCollection,
    *,
    mode: AnswerMode,
    questions: int | None = None,
    max_tokens: int | None = None,
    grounding: GroundingParams | None = None,
    progress: Callable[[int, int, QuestionResult], None] | None = None,
) -> AnswerEvalReport:
    """The multi-turn dev set (:func:`evaluation.derived.derive_followups`): score the follow-ups.

    Each first question is answered, then its follow-up with the conversation so far as history;
    the follow-up's answer is scored against the first question's gold passages like any answer.
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    items = {i.qid: i for i in await asyncio.to_thread(load_items, dataset, questions)}
    followups = [f for f in derive_followups(dataset, questions) if f.qid in items]
    kwargs = answer_defaults(settings).kwargs()
    kwargs.pop("grounding", None)
    params = generation_params(settings, max_tokens=max_tokens)
    filters = SearchFilters(collections=(scratch.collection,))
    embedder: Embedder = scratch.context.embedder
    report = AnswerEvalReport(
        dataset=str(dataset.root),
        collection=scratch.collection,
        mode=mode,
        params={
            "followups": True,
            "max_tokens": params.max_tokens,
            "grounding": None if grounding is None else asdict(grounding),
        },
    )
    llm = build_llm_client(settings)
    started = time.perf_counter()

    async def ask(question: str, history: tuple[ChatMessage, ...]) -> tuple[DoneEvent | None, str | None]:
        done: DoneEvent | None = None
        error: str | None = None
        async for event in answer(
            question, retriever=scratch.retriever, llm=llm, mode=mode, params=params, filters=filters,
            history=history, grounding=grounding, embedder=embedder, **kwargs,
        ):  # fmt: skip
            if isinstance(event, DoneEvent):
                done = event
            elif isinstance(event, ErrorEvent):
                error = f"{event.code}: {event.message}"
        return done, error

    try:
        for index, follow in enumerate(followups, start=1):
            first, _ = await ask(follow.first, ())
            history = (
                ChatMessage("user", follow.first),
                ChatMessage("assistant", first.answer if first is not None else ""),
            )
            t0 = time.perf_counter()
            done, error = await ask(follow.follow_up, history)
            item = replace(items[follow.qid], question=follow.follow_up)
            result = _score(item, done, error, (time.perf_counter() - t0) * 1000.0, scratch, scorer, 0)
            if done is not None:
                await asyncio.to_thread(
                    _ground_metrics, result, item, done, scratch, embedder, grounding or GroundingParams()
                )
            report.results.append(result)
            if progress is not None:
                progress(index, len(followups), result)
    finally:
        await llm.aclose()
    report.seconds = time.perf_counter() - started
    return report


def _score(
    item: QAItem,
    done: DoneEvent | None,
    error: str | None,
    latency_ms: float,
    scratch: ScratchCollection,
    scorer: Any,
    sentences: int,
) -> QuestionResult:
    if done is None:
        return QuestionResult(
            item.qid, item.question, "", 0.0, 0.0, 0.0, [], None, 0, 0, False, latency_ms, latency_ms, 0, False,
            error=error or "no done event",
        )  # fmt: skip
    cited = [scratch.passage_of(c.path) for c in done.citations]
    in_context = {
        scratch.passage_of(sc.chunk.path)
        for r in done.retrievals
        for sc, n in zip(r.chunks, r.numbers, strict=False)
        if n is not None
    }
    return QuestionResult(
        qid=item.qid,
        question=item.question,
        answer=done.answer,
        exact_match=exact_match(done.answer, item.gold_texts),
        f1=round(token_f1(done.answer, item.gold_texts), 4),
        rouge_l=round(rouge_l(done.answer, item.gold_texts, scorer), 4),
        cited=cited,
        citation_precision=citation_precision(cited, item.gold_ids),
        explicit_citations=sum(1 for c in done.citations if not c.inferred),
        retrievals=len(done.retrievals),
        gold_in_context=bool(in_context & set(item.gold_ids)),
        latency_ms=round(latency_ms, 1),
        ttft_ms=round(done.timings.get("ttft_ms", latency_ms), 1),
        completion_tokens=done.usage.completion_tokens,
        no_answer=done.no_answer or NO_ANSWER.lower().rstrip(".") in done.answer.lower(),
        sentences=sentences,
        words=word_count(done.answer),
        finish_reason=done.finish_reason,
    )


def _ground_metrics(
    result: QuestionResult,
    item: QAItem,
    done: DoneEvent,
    scratch: ScratchCollection,
    embedder: Embedder,
    params: GroundingParams,
) -> None:
    """Fill the grounding metrics of ``result`` (see the module docstring)."""
    first = done.retrievals[0] if done.retrievals else None
    if first is not None and first.chunks:
        top = first.chunks[0].chunk
        baseline = " ".join(top.text.split()[:80])
        result.baseline_f1 = round(token_f1(baseline, item.gold_texts), 4) if item.gold_texts else 0.0
        result.baseline_rouge_l = round(rouge_l(baseline, item.gold_texts), 4) if item.gold_texts else 0.0
        result.top1_gold = scratch.passage_of(top.path) in set(item.gold_ids)
        dense = [sc.dense.score for sc in first.chunks if sc.dense is not None]
        result.retrieval_score = round(max(dense), 4) if dense else None
    sources: dict[int, Chunk] = {}
    for r in done.retrievals:
        for sc, n in zip(r.chunks, r.numbers, strict=False):
            if n is not None:
                sources.setdefault(n, sc.chunk)
    scorer = SupportScorer(embedder, dense_weight=params.dense_weight, threshold=params.support_threshold)
    scorer.add_sources(sources)
    result.best_relevance = round(max((r for _, r in scorer.relevance(item.question)), default=0.0), 4)
    if result.no_answer:
        return
    sentences = [s.text for s in split_sentences(done.answer) if normalise_sentence(s.text)]
    if not sentences:
        return
    result.support_rate = round(sum(scorer.judge(s).verdict == "supported" for s in sentences) / len(sentences), 4)
    keys = [normalise_sentence(s) for s in sentences]
    result.repeats = len(set(keys)) < len(keys)
    result.source_ids = any(copies_source_header(s, sources) for s in sentences)
    by_n = {c.n: scratch.passage_of(c.path) for c in done.citations}
    gold = set(item.gold_ids)
    pairs = [(i, by_n.get(n)) for i, s in enumerate(sentences) for n in marker_numbers(s)]
    if pairs and item.gold_texts:
        result.sentence_citation_precision = round(sum(pid in gold for _, pid in pairs) / len(pairs), 4)
    if item.gold_texts:
        citing = {i for i, pid in pairs if pid in gold}
        result.sentence_citation_recall = round(len(citing) / len(sentences), 4)


def abstention(answerable: AnswerEvalReport, unanswerable: AnswerEvalReport) -> dict[str, float | None]:
    """Abstention precision and recall over an answerable run and its unanswerable variant.

    Precision: of the answers that abstained (both runs), the share on unanswerable questions.
    Recall: the share of unanswerable questions that abstained. Also the answerable abstain rate.
    """
    answered = [r for r in answerable.results if r.error is None]
    unanswered = [r for r in unanswerable.results if r.error is None]
    true_pos = sum(r.no_answer for r in unanswered)
    false_pos = sum(r.no_answer for r in answered)
    return {
        "precision": round(true_pos / (true_pos + false_pos), 4) if true_pos + false_pos else None,
        "recall": round(true_pos / len(unanswered), 4) if unanswered else None,
        "answerable_abstain_rate": round(false_pos / len(answered), 4) if answered else None,
    }


def summarize_flare(judgements: Sequence[SentenceJudgement]) -> Mapping[str, float]:
    """Counts over FLARE's judged sentences (look-aheads, triggers, regenerations)."""
    looks = [j for j in judgements if j.kind == "lookahead"]
    return {
        "lookaheads": len(looks),
        "triggered": sum(1 for j in looks if j.triggered),
        "over_limit": sum(1 for j in looks if j.over_limit),
        "regenerated": sum(1 for j in judgements if j.kind == "regenerated"),
    }
