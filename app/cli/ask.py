"""``rag ask``: answer a question from the command line, streamed, with its sources.

Through the running API when one answers (``POST /v1/ask/stream``, :mod:`app.cli.remote`), else
in-process: the embedding model, the index and the model-server client are built here (``--local``
forces it, and so do the FLARE tuning options, which the API takes from its settings). Both print
the same stream and sources; ``--json`` prints the ``done`` event exactly as the API sends it.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from app.cli.common import (
    JsonOpt,
    LocalOpt,
    VerboseOpt,
    api_client,
    api_failure,
    console,
    err_console,
    fail,
    load_settings,
    setup_logging,
)
from core.settings import Settings
from generation.types import ANSWER_MODES, AnswerMode

if TYPE_CHECKING:
    from app.cli.remote import ApiClient

ModeOpt = Annotated[AnswerMode, typer.Option(help=" | ".join(ANSWER_MODES))]
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
    local: LocalOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer a question from your documents, streamed, with the sources it cites.

    ``--json`` prints the answer's ``done`` event exactly as the API sends it. The FLARE options
    (--theta, --beta, --lookahead, --max-rounds, --query-mode) run the answer in this process.
    """
    setup_logging(verbose)
    settings = load_settings()
    tuned = any(v is not None for v in (theta, beta, lookahead, max_rounds, query_mode))
    client = api_client(settings, local=local or tuned)
    if client is not None:
        body: dict[str, Any] = {"question": question, "collections": collection or None, "mode": mode, "k": k}
        body |= {"max_tokens": max_tokens, "temperature": temperature}
        with client:
            done = _ask_remote(client, {key: v for key, v in body.items() if v is not None}, settings, quiet=as_json)
        if done is None:
            raise typer.Exit(1)
        if as_json:
            typer.echo(json.dumps(done, indent=2))
        return
    # Imported here: core.wiring pulls SQLAlchemy and Alembic (~1 s), which the API path never needs.
    from core.wiring import flare_defaults

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


def _ask_remote(client: ApiClient, body: dict[str, Any], settings: Settings, *, quiet: bool) -> dict[str, Any] | None:
    from app.cli.remote import ApiError

    try:
        for event in client.ask_stream(body):
            kind = event.get("type")
            if kind == "error":
                _print_error(str(event.get("code")), str(event.get("message")), settings)
                return None
            if kind == "token" and not quiet:
                console.print(event["text"], end="", markup=False, highlight=False, soft_wrap=True)
            elif kind == "done":
                if not quiet:
                    console.print()
                    _print_sources(event)
                return event
    except ApiError as e:
        api_failure(e, settings)
    err_console.print("[bold red]error[/] the answer stream ended without a done event", highlight=False)
    return None


async def _ask(
    settings: Settings,
    question: str,
    collections: list[str] | None,
    mode: AnswerMode,
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
                done = wire_dict(event)
                if not quiet:
                    console.print()
                    _print_sources(done)
                return done
    finally:
        await llm.aclose()
    return None


def _print_error(code: str, message: str, settings: Settings) -> None:
    from rich.markup import escape

    hint = ""
    if code == "llm_unavailable":
        hint = f" (is the model server running at {settings.llm.base_url}? start it with `make run` or `rag llm serve`)"
    err_console.print(f"[bold red]error[/] {escape(f'[{code}] {message}{hint}')}", highlight=False)


def _print_sources(done: dict[str, Any]) -> None:
    """The cut note and the cited sources of a ``done`` event (wire form)."""
    finish = done.get("finish_reason")
    if finish in ("length", "repetition"):
        reason = "the length cap" if finish == "length" else "the repetition guard"
        console.print(f"[yellow]note:[/] the answer was cut by {reason}")
    if not done.get("citations"):
        console.print("[dim]no sources cited[/]")
        return
    console.print("[bold]sources[/]")
    for c in done["citations"]:
        where = c.get("location") or (f"page {c['page']}" if c.get("page") else "")
        page = f" · {where} ·" if where else ""
        flag = " (inferred)" if c.get("inferred") else ""
        console.print(
            f"  [{c['n']}] {c['path']}{page} chars {c['start']}-{c['end']}{flag}", markup=False, highlight=False
        )
