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
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Self-hosted RAG question answering.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema (Alembic).")
app.add_typer(db_app, name="db")

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
    for noisy in ("pypdf", "fontTools", "sentence_transformers", "transformers"):
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


def _mount_subapps() -> None:
    """Sub-apps that live in other packages (light imports: typer only)."""
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
