"""``rag search``: hybrid search from the command line, with each leg's rank per hit.

Through the running API when one answers (:mod:`app.cli.remote`), else in-process (``--local``
forces it); both print the same table, and ``--json`` prints the API's ``SearchResponse`` either way.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from app.cli.common import (
    JsonOpt,
    LocalOpt,
    VerboseOpt,
    api_client,
    api_failure,
    console,
    fail,
    load_settings,
    path_width,
    setup_logging,
    short_path,
)
from core.settings import Settings

ModeOpt = Annotated[
    Literal["hybrid", "dense", "sparse"] | None, typer.Option(help="hybrid | dense | sparse (default: configured).")
]
FusionOpt = Annotated[Literal["rrf", "weighted"] | None, typer.Option(help="rrf | weighted (hybrid only).")]
GroupByOpt = Annotated[
    Literal["chunk", "document"],
    typer.Option("--group-by", help="chunk | document: the k best documents, each with its best chunks."),
]


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
    group_by: GroupByOpt = "chunk",
    as_json: JsonOpt = False,
    local: LocalOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Hybrid search over ingested collections; shows where each leg ranked every hit."""
    from app.cli.remote import ApiError

    setup_logging(verbose)
    settings = load_settings()
    client = api_client(settings, local=local)
    if client is not None:
        body: dict[str, Any] = {"query": query, "k": k, "mode": mode, "fusion": fusion, "alpha": alpha}
        if group_by != "chunk":
            body["group_by"] = group_by
        if collection:
            body["collections"] = collection
        if path_prefix is not None:
            body["filters"] = {"path_prefix": path_prefix}
        try:
            with client:
                result = client.search({key: v for key, v in body.items() if v is not None})
        except ApiError as e:
            api_failure(e, settings)
    else:
        result = _search_local(settings, query, collection, mode, fusion, alpha, k, path_prefix, group_by)
    if as_json:
        typer.echo(json.dumps(result))
        return
    if result.get("documents") is not None:
        console.print(documents_table(result, width=console.width))
    else:
        console.print(hits_table(result, width=console.width))
    if not result["hits"]:
        console.print("no results (is the collection ingested? rag ingest PATH -c NAME)")


def _search_local(
    settings: Settings,
    query: str,
    collection: list[str] | None,
    mode: Literal["hybrid", "dense", "sparse"] | None,
    fusion: Literal["rrf", "weighted"] | None,
    alpha: float | None,
    k: int,
    path_prefix: str | None,
    group_by: Literal["chunk", "document"],
) -> dict[str, Any]:
    from app.schemas.search import SearchResponse
    from app.services.search import CHUNKS_PER_DOCUMENT, DOCUMENT_DECAY, search_options
    from core.wiring import build_retriever, load_embedder, open_store, search_defaults
    from retrieval.documents import group_hits
    from retrieval.types import RetrievalError, SearchFilters

    embedder = load_embedder(settings, threads=1)
    store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    options = search_options(search_defaults(settings), mode=mode, fusion=fusion, alpha=alpha)
    names = list(dict.fromkeys(collection)) if collection else None
    filters = SearchFilters(collections=tuple(names) if names else None, path_prefix=path_prefix)
    grouped = group_by == "document"
    started = time.perf_counter()
    try:
        retriever = build_retriever(settings, store, embedder)
        hits = retriever.search_sync(
            query, k=k * CHUNKS_PER_DOCUMENT if grouped else k, filters=filters, options=options
        )
    except (RetrievalError, ValueError) as e:
        fail(str(e))
    took_ms = (time.perf_counter() - started) * 1000
    documents = group_hits(hits, k, decay=DOCUMENT_DECAY) if grouped else None
    if documents is not None:
        hits = [h for doc in documents for h in doc.evidence]
    return SearchResponse.build(query, options, names, hits, took_ms, documents=documents).model_dump(mode="json")


def where(hit: dict[str, Any]) -> str:
    """Where a hit (wire form) sits in its document: its location, else its page, else nothing."""
    return str(hit.get("location") or (f"page {hit['page']}" if hit.get("page") else ""))


def hits_table(result: dict[str, Any], *, width: int) -> Table:
    """The hits of a ``SearchResponse`` (wire form) as a table ``width`` characters wide.

    The source column is never cut: its path is shortened from the left to fit (the file name
    stays whole) and the snippet takes what is left, wrapped.
    """
    options = result["options"]
    title = f"{result['query']!r} · {options['mode']}" + (
        f" · {options['fusion']}" if options["mode"] == "hybrid" else ""
    )
    table = Table(title=title)
    for col in ("#", "score", "dense", "bm25"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("where", overflow="fold", max_width=18)  # location: page, slide, sheet and rows
    table.add_column("snippet", overflow="fold", ratio=1)
    # Borders and padding of 7 columns (22) plus the numeric columns' widths (~21) and a short
    # location ("page 12", "slide 3"; longer ones fold within 18).
    budget = path_width(width, 50)
    for h in result["hits"]:
        dense, sparse = h.get("dense"), h.get("sparse")
        prefix = f"{h['collection']}:"
        table.add_row(
            str(h["rank"]),
            f"{h['score']:.4f}",
            str(dense["rank"]) if dense else "-",
            str(sparse["rank"]) if sparse else "-",
            prefix + short_path(h["path"], max(8, budget - len(prefix))),
            where(h),
            " ".join(h["text"].split())[:160],
        )
    return table


def documents_table(result: dict[str, Any], *, width: int) -> Table:
    """The documents of a grouped ``SearchResponse`` (wire form): rank, score, source and the
    best chunk's snippet (with how many chunks back the document)."""
    table = Table(title=f"{result['query']!r} · documents")
    for col in ("#", "score", "chunks"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("source", no_wrap=True)
    table.add_column("best chunk", overflow="fold", ratio=1)
    budget = path_width(width, 40)
    for d in result["documents"]:
        best = d["evidence"][0]
        prefix = f"{d['collection']}:"
        snippet = " ".join(best["text"].split())[:160]
        table.add_row(
            str(d["rank"]),
            f"{d['score']:.4f}",
            str(len(d["evidence"])),
            prefix + short_path(d["path"], max(8, budget - len(prefix))),
            f"{where(best)}: {snippet}" if where(best) else snippet,
        )
    return table
