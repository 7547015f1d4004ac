"""``rag ask``: answer a question from the command line, streamed, with its sources."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

import typer

from app.cli.common import JsonOpt, VerboseOpt, console, err_console, fail, load_settings, setup_logging
from core.settings import Settings

ModeOpt = Annotated[Literal["single", "interval", "flare"], typer.Option(help="single | interval | flare")]
QueryModeOpt = Annotated[Literal["masked", "question"] | None, typer.Option(help="flare: masked | question.")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``rag`` app."""
    app.command()(ask)


def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="Answer from these collections (repeatable).")
    ] = None,
    mode: ModeOpt = "single",
    k: Annotated[int | None, typer.Option("--k", "-k", min=1, help="Chunks per retrieval.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Answer length cap in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    theta: Annotated[float | None, typer.Option(help="flare: retrieve when a token's probability is <= θ.")] = None,
    beta: Annotated[float | None, typer.Option(help="flare: masked queries drop tokens with probability <= β.")] = None,
    lookahead: Annotated[int | None, typer.Option(help="flare: look-ahead tokens per sentence.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="flare: most re-retrievals per answer.")] = None,
    query_mode: QueryModeOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer a question from your documents, streamed, with the sources it cites.

    ``--json`` prints the answer's ``done`` event exactly as the API sends it.
    """
    from core.wiring import flare_defaults

    setup_logging(verbose)
    settings = load_settings()
    try:
        flare = flare_defaults(settings).with_overrides(
            theta=theta, beta=beta, lookahead_tokens=lookahead, max_rounds=max_rounds, query_mode=query_mode
        )
    except ValueError as e:
        fail(str(e))
    done = asyncio.run(
        _ask(settings, question, collection, mode, k, max_tokens, temperature, quiet=as_json, flare=flare)
    )
    if done is None:
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(done, indent=2))


async def _ask(
    settings: Settings,
    question: str,
    collections: list[str] | None,
    mode: Literal["single", "interval", "flare"],
    k: int | None,
    max_tokens: int | None,
    temperature: float | None,
    *,
    quiet: bool,
    flare: Any,
) -> dict[str, Any] | None:
    from app.schemas.events import wire_dict
    from core.wiring import (
        answer_defaults,
        build_llm_client,
        build_retriever,
        generation_params,
        load_embedder,
        open_store,
    )
    from generation.rag import answer
    from generation.types import DoneEvent, ErrorEvent, TokenEvent
    from retrieval.types import SearchFilters

    embedder = await asyncio.to_thread(load_embedder, settings, threads=1)
    store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    retriever = build_retriever(settings, store, embedder)
    llm = build_llm_client(settings)
    kwargs = answer_defaults(settings).kwargs(k=k, flare=flare)
    params = generation_params(settings, max_tokens=max_tokens, temperature=temperature)
    filters = SearchFilters(collections=tuple(collections) if collections else None)
    try:
        async for event in answer(
            question, retriever=retriever, llm=llm, mode=mode, params=params, filters=filters, **kwargs
        ):
            if isinstance(event, ErrorEvent):
                _print_error(event.code, event.message, settings)
                return None
            if isinstance(event, TokenEvent) and not quiet:
                console.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
            elif isinstance(event, DoneEvent):
                if not quiet:
                    console.print()
                    _print_sources(event)
                return wire_dict(event)
    finally:
        await llm.aclose()
    return None


def _print_error(code: str, message: str, settings: Settings) -> None:
    from rich.markup import escape

    hint = ""
    if code == "llm_unavailable":
        hint = f" (is the model server running at {settings.llm.base_url}? start it with `make run` or `rag llm serve`)"
    err_console.print(f"[bold red]error[/] {escape(f'[{code}] {message}{hint}')}", highlight=False)


def _print_sources(done: Any) -> None:
    if done.finish_reason in ("length", "repetition"):
        reason = "the length cap" if done.finish_reason == "length" else "the repetition guard"
        console.print(f"[yellow]note:[/] the answer was cut by {reason}")
    if not done.citations:
        console.print("[dim]no sources cited[/]")
        return
    console.print("[bold]sources[/]")
    for c in done.citations:
        page = f" p.{c.page}" if c.page else ""
        flag = " (inferred)" if c.inferred else ""
        console.print(f"  [{c.n}] {c.path}{page} chars {c.start}-{c.end}{flag}", markup=False, highlight=False)
