"""``rag flare calibrate``: choose FLARE's confidence threshold θ for the served model."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import typer
from rich.table import Table

from app.cli.common import JsonOpt, console, err_console, fail, load_settings, setup_logging
from app.cli.evaluate import DatasetOpt, MaxTokensOpt, QuestionsOpt, load_dataset_or_fail
from core.settings import Settings


def register(app: typer.Typer) -> None:
    """Add the ``rag flare`` group to the root ``rag`` app."""
    group = typer.Typer(no_args_is_help=True, help="FLARE active retrieval: calibration.")
    group.command("calibrate")(calibrate)
    app.add_typer(group, name="flare")


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
    setup_logging(False)
    settings = load_settings()
    data = load_dataset_or_fail(dataset)
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
    from core.wiring import flare_defaults, save_flare_defaults
    from evaluation.answers import evaluate_answers, open_scratch_collection
    from evaluation.calibration import calibrate as recommend
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
        fail(str(e))
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
