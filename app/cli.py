"""The ``rag`` command line: a composition root like the API and the worker.

Heavy imports (torch, FAISS, the embedding model) happen inside the commands that need
them, so ``rag --help`` is instant.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console
from rich.table import Table

from app.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Self-hosted RAG question answering.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
app.add_typer(db_app, name="db")
eval_app = typer.Typer(no_args_is_help=True, help="Measure retrieval and answer quality on BEIR-layout datasets.")
app.add_typer(eval_app, name="eval")

console = Console()
err_console = Console(stderr=True)


def _settings() -> Settings:
    return Settings()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # pypdf/fontTools report recoverable oddities of real-world PDFs as warnings.
    for noisy in ("pypdf", "fontTools", "sentence_transformers", "transformers", "generation"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations (SQLite under RAG_DATA_DIR by default, or RAG_DATABASE__URL)."""
    from app.db.migrate import upgrade

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url, revision)
    console.print(f"database at [bold]{revision}[/]")


@app.command()
def ingest(
    path: Annotated[Path, typer.Argument(help="A folder (ingested recursively) or a single file.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Target collection.")] = "default",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Run now in this process, or only enqueue.")] = True,
    prune: Annotated[
        bool, typer.Option("--prune/--no-prune", help="Delete documents whose files left the folder.")
    ] = True,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ingest a folder or file into a collection (incremental: unchanged files are skipped)."""
    _setup_logging(verbose)
    settings = _settings()
    if not path.exists():
        _fail(f"{path} does not exist")
    try:
        summary = asyncio.run(_ingest(settings, path, collection, wait=wait, prune=prune, quiet=as_json))
    except Exception as e:  # the CLI edge: show the reason, not a traceback
        from ingest.queue import QueueError

        if isinstance(e, QueueError | FileNotFoundError):
            _fail(str(e))
        raise
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif "files" in summary:
        _print_summary(summary)
    else:
        console.print(f"queued job [bold]{summary['job_id']}[/] for collection [bold]{summary['collection']}[/]")
    if summary.get("status") == "failed":
        raise typer.Exit(1)


async def _ingest(
    settings: Settings, path: Path, collection: str, *, wait: bool, prune: bool, quiet: bool
) -> dict[str, Any]:
    from app.db.engine import create_engine, create_sessionmaker
    from app.db.migrate import aupgrade
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if not wait:
        await aupgrade(settings.database_url)
        engine = create_engine(settings.database_url)
        try:
            job_id, name = await enqueue_path(create_sessionmaker(engine), path, collection=collection, prune=prune)
        finally:
            await engine.dispose()
        return {"job_id": job_id, "status": "queued", "collection": name}

    ctx = await build_ingest_context(settings)
    try:
        job_id, _name = await enqueue_path(ctx.sessionmaker, path, collection=collection, prune=prune)
        if quiet:
            summary = await run_job(ctx, job_id)
        else:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("[bold]ingesting"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[current]}", style="dim"),
                console=err_console,
                transient=True,
            ) as progress:
                task = progress.add_task("ingest", total=None, current="")

                def on_progress(done: int, total: int, path: str, outcome: str) -> None:
                    progress.update(task, completed=done, total=total, current=Path(path).name[:40])

                summary = await run_job(ctx, job_id, on_progress=on_progress)
        if summary is None:
            return {"job_id": job_id, "status": "queued", "collection": collection}
        return summary.as_json()
    finally:
        await ctx.aclose()


def _print_summary(summary: dict[str, Any]) -> None:
    files, chunks = summary["files"], summary["chunks"]
    table = Table(title=f"job {summary['job_id']} · {summary['collection']} · {summary['status']}")
    for col in ("new", "changed", "unchanged", "deleted", "failed", "skipped"):
        table.add_column(col, justify="right")
    table.add_row(*(str(files[c]) for c in ("new", "changed", "unchanged", "deleted", "failed", "skipped")))
    console.print(table)
    console.print(
        f"chunks: +{chunks['added']} -{chunks['removed']} = {chunks['total']} in collection · {summary['seconds']:.1f}s"
    )
    if summary["errors"]:
        errors = Table(title="failed files", show_lines=False)
        errors.add_column("path")
        errors.add_column("reason")
        for err in summary["errors"][:50]:
            errors.add_row(err["path"], err["reason"])
        console.print(errors)
        if len(summary["errors"]) > 50:
            console.print(f"... and {len(summary['errors']) - 50} more (rag jobs --json)")


@app.command()
def jobs(
    limit: Annotated[int, typer.Option(help="Most recent N jobs.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """List ingestion jobs, newest first."""
    rows = asyncio.run(_jobs(_settings(), limit))
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="ingest jobs")
    for col in ("id", "collection", "status", "progress", "new", "chg", "same", "del", "fail", "root", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["collection"],
            r["status"],
            f"{r['progress'] * 100:.0f}%",
            str(r["files"]["new"]),
            str(r["files"]["changed"]),
            str(r["files"]["unchanged"]),
            str(r["files"]["deleted"]),
            str(r["files"]["failed"]),
            r["root_path"],
            (r["error"] or "")[:60],
        )
    console.print(table)


async def _jobs(settings: Settings, limit: int) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from app.db.engine import create_engine, create_sessionmaker
    from app.db.migrate import aupgrade
    from app.db.models import Collection, IngestJob

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await aupgrade(settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            result = await session.execute(
                select(IngestJob, Collection.name)
                .join(Collection, Collection.id == IngestJob.collection_id)
                .order_by(IngestJob.id.desc())
                .limit(limit)
            )
            out = []
            for job, name in result:
                out.append(
                    {
                        "id": job.id,
                        "collection": name,
                        "status": job.status,
                        "root_path": job.root_path,
                        "progress": job.progress,
                        "attempts": job.attempts,
                        "files": {
                            "seen": job.files_seen,
                            "new": job.files_new,
                            "changed": job.files_changed,
                            "unchanged": job.files_unchanged,
                            "deleted": job.files_deleted,
                            "failed": job.files_failed,
                            "skipped": job.files_skipped,
                        },
                        "chunks": {"added": job.chunks_added, "removed": job.chunks_removed},
                        "error": job.error,
                        "errors": job.errors,
                        "created_at": job.created_at.isoformat() if job.created_at else None,
                        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
                    }
                )
            return out
    finally:
        await engine.dispose()


@app.command()
def worker(
    once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty.")] = False,
    verbose: VerboseOpt = True,
) -> None:
    """Run the ingestion worker: claim queued jobs and process them."""
    _setup_logging(verbose)
    from ingest.worker import run_worker

    settings = _settings()

    async def _main() -> int:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_worker(settings, once=once, stop=stop)

    ran = asyncio.run(_main())
    err_console.print(f"worker stopped after {ran} job(s)")


def _search_options(
    settings: Settings,
    mode: str | None = None,
    fusion: str | None = None,
    alpha: float | None = None,
    depth: int | None = None,
) -> Any:
    from ingest.worker import search_defaults

    defaults = search_defaults(settings)
    changes: dict[str, Any] = {}
    if mode is not None:
        changes["mode"] = mode
    if fusion is not None:
        changes["fusion"] = fusion
    if alpha is not None:
        changes["alpha"] = alpha
    if depth is not None:
        changes["depth"] = depth
    from dataclasses import replace

    return replace(defaults, **changes)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="Search only these collections (repeatable).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="hybrid | dense | sparse (default: configured).")] = None,
    fusion: Annotated[str | None, typer.Option(help="rrf | weighted (hybrid only).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dense weight of weighted fusion.")] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="Number of results.")] = 10,
    path_prefix: Annotated[str | None, typer.Option(help="Only chunks of documents under this path.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hybrid search over ingested collections; shows where each leg ranked every hit."""
    _setup_logging(False)
    settings = _settings()
    if mode not in (None, "hybrid", "dense", "sparse"):
        _fail(f"--mode must be hybrid, dense or sparse, not {mode!r}")
    if fusion not in (None, "rrf", "weighted"):
        _fail(f"--fusion must be rrf or weighted, not {fusion!r}")
    from ingest.worker import load_embedder, open_store
    from retrieval.hybrid import HybridRetriever
    from retrieval.types import RetrievalError, SearchFilters

    embedder = load_embedder(settings, threads=1)
    store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    options = _search_options(settings, mode, fusion, alpha)
    filters = SearchFilters(collections=tuple(collection) if collection else None, path_prefix=path_prefix)
    try:
        hits = HybridRetriever(store, embedder, defaults=options).search_sync(query, k=k, filters=filters)
    except (RetrievalError, ValueError) as e:
        _fail(str(e))
        return
    if as_json:
        typer.echo(json.dumps({"query": query, "options": _asdict(options), "hits": [_hit_json(h) for h in hits]}))
        return
    table = Table(title=f"{query!r} · {options.mode}" + (f" · {options.fusion}" if options.mode == "hybrid" else ""))
    for col, justify in (("#", "right"), ("score", "right"), ("dense", "right"), ("bm25", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    table.add_column("source")
    table.add_column("page", justify="right")
    table.add_column("snippet", overflow="fold")
    for h in hits:
        table.add_row(
            str(h.rank),
            f"{h.score:.4f}",
            str(h.dense.rank) if h.dense else "-",
            str(h.sparse.rank) if h.sparse else "-",
            f"{h.chunk.collection}:{_short_path(h.chunk.path)}",
            str(h.chunk.page) if h.chunk.page else "",
            " ".join(h.chunk.text.split())[:160],
        )
    console.print(table)
    if not hits:
        console.print("no results (is the collection ingested? rag ingest PATH -c NAME)")


def _short_path(path: str, width: int = 48) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(obj)


def _hit_json(hit: Any) -> dict[str, Any]:
    c = hit.chunk
    return {
        "rank": hit.rank,
        "score": hit.score,
        "dense": {"rank": hit.dense.rank, "score": hit.dense.score} if hit.dense else None,
        "sparse": {"rank": hit.sparse.rank, "score": hit.sparse.score} if hit.sparse else None,
        "chunk_id": c.id,
        "document_id": c.document_id,
        "collection": c.collection,
        "path": c.path,
        "page": c.page,
        "start": c.start,
        "end": c.end,
        "text": c.text,
    }


@eval_app.command("retrieval")
def eval_retrieval(
    dataset: Annotated[Path, typer.Option("--dataset", "-d", help="A BEIR-layout folder.")],
    as_json: JsonOpt = False,
    sweep: Annotated[bool, typer.Option("--sweep", help="Also score a grid of fusion parameters.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ingest a BEIR dataset into a scratch collection and report nDCG@10, Recall@10/100, MRR@10 per mode."""
    _setup_logging(verbose)
    from app.evaluation.beir import DatasetError, load_dataset

    settings = _settings()
    try:
        data = load_dataset(dataset)
    except DatasetError as e:
        _fail(str(e))
        return
    report, sweep_rows = asyncio.run(_eval_retrieval(settings, data, sweep=sweep, quiet=as_json))
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
    if sweep_rows:
        st = Table(title="fusion sweep (same legs, best first)")
        st.add_column("fusion")
        for col in ("nDCG@10", "Recall@10", "Recall@100", "MRR@10"):
            st.add_column(col, justify="right")
        for name, m in sweep_rows:
            st.add_row(name, *(f"{m[k]:.4f}" for k in ("ndcg@10", "recall@10", "recall@100", "mrr@10")))
        console.print(st)


async def _eval_retrieval(settings: Settings, data: Any, *, sweep: bool, quiet: bool) -> tuple[Any, list[Any]]:
    from app.evaluation.retrieval import (
        RetrievalEvaluator,
        default_grid,
        materialize_dataset,
        mode_options,
        scratch_collection,
    )
    from ingest.worker import build_ingest_context, enqueue_path, run_job
    from retrieval.hybrid import HybridRetriever

    collection = scratch_collection(data)
    folder, mapping = await asyncio.to_thread(materialize_dataset, data, settings.data_dir, collection)
    ctx = await build_ingest_context(settings)
    try:
        job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=collection)
        if not quiet:
            err_console.print(f"ingesting {len(mapping)} passages into collection {collection} (incremental)…")
        summary = await run_job(ctx, job_id)
        if summary is not None and not quiet:
            err_console.print(f"ingested: {summary.files} in {summary.seconds:.1f}s")
        retriever = HybridRetriever(ctx.store, ctx.embedder, defaults=_search_options(settings))
        evaluator = RetrievalEvaluator(retriever, data, collection, mapping)
        report = await asyncio.to_thread(evaluator.evaluate, mode_options(_search_options(settings)))
        rows: list[Any] = []
        if sweep:
            legs = await asyncio.to_thread(evaluator.legs, 300)
            rows = await asyncio.to_thread(evaluator.sweep, legs, default_grid())
        return report, rows
    finally:
        await ctx.aclose()


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="Answer from these collections (repeatable).")
    ] = None,
    mode: Annotated[str, typer.Option(help="single | interval | flare")] = "single",
    k: Annotated[int | None, typer.Option("--k", "-k", help="Chunks per retrieval.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Answer length cap in tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    theta: Annotated[float | None, typer.Option(help="flare: retrieve when a token's probability is <= θ.")] = None,
    beta: Annotated[float | None, typer.Option(help="flare: masked queries drop tokens with probability <= β.")] = None,
    lookahead: Annotated[int | None, typer.Option(help="flare: look-ahead tokens per sentence.")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="flare: most re-retrievals per answer.")] = None,
    query_mode: Annotated[str | None, typer.Option(help="flare: masked | question.")] = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer a question from your documents, streamed, with the sources it cites."""
    _setup_logging(verbose)
    from generation.rag import ANSWER_MODES

    if mode not in ANSWER_MODES:
        _fail(f"--mode must be one of {', '.join(ANSWER_MODES)}, not {mode!r}")
    settings = _settings()
    from app.llm import flare_defaults

    try:
        flare = flare_defaults(settings).with_overrides(
            theta=theta, beta=beta, lookahead_tokens=lookahead, max_rounds=max_rounds, query_mode=query_mode
        )
    except ValueError as e:
        _fail(str(e))
        return
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
    mode: str,
    k: int | None,
    max_tokens: int | None,
    temperature: float | None,
    *,
    quiet: bool,
    flare: Any = None,
) -> dict[str, Any] | None:
    from app.llm import answer_defaults, build_llm_client, generation_params
    from generation.rag import AnswerMode, answer
    from generation.types import DoneEvent, ErrorEvent, TokenEvent, event_to_dict
    from ingest.worker import load_embedder, open_store, search_defaults
    from retrieval.hybrid import HybridRetriever
    from retrieval.types import SearchFilters

    embedder = await asyncio.to_thread(load_embedder, settings, threads=1)
    store = open_store(settings, model_id=embedder.model_id, dimension=embedder.dimension)
    retriever = HybridRetriever(store, embedder, defaults=search_defaults(settings))
    llm = build_llm_client(settings)
    kwargs = answer_defaults(settings).kwargs()
    if k is not None:
        kwargs["k"] = k
    if flare is not None:
        kwargs["flare"] = flare
    params = generation_params(settings, max_tokens=max_tokens, temperature=temperature)
    filters = SearchFilters(collections=tuple(collections) if collections else None)
    try:
        async for event in answer(
            question,
            retriever=retriever,
            llm=llm,
            mode=cast("AnswerMode", mode),
            params=params,
            filters=filters,
            **kwargs,
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
                return _done_json(event_to_dict(event))
    finally:
        await llm.aclose()
    return None


def _print_error(code: str, message: str, settings: Settings) -> None:
    hint = ""
    if code == "llm_unavailable":
        hint = f" (is the model server running at {settings.llm.base_url}? start it with `make run` or `rag llm serve`)"
    from rich.markup import escape

    err_console.print(f"[bold red]error[/] {escape(f'[{code}] {message}{hint}')}", highlight=False)


def _print_sources(done: Any) -> None:
    if not done.citations:
        console.print("[dim]no sources cited[/]")
        return
    console.print("[bold]sources[/]")
    for c in done.citations:
        page = f" p.{c.page}" if c.page else ""
        flag = " (inferred)" if getattr(c, "inferred", False) else ""
        console.print(f"  [{c.n}] {c.path}{page} chars {c.start}-{c.end}{flag}", markup=False, highlight=False)


def _done_json(done: dict[str, Any]) -> dict[str, Any]:
    """The documented ``rag ask --json`` shape."""
    return {
        "answer": done["answer"],
        "mode": done["mode"],
        "citations": [
            {k: c[k] for k in ("n", "chunk_id", "path", "page", "start", "end", "snippet", "inferred")}
            for c in done["citations"]
        ],
        "retrievals": [
            {"round": r["round"], "query": r["query"], "reason": r["reason"], "chunk_ids": r["chunk_ids"]}
            for r in done["retrievals"]
        ],
        "usage": done["usage"],
        "timings": done["timings"],
        "finish_reason": done.get("finish_reason"),
    }


@app.command("run")
def run_all() -> None:
    """Start everything (what `make run` does): the model server, the ingestion worker and the API."""
    _setup_logging(False)
    from app.db.migrate import upgrade
    from app.supervisor import run_stack

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    raise typer.Exit(run_stack(settings))


def _mount_subapps() -> None:
    """Sub-apps that live in other packages (light imports: typer only)."""
    from app.flare_cli import app as flare_app
    from app.flare_cli import eval_answers

    app.add_typer(flare_app, name="flare")
    eval_app.command("answers")(eval_answers)
    try:
        from generation.serving.cli import app as llm_app
    except ImportError:  # the model-server commands are being built; the rest of the CLI works
        return
    app.add_typer(llm_app, name="llm")


_mount_subapps()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


# --- the HTTP service and its API keys -----------------------------------------------------------

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the HTTP service (stored hashed).")
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default: RAG_SERVER__HOST, else 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: RAG_SERVER__PORT, else 8000).")] = None,
) -> None:
    """Run the HTTP API (REST, SSE, websocket, OpenAI-compatible); OpenAPI docs at /docs."""
    from pydantic import ValidationError

    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    try:
        settings = Settings(server=overrides) if overrides else Settings()  # type: ignore[arg-type]
    except ValidationError as e:
        _fail("; ".join(str(err["msg"]).removeprefix("Value error, ") for err in e.errors()))
        return
    import uvicorn

    from app.main import create_app
    from app.observability import configure_logging

    configure_logging(settings.server.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,
        access_log=False,
        proxy_headers=settings.server.proxy_headers,
        timeout_graceful_shutdown=10,
    )


async def _keys_session(settings: Settings, work: Any) -> Any:
    from app.db.engine import create_engine, create_sessionmaker
    from app.db.migrate import aupgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    await aupgrade(settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            result = await work(session)
            await session.commit()
            return result
    finally:
        await engine.dispose()


def _key_json(key: Any) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "admin": key.admin,
        "collections": list(key.collections),
        "created_at": key.created_at.isoformat() if key.created_at else None,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
    }


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what the key is for.")],
    collection: Annotated[
        list[str] | None, typer.Option("--collection", "-c", help="A collection the key may use (repeatable).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Every collection, jobs and folders.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create an API key and print its token (shown once: only its hash is stored)."""
    from app.services import keys
    from app.services.errors import InvalidInput

    async def work(session: Any) -> Any:
        return await keys.create_key(session, name=name, collections=collection or [], admin=admin)

    try:
        created = asyncio.run(_keys_session(_settings(), work))
    except InvalidInput as e:
        _fail(e.message)
        return
    if as_json:
        typer.echo(json.dumps({**_key_json(created.key), "token": created.token}))
        return
    scope = "admin (every collection)" if admin else ", ".join(created.key.collections)
    console.print(f"created key [bold]{created.key.id}[/] ({name}) for {scope}")
    typer.echo(created.token)
    err_console.print("store this token now: it cannot be shown again")


@keys_app.command("list")
def keys_list(as_json: JsonOpt = False) -> None:
    """List API keys (never their tokens)."""
    from app.services import keys

    rows = [_key_json(k) for k in asyncio.run(_keys_session(_settings(), keys.list_keys))]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="API keys")
    for col in ("id", "name", "prefix", "scope", "created", "last used", "revoked"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["prefix"] + "…",
            "admin" if r["admin"] else ", ".join(r["collections"]),
            (r["created_at"] or "")[:19],
            (r["last_used_at"] or "-")[:19],
            (r["revoked_at"] or "")[:19],
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(ident: Annotated[str, typer.Argument(help="The key's id, name or prefix.")]) -> None:
    """Revoke an API key (requests with it get 401 from now on)."""
    from app.services import keys
    from app.services.errors import NotFound

    async def work(session: Any) -> Any:
        return await keys.revoke_key(session, ident)

    try:
        key = asyncio.run(_keys_session(_settings(), work))
    except NotFound as e:
        _fail(e.message)
        return
    console.print(f"revoked key [bold]{key.id}[/] ({key.name})")
