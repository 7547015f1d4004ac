"""``rag flare calibrate`` and ``rag eval answers``: measuring answer modes on BEIR-layout QA datasets.

A composition root like ``app/cli.py`` (which mounts ``app`` as ``rag flare`` and registers
:func:`eval_answers` on ``rag eval``). Heavy imports happen inside the commands.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from app.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="FLARE active retrieval: calibration.")

console = Console()
err_console = Console(stderr=True)

DatasetOpt = Annotated[Path, typer.Option("--dataset", "-d", help="A BEIR-layout QA dataset folder.")]
QuestionsOpt = Annotated[
    int | None, typer.Option("--questions", "-n", min=1, help="Use the first N questions by id (default: all).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
MaxTokensOpt = Annotated[int | None, typer.Option("--max-tokens", min=1, help="Answer length cap in tokens.")]


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def _load(dataset: Path) -> Any:
    from app.evaluation.beir import DatasetError, load_dataset

    try:
        return load_dataset(dataset)
    except DatasetError as e:
        _fail(str(e))


def _quiet_logs() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    for noisy in ("pypdf", "fontTools", "sentence_transformers", "transformers", "generation", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command("calibrate")
def calibrate(
    dataset: DatasetOpt,
    questions: QuestionsOpt = 40,
    as_json: JsonOpt = False,
    max_tokens: MaxTokensOpt = 128,
    target: Annotated[float, typer.Option(help="Target share of look-ahead sentences that trigger retrieval.")] = 0.4,
    save: Annotated[bool, typer.Option("--save/--no-save", help="Store θ as the served model's default.")] = True,
) -> None:
    """Measure the served model's token probabilities in look-ahead sentences and recommend θ.

    Answers the questions in ``flare`` mode with θ=0 (so nothing re-retrieves and every sentence
    is a first look-ahead), reports the distribution of per-sentence minimum probabilities and the
    trigger rate per candidate θ, and stores the recommended θ (the ``target`` quantile) in
    ``<data_dir>/flare/<model>.json``.
    """
    _quiet_logs()
    settings = Settings()
    data = _load(dataset)
    out = asyncio.run(_calibrate(settings, data, questions, max_tokens, target, save=save, quiet=as_json))
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    cal = out["calibration"]
    console.print(
        f"[bold]{out['model']}[/] · {cal['sentences']} look-ahead sentences from {cal['questions']} questions "
        f"· {out['seconds']:.0f}s"
    )
    dist = Table(title="probability distribution (judged tokens)")
    dist.add_column("percentile")
    dist.add_column("per-sentence min prob", justify="right")
    dist.add_column("all tokens", justify="right")
    for key, value in cal["min_prob_percentiles"].items():
        dist.add_row(key, f"{value:.4f}", f"{cal['token_prob_percentiles'][key]:.4f}")
    console.print(dist)
    rates = Table(title="trigger rate per candidate θ")
    rates.add_column("θ", justify="right")
    rates.add_column("sentences triggering", justify="right")
    rates.add_column("questions with ≥1 trigger", justify="right")
    for theta, rate in cal["trigger_rates"].items():
        rates.add_row(theta, f"{rate:.1%}", f"{cal['question_trigger_rates'][theta]:.1%}")
    console.print(rates)
    console.print(
        f"recommended θ = [bold]{cal['theta']}[/] (trigger rate {cal['rate_at_theta']:.1%}, target "
        f"{cal['target']:.0%} in {cal['band'][0]:.0%}–{cal['band'][1]:.0%}), β = {cal['beta']}"
    )
    for note in cal["notes"]:
        console.print(f"[yellow]note:[/] {note}")
    if out.get("saved_to"):
        console.print(f"stored as the default of {out['model']}: {out['saved_to']}")


async def _calibrate(
    settings: Settings,
    data: Any,
    questions: int | None,
    max_tokens: int | None,
    target: float,
    *,
    save: bool,
    quiet: bool,
) -> dict[str, Any]:
    from app.evaluation.answers import evaluate_answers, open_scratch_collection
    from app.evaluation.calibration import calibrate as recommend
    from app.llm import flare_defaults, save_flare_defaults
    from generation.flare import SentenceJudgement

    scratch = await open_scratch_collection(settings, data, log=None if quiet else err_console.print)
    per_question: list[list[float]] = []
    tokens: list[float] = []

    def observe(judgement: SentenceJudgement) -> None:
        if judgement.kind == "lookahead" and judgement.probs:
            per_question[-1].append(judgement.min_prob)
            tokens.extend(judgement.probs)

    def progress(done: int, total: int, result: Any) -> None:
        per_question.append([])
        if not quiet:
            err_console.print(f"  {done}/{total} {result.qid}: {result.latency_ms / 1000:.1f}s", highlight=False)

    base = flare_defaults(settings)
    per_question.append([])
    try:
        report = await evaluate_answers(
            settings,
            data,
            scratch,
            mode="flare",
            questions=questions,
            max_tokens=max_tokens,
            flare=base.with_overrides(theta=0.0),
            observer=observe,
            progress=progress,
        )
    finally:
        await scratch.aclose()
    errors = [r.error for r in report.results if r.error]
    if len(errors) == len(report.results):
        raise typer.BadParameter(f"every answer failed: {errors[0] if errors else 'no questions'}")
    try:
        cal = recommend([q for q in per_question if q], tokens, target=target)
    except ValueError as e:
        _fail(str(e))
        raise
    out: dict[str, Any] = {
        "model": settings.llm.model,
        "dataset": str(data.root),
        "questions": len(report.results),
        "errors": len(errors),
        "max_tokens": report.params["max_tokens"],
        "seconds": round(report.seconds, 1),
        "calibration": cal.as_json(),
        "params": base.with_overrides(theta=cal.theta, beta=cal.beta).to_dict(),
    }
    if save:
        record = {k: out[k] for k in ("dataset", "questions", "max_tokens")} | {"result": out["calibration"]}
        out["saved_to"] = str(
            save_flare_defaults(settings, base.with_overrides(theta=cal.theta, beta=cal.beta), record)
        )
    return out


def eval_answers(
    dataset: DatasetOpt,
    mode: Annotated[str, typer.Option("--mode", "-m", help="single | interval | flare")] = "single",
    questions: QuestionsOpt = None,
    as_json: JsonOpt = False,
    max_tokens: MaxTokensOpt = None,
    k: Annotated[int | None, typer.Option("--k", "-k", min=1, help="Chunks per retrieval.")] = None,
    theta: Annotated[float | None, typer.Option(help="flare: θ (default: the model's).")] = None,
    query_mode: Annotated[str | None, typer.Option(help="flare: masked | question.")] = None,
    save: Annotated[Path | None, typer.Option("--save", help="Also write the JSON report to this file.")] = None,
    guard: Annotated[
        str | None, typer.Option(help="Grounding guard: off | annotate | fallback | strict (default: setting).")
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
    _quiet_logs()
    from generation.rag import ANSWER_MODES

    if mode not in ANSWER_MODES:
        _fail(f"--mode must be one of {', '.join(ANSWER_MODES)}, not {mode!r}")
    settings = Settings()
    data = _load(dataset)
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
                guard,
                unanswerable,
                followups,
            )
        )
    except ValueError as e:
        _fail(str(e))
        return
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
    mode: str,
    questions: int | None,
    max_tokens: int | None,
    k: int | None,
    theta: float | None,
    query_mode: str | None,
    quiet: bool,
    guard: str | None = None,
    unanswerable: bool = False,
    followups: bool = False,
) -> dict[str, Any]:
    from app.evaluation.answers import (
        abstention,
        evaluate_answers,
        evaluate_followups,
        open_scratch_collection,
        summarize_flare,
    )
    from app.evaluation.beir import load_dataset
    from app.evaluation.derived import derive_unanswerable
    from app.llm import flare_defaults, grounding_params
    from generation.flare import SentenceJudgement
    from generation.rag import AnswerMode

    flare = flare_defaults(settings).with_overrides(theta=theta, query_mode=query_mode)
    grounding = grounding_params(settings, guard)
    judgements: list[SentenceJudgement] = []

    def progress(done: int, total: int, result: Any) -> None:
        if not quiet:
            err_console.print(
                f"  {done}/{total} {result.qid}: F1 {result.f1:.2f} retrievals {result.retrievals} "
                f"{result.latency_ms / 1000:.1f}s{' ' + result.error if result.error else ''}",
                highlight=False,
            )

    scratch = await open_scratch_collection(settings, data, log=None if quiet else err_console.print)
    try:
        report = await evaluate_answers(
            settings,
            data,
            scratch,
            mode=cast("AnswerMode", mode),
            questions=questions,
            max_tokens=max_tokens,
            k=k,
            flare=flare,
            observer=judgements.append,
            progress=progress,
            grounding=grounding,
        )
        if followups:
            turns = await evaluate_followups(
                settings,
                data,
                scratch,
                mode=cast("AnswerMode", mode),
                questions=questions,
                max_tokens=max_tokens,
                grounding=grounding,
                progress=progress,
            )
    finally:
        await scratch.aclose()
    out = report.as_json()
    if followups:
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
                mode=cast("AnswerMode", mode),
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
