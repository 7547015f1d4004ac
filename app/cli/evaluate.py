"""``rag eval retrieval`` and ``rag eval answers``: measure quality on BEIR-layout datasets.

Both ingest the dataset's corpus through the real pipeline into a scratch collection (incremental,
so a second run reuses it) and score it with :mod:`evaluation`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from rich.table import Table

from app.cli.common import JsonOpt, VerboseOpt, console, err_console, fail, load_settings, setup_logging
from core.progress import Progress
from core.settings import Settings
from generation.types import ANSWER_MODES, AnswerMode
from retrieval.types import RetrievalError

DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", help="A BEIR-layout dataset folder.")]
QuestionsOpt = Annotated[
    int | None, typer.Option("--questions", "-n", min=1, help="Use the first N questions by id (default: all).")
]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Answer length cap in tokens.")]


def register(app: typer.Typer) -> None:
    """Add the ``rag eval`` group to the root ``rag`` app."""
    group = typer.Typer(no_args_is_help=True, help="Measure retrieval and answer quality on BEIR-layout datasets.")
    group.command("retrieval")(retrieval)
    group.command("answers")(answers)
    app.add_typer(group, name="eval")


def load_dataset_or_fail(path: Path) -> Any:
    """The BEIR dataset at ``path``, or a clean error exit saying what is missing."""
    from evaluation.beir import DatasetError, load_dataset

    try:
        return load_dataset(path)
    except DatasetError as e:
        fail(str(e))


def retrieval(
    dataset: DatasetOpt,
    as_json: JsonOpt = False,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also score a grid of fusion parameters.")] = False,
    backend: Annotated[
        Literal["local", "postgres"] | None,
        typer.Option("--backend", help="Retrieval backend: local | postgres (default: RAG_RETRIEVAL__BACKEND)."),
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Ingest a BEIR dataset into a scratch collection and report nDCG@10, Recall@10/100, MRR@10 per mode."""
    setup_logging(verbose)
    settings = load_settings()
    if backend is not None:
        try:
            settings = Settings.model_validate(
                {**settings.model_dump(), "retrieval": {**settings.retrieval.model_dump(), "backend": backend}}
            )
        except ValidationError as e:  # only the rule, not pydantic's dump of every setting
            fail("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors()))
    data = load_dataset_or_fail(dataset)
    try:
        report, sweep_rows = asyncio.run(_eval_retrieval(settings, data, sweep=sweep, quiet=as_json))
    except RetrievalError as e:  # e.g. the postgres backend's tables or pgvector are missing
        fail(str(e))
    from evaluation.retrieval import BASELINE

    if as_json:
        out = report.as_json()
        if sweep_rows:
            out["sweep"] = [{"fusion": name, **metrics} for name, metrics in sweep_rows]
        typer.echo(json.dumps(out, indent=2))
        return
    table = Table(title=f"retrieval · {data.name} · {report.queries} queries")
    table.add_column("mode")
    for col in ("nDCG@10", "Recall@10", "Recall@100", "MRR@10", "ms/query"):
        table.add_column(col, justify="right")
    for name, m in report.results.items():
        table.add_row(
            name,
            f"{m['ndcg@10']:.4f}",
            f"{m['recall@10']:.4f}",
            f"{m['recall@100']:.4f}",
            f"{m['mrr@10']:.4f}",
            f"{report.seconds[name]:.1f}",
        )
    console.print(table)
    if BASELINE in report.results and "hybrid" in report.results:
        gain = report.results["hybrid"]["ndcg@10"] - report.results[BASELINE]["ndcg@10"]
        console.print(f"hybrid vs the passage-dense baseline: {gain:+.4f} nDCG@10")
    if sweep_rows:
        st = Table(title="fusion sweep (same legs, best first)")
        st.add_column("fusion")
        for col in ("nDCG@10", "Recall@10", "Recall@100", "MRR@10"):
            st.add_column(col, justify="right")
        for name, m in sweep_rows:
            st.add_row(name, *(f"{m[k]:.4f}" for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")))
        console.print(st)


async def _eval_retrieval(settings: Settings, data: Any, *, sweep: bool, quiet: bool) -> tuple[Any, list[Any]]:
    from core.wiring import build_retriever, search_defaults
    from evaluation.retrieval import (
        BASELINE,
        RetrievalEvaluator,
        default_grid,
        materialize_dataset,
        mode_options,
        passage_baseline,
        scratch_collection,
    )
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    collection = scratch_collection(data)
    folder, mapping = await asyncio.to_thread(materialize_dataset, data, settings.data_dir, collection)
    ctx = await build_ingest_context(settings)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=collection)
        # Progress on stderr whatever --json does with stdout: a bar on a terminal, lines elsewhere.
        with Progress(f"eval ingest {collection}", unit="files", rates=("chunks",)) as progress:

            def on_progress(done: int, total: int, path: str, outcome: str, *, chunks: int = 0) -> None:
                progress.update(done, total=total, chunks=chunks)

            await run_job(ctx, job_id, on_progress=on_progress)
        retriever = build_retriever(settings, ctx.store, ctx.embedder)
        evaluator = RetrievalEvaluator(retriever, data, collection, mapping)
        with Progress("eval retrieval", unit=None, usually="a few seconds per mode") as progress:
            progress.update(current="hybrid, dense and sparse over every query")
            report = await asyncio.to_thread(evaluator.evaluate, mode_options(search_defaults(settings)))
        with Progress("eval baseline: whole passages, dense", unit="passages") as progress:
            baseline, ms = await asyncio.to_thread(
                passage_baseline,
                data,
                ctx.embedder,
                settings.data_dir / "eval" / collection,
                on_progress=lambda done, total: progress.update(done, total=total),
            )
        report.results[BASELINE] = baseline
        report.seconds[BASELINE] = round(ms, 2)
        rows: list[Any] = []
        if sweep:
            with Progress("eval fusion sweep", unit=None, usually="a minute") as progress:
                progress.update(current="legs of every query, then each fusion")
                legs = await asyncio.to_thread(evaluator.legs, 300)
                rows = await asyncio.to_thread(evaluator.sweep, legs, default_grid())
        return report, rows
    finally:
        await ctx.aclose()


def answers(
    dataset: DatasetOpt,
    mode: Annotated[
        AnswerMode,
        typer.Option("--mode", "-m", help=" | ".join(ANSWER_MODES)),
    ] = "single",
    questions: QuestionsOpt = None,
    as_json: JsonOpt = False,
    max_tokens: MaxTokensOpt = None,
    k: Annotated[int | None, typer.Option("--k", "-k", min=1, help="Chunks per retrieval.")] = None,
    theta: Annotated[float | None, typer.Option(help="flare: θ (default: the model's).")] = None,
    query_mode: Annotated[Literal["masked", "question"] | None, typer.Option(help="flare: masked | question.")] = None,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the JSON report to this file.")] = None,
    guard: Annotated[
        Literal["off", "annotate", "fallback", "strict"] | None,
        typer.Option(help="Grounding guard: off | annotate | fallback | strict (default: the setting)."),
    ] = None,
    unanswerable: Annotated[
        bool, typer.Option(help="Also answer the derived set without the gold passages; report abstention.")
    ] = False,
    followups: Annotated[
        bool, typer.Option(help="Also answer the derived multi-turn set (a follow-up after each question).")
    ] = False,
) -> None:
    """Answer a BEIR-layout QA dataset's questions and score EM, F1, ROUGE-L, citation precision, rounds, latency.

    The gold answer of each question is the text of its relevant passages in qrels; they are also
    the gold citations. ``--questions N`` takes the first N questions by id (the same for every mode).
    """
    setup_logging(False)
    settings = load_settings()
    data = load_dataset_or_fail(dataset)
    try:
        out = asyncio.run(
            _eval_answers(
                settings,
                data,
                mode,
                questions,
                max_tokens,
                k,
                theta,
                query_mode,
                as_json,
                guard=guard,
                unanswerable=unanswerable,
                followups=followups,
            )
        )
    except ValueError as e:
        fail(str(e))
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(out, indent=2), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    m = out["metrics"]
    table = Table(title=f"answers · {data.name} · {mode} · {m['questions']} questions · {out['seconds']:.0f}s")
    for col in ("EM", "F1", "ROUGE-L", "cit. prec.", "cited", "gold in ctx", "retrievals", "latency p50 s", "errors"):
        table.add_column(col, justify="right")

    def f(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    table.add_row(
        f(m["exact_match"]),
        f(m["f1"]),
        f(m["rouge_l"]),
        f(m["citation_precision"]),
        f(m["cited_rate"], ".0%"),
        f(m["gold_in_context"], ".0%"),
        f(m["retrievals_per_question"], ".2f"),
        f(None if m["latency_ms_p50"] is None else m["latency_ms_p50"] / 1000, ".1f"),
        str(m["errors"]),
    )
    console.print(table)
    grounding = Table(title="grounding")
    for col in ("F1 80w top-1", "top-1 acc", "words", "support", "sent. cit. P", "sent. cit. R", "repeats", "ids"):
        grounding.add_column(col, justify="right")
    grounding.add_row(
        f(m["baseline_f1"]),
        f(m["top1_accuracy"], ".0%"),
        f(m["words"], ".1f"),
        f(m["support_rate"]),
        f(m["sentence_citation_precision"]),
        f(m["sentence_citation_recall"]),
        str(m["repeats"]),
        str(m["source_ids"]),
    )
    console.print(grounding)
    if "followups" in out:
        fm = out["followups"]["metrics"]
        console.print(
            f"follow-ups: F1 {f(fm['f1'])} · ROUGE-L {f(fm['rouge_l'])} · top-1 acc {f(fm['top1_accuracy'], '.0%')} "
            f"· gold in context {f(fm['gold_in_context'], '.0%')} · no answer {f(fm['no_answer_rate'], '.0%')}"
        )
    if "abstention" in out:
        a = out["abstention"]
        console.print(
            f"abstention: precision {f(a['precision'])} · recall {f(a['recall'])} · "
            f"answerable abstained {f(a['answerable_abstain_rate'], '.0%')}"
        )


async def _eval_answers(
    settings: Settings,
    data: Any,
    mode: AnswerMode,
    questions: int | None,
    max_tokens: int | None,
    k: int | None,
    theta: float | None,
    query_mode: Literal["masked", "question"] | None,
    quiet: bool,
    *,
    guard: str | None = None,
    unanswerable: bool = False,
    followups: bool = False,
) -> dict[str, Any]:
    from core.wiring import flare_defaults, grounding_params
    from evaluation.answers import (
        abstention,
        evaluate_answers,
        evaluate_followups,
        open_scratch_collection,
        summarize_flare,
    )
    from evaluation.beir import load_dataset
    from evaluation.derived import derive_unanswerable
    from generation.flare import SentenceJudgement

    flare = flare_defaults(settings).with_overrides(theta=theta, query_mode=query_mode)
    grounding = grounding_params(settings, guard)
    judgements: list[SentenceJudgement] = []

    reporter = Progress(f"eval answers {mode}", unit="questions")

    def progress(done: int, total: int, result: Any) -> None:
        reporter.update(done, total=total, current=result.qid)
        if not quiet:
            reporter.echo(
                f"  {done}/{total} {result.qid}: F1 {result.f1:.2f} retrievals {result.retrievals} "
                f"{result.latency_ms / 1000:.1f}s{' ' + result.error if result.error else ''}"
            )

    scratch = await open_scratch_collection(settings, data, log=None if quiet else err_console.print)
    try:
        with reporter:
            report = await evaluate_answers(
                settings,
                data,
                scratch,
                mode=mode,
                questions=questions,
                max_tokens=max_tokens,
                k=k,
                flare=flare,
                observer=judgements.append,
                progress=progress,
                grounding=grounding,
            )
            turns = None
            if followups:
                turns = await evaluate_followups(
                    settings,
                    data,
                    scratch,
                    mode=mode,
                    questions=questions,
                    max_tokens=max_tokens,
                    grounding=grounding,
                    progress=progress,
                )
    finally:
        await scratch.aclose()
    out = report.as_json()
    if turns is not None:
        out["followups"] = {"metrics": turns.metrics(), "questions": turns.as_json()["questions"]}
    if unanswerable:
        folder = derive_unanswerable(data, settings.data_dir / "eval" / "derived", questions)
        derived = load_dataset(folder)
        scratch = await open_scratch_collection(settings, derived, log=None if quiet else err_console.print)
        try:
            missing = await evaluate_answers(
                settings,
                derived,
                scratch,
                mode=mode,
                questions=questions,
                max_tokens=max_tokens,
                k=k,
                flare=flare,
                progress=progress,
                grounding=grounding,
                unanswerable=True,
            )
        finally:
            await scratch.aclose()
        out["unanswerable"] = {
            "dataset": str(folder),
            "metrics": missing.metrics(),
            "questions": missing.as_json()["questions"],
        }
        out["abstention"] = abstention(report, missing)
    if mode == "flare":
        out["flare"] = summarize_flare(judgements)
    return out
