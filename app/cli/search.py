"""``rag search``: hybrid search from the command line, with each leg's rank per hit."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer
from rich.table import Table

from app.cli.common import JsonOpt, console, fail, load_settings, setup_logging, short_path

ModeOpt = Annotated[
    Literal["hybrid", "dense", "sparse"] | None, typer.Option(help="hybrid | dense | sparse (default: configured).")
]
FusionOpt = Annotated[Literal["rrf", "weighted"] | None, typer.Option(help="rrf | weighted (hybrid only).")]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``rag`` app."""
    app.command()(search)


def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="Search only these collections (repeatable).")
    ] = None,
    mode: ModeOpt = None,
    fusion: FusionOpt = None,
    alpha: Annotated[float | None, typer.Option(help="Dense weight of weighted fusion.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", min=1, help="Number of results.")] = 10,
    path_prefix: Annotated[str | None, typer.Option(help="Only chunks of documents under this path.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hybrid search over ingested collections; shows where each leg ranked every hit."""
    from app.schemas.search import HitOut
    from app.services.search import search_options
    from core.wiring import build_retriever, load_embedder, open_store, search_defaults
    from retrieval.types import RetrievalError, SearchFilters

    setup_logging(False)
    settings = load_settings()
    embedder = load_embedder(settings, threads=1)
    store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    options = search_options(search_defaults(settings), mode=mode, fusion=fusion, alpha=alpha)
    filters = SearchFilters(collections=tuple(collection) if collection else None, path_prefix=path_prefix)
    try:
        hits = build_retriever(settings, store, embedder).search_sync(query, k=k, filters=filters, options=options)
    except (RetrievalError, ValueError) as e:
        fail(str(e))
    if as_json:
        body = {
            "query": query,
            "options": {"mode": options.mode, "fusion": options.fusion, "alpha": options.alpha, "depth": options.depth},
            "hits": [HitOut.from_scored(h).model_dump(mode="json") for h in hits],
        }
        typer.echo(json.dumps(body))
        return
    table = Table(title=f"{query!r} · {options.mode}" + (f" · {options.fusion}" if options.mode == "hybrid" else ""))
    for col in ("#", "score", "dense", "bm25"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("page", justify="right")
    table.add_column("snippet", overflow="fold")
    for h in hits:
        table.add_row(
            str(h.rank),
            f"{h.score:.4f}",
            str(h.dense.rank) if h.dense else "-",
            str(h.sparse.rank) if h.sparse else "-",
            f"{h.chunk.collection}:{short_path(h.chunk.path)}",
            str(h.chunk.page) if h.chunk.page else "",
            " ".join(h.chunk.text.split())[:160],
        )
    console.print(table)
    if not hits:
        console.print("no results (is the collection ingested? rag ingest PATH -c NAME)")
