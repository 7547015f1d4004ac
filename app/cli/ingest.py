"""``rag ingest``, ``rag reindex``, ``rag jobs`` (``rag jobs cancel ID``), ``rag worker``: putting documents
into collections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

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
    lower_priority,
    setup_logging,
    short_path,
)
from core.settings import Settings


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root ``rag`` app."""
    app.command()(ingest)
    app.command()(reindex)
    # ``rag jobs`` alone lists (as it always did); ``rag jobs cancel ID`` stops one.
    group = typer.Typer(help="List ingestion jobs (newest first), or cancel one.")
    group.callback(invoke_without_command=True)(jobs)
    group.command("cancel")(cancel)
    app.add_typer(group, name="jobs")
    app.command()(worker)


def ingest(
    path: Annotated[Path, typer.Argument(help="A folder (ingested recursively) or a single file.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Target collection.")] = "default",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Run now in this process, or only enqueue.")] = True,
    prune: Annotated[
        bool, typer.Option("--prune/--no-prune", help="Delete documents whose files left the folder.")
    ] = True,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Stay running: ingest again within seconds of any change under PATH (Ctrl-C stops).",
        ),
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ingest a folder or file into a collection (incremental: unchanged files are skipped).

    With ``--watch`` the command stays running and ingests again after every burst of changes
    (debounced by ``RAG_INGEST__WATCH_DEBOUNCE_SECONDS``), printing one summary per job (with
    ``--json``, one JSON object per line).
    """
    from ingest.queue import QueueError

    setup_logging(verbose)
    settings = load_settings()
    if not path.exists():
        fail(f"{path} does not exist")
    if watch and not wait:
        fail("--watch runs the jobs itself; it cannot be combined with --no-wait")
    lower_priority(settings.ingest.nice)
    failed = False

    def report(summary: dict[str, Any]) -> None:
        nonlocal failed
        failed = summary.get("status") == "failed"
        if as_json:
            typer.echo(json.dumps(summary, indent=None if watch else 2))
        elif "files" in summary:
            _print_summary(summary)
        else:
            console.print(f"queued job [bold]{summary['job_id']}[/] for collection [bold]{summary['collection']}[/]")
        if watch and not as_json:
            err_console.print(f"watching {path} for changes (Ctrl-C stops)")

    try:
        asyncio.run(_ingest(settings, path, collection, wait=wait, prune=prune, watch=watch, report=report))
    except (QueueError, FileNotFoundError) as e:
        fail(str(e))
    if failed and not watch:
        raise typer.Exit(1)


async def _ingest(
    settings: Settings,
    path: Path,
    collection: str,
    *,
    wait: bool,
    prune: bool,
    watch: bool = False,
    report: Callable[[dict[str, Any]], None],
) -> None:
    from core.progress import Progress
    from core.wiring import open_database
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    if not wait:
        db = await open_database(settings)
        try:
            job_id, name = await enqueue_path(db.sessionmaker, path, collection=collection, prune=prune)
        finally:
            await db.aclose()
        report({"job_id": job_id, "status": "queued", "collection": name})
        return

    # Progress goes to stderr whatever stdout is (--json included): a bar on a terminal, a plain
    # line every few seconds in a pipe or a log file. It starts before the embedding model loads
    # (several seconds) so that a log never sits silent.
    with Progress("ingest", unit="files", rates=("chunks",)) as progress:
        progress.update(current="loading the embedding model")
        ctx = await build_ingest_context(settings)
        try:
            job_id, _name = await enqueue_path(ctx.sessionmaker, path, collection=collection, prune=prune)
            progress.update(current="listing files")

            def on_progress(done: int, total: int, path: str, outcome: str, *, chunks: int = 0) -> None:
                progress.update(done, total=total, current=Path(path).name, chunks=chunks)

            summary = await run_job(ctx, job_id, on_progress=on_progress)
        except BaseException:
            await ctx.aclose()
            raise
    try:
        report(_summary_json(summary, job_id, collection))
        if watch:
            await _watch(ctx, path, collection, prune=prune, report=report)
    finally:
        await ctx.aclose()


def reindex(
    collections: Annotated[
        list[str] | None,
        typer.Option(
            "--collection", "-c", help="A collection to reindex (repeatable); default: every one that needs it."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even collections with the configured recipe.")
    ] = False,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Run now in this process, or only enqueue.")] = True,
    list_only: Annotated[
        bool, typer.Option("--list", help="Only show each collection's recipe and whether it needs a reindex.")
    ] = False,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rebuild collections whose index recipe (chunk sizes, context, embedding model) differs from the
    configured one: re-chunk and re-embed their stored texts (no file is read again) and swap the new
    index in at once; searches keep answering from the old one until then.

    Without ``-c``, every collection that needs it (``--list`` shows which); ``--force`` rebuilds the
    named (or all) collections even when their recipe is the configured one.
    """
    setup_logging(verbose)
    settings = load_settings()
    lower_priority(settings.ingest.nice)
    failed = False

    def report(row: dict[str, Any]) -> None:
        nonlocal failed
        failed = failed or row.get("status") == "failed"
        if as_json:
            typer.echo(json.dumps(row, indent=2))
        elif "files" in row:
            chunks = row["chunks"]
            line = (
                f"reindexed [bold]{row['collection']}[/]: {row['status']} · {row['files']['changed']} documents · "
                f"chunks -{chunks['removed']} +{chunks['added']} = {chunks['total']} · {row['seconds']:.1f}s"
            )
            console.print(line)
            for err in row["errors"][:20]:
                console.print(f"  {err['path']}: {err['reason']}", markup=False, highlight=False)
            if row["status"] == "failed" and row.get("error"):
                console.print(f"  {row['error']}", markup=False, highlight=False)
        else:
            console.print(f"queued reindex job [bold]{row['job_id']}[/] for collection [bold]{row['collection']}[/]")

    from retrieval.types import RetrievalError

    try:
        asyncio.run(
            _reindex(
                settings,
                collections or None,
                force=force,
                wait=wait,
                list_only=list_only,
                as_json=as_json,
                report=report,
            )
        )
    except LookupError as e:
        fail(str(e.args[0]))
    except RetrievalError as e:  # e.g. the postgres index refusing another embedding model
        fail(str(e))
    if failed:
        raise typer.Exit(1)


async def _reindex(
    settings: Settings,
    names: list[str] | None,
    *,
    force: bool,
    wait: bool,
    list_only: bool,
    as_json: bool,
    report: Callable[[dict[str, Any]], None],
) -> None:
    from core.db.models import IngestJob
    from core.progress import Progress
    from ingest import queue
    from ingest.reindex import recipe_statuses
    from ingest.worker import build_ingest_context, run_job

    with Progress("reindex", unit="documents", rates=("chunks",)) as progress:
        # The configured recipe names the model's id and dimension: the model is loaded either way.
        progress.update(current="loading the embedding model")
        ctx = await build_ingest_context(settings)
    try:
        async with ctx.sessionmaker() as session:
            statuses = await recipe_statuses(session, ctx.recipe, names)
        missing = sorted(set(names or ()) - {s.collection for s in statuses})
        if missing:
            raise LookupError(f"no collection {', '.join(map(repr, missing))}")
        if list_only:
            rows = [
                {
                    "collection": s.collection,
                    "chunks": s.chunks,
                    "recipe": None
                    if s.recorded is None
                    else {"fingerprint": s.recorded.fingerprint(), **s.recorded.to_json()},
                    "reindex_needed": s.reindex_needed,
                }
                for s in statuses
            ]
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "configured": {"fingerprint": ctx.recipe.fingerprint(), **ctx.recipe.to_json()},
                            "collections": rows,
                        },
                        indent=2,
                    )
                )
                return
            table = Table(title=f"index recipes · configured: {ctx.recipe.describe()}")
            for col in ("collection", "chunks", "recipe", "reindex needed"):
                table.add_column(col, overflow="fold")
            for s in statuses:
                recipe = s.recorded.describe() if s.recorded is not None else ("unknown" if s.chunks else "-")
                table.add_row(s.collection, str(s.chunks), recipe, "yes" if s.reindex_needed else "no")
            console.print(table)
            return
        targets = [s for s in statuses if s.chunks > 0 and (force or s.reindex_needed)]
        if not targets:
            if not as_json:
                console.print(f"nothing to reindex: every collection is indexed with {ctx.recipe.describe()}")
            return
        for s in targets:
            async with ctx.sessionmaker() as session:
                collection = await queue.get_or_create_collection(session, s.collection)
                job, _created = await queue.enqueue_reindex(session, collection=collection)
                await session.commit()
                job_id = job.id
            if not wait:
                report({"job_id": job_id, "status": "queued", "collection": s.collection, "kind": "reindex"})
                continue
            with Progress(f"reindex {s.collection}", unit="documents", rates=("chunks",)) as progress:

                def on_progress(done: int, total: int, path: str, outcome: str, *, chunks: int = 0) -> None:
                    progress.update(done, total=total, current=Path(path).name, chunks=chunks)

                summary = await run_job(ctx, job_id, on_progress=on_progress)
            row = _summary_json(summary, job_id, s.collection)
            if summary is not None:
                async with ctx.sessionmaker() as session:
                    ended = await session.get(IngestJob, job_id)
                    row["error"] = ended.error if ended is not None else None
            row["kind"] = "reindex"
            report(row)
    finally:
        await ctx.aclose()


def _summary_json(summary: Any, job_id: int, collection: str) -> dict[str, Any]:
    if summary is None:  # another process claimed it first
        return {"job_id": job_id, "status": "queued", "collection": collection}
    result: dict[str, Any] = summary.as_json()
    return result


async def _watch(
    ctx: Any, path: Path, collection: str, *, prune: bool, report: Callable[[dict[str, Any]], None]
) -> None:
    """Run a job after every burst of changes under ``path`` until SIGINT/SIGTERM."""
    import signal

    from core.progress import Progress
    from ingest.watch import changes
    from ingest.worker import enqueue_path, run_job

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = ctx.settings
    async for changed in changes(
        path,
        quiet=settings.ingest.watch_debounce_seconds,
        force_polling=settings.ingest.watch_force_polling,
        stop=stop,
    ):
        with Progress(f"ingest ({len(changed)} changed)", unit="files", rates=("chunks",)) as progress:

            def on_progress(done: int, total: int, path: str, outcome: str, *, chunks: int = 0) -> None:
                progress.update(done, total=total, current=Path(path).name, chunks=chunks)

            job_id, _name = await enqueue_path(ctx.sessionmaker, path, collection=collection, prune=prune)
            summary = await run_job(ctx, job_id, on_progress=on_progress)
        report(_summary_json(summary, job_id, collection))


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
    for line in extraction_lines(summary.get("extraction") or {}):
        console.print(line, markup=False, highlight=False)
    if summary["errors"]:
        errors = Table(title="failed files", show_lines=False)
        errors.add_column("path", overflow="fold")
        errors.add_column("reason", overflow="fold")
        for err in summary["errors"][:50]:
            errors.add_row(err["path"], err["reason"])
        console.print(errors)
        if len(summary["errors"]) > 50:
            console.print(f"... and {len(summary['errors']) - 50} more (rag jobs --json)")


def extraction_lines(extraction: dict[str, Any], *, limit: int = 20) -> list[str]:
    """A job's extraction report as text: the totals, then each file OCR'd or warned about
    (``rag jobs --json`` and ``GET /v1/jobs/{id}`` have all of it)."""
    if not extraction.get("files"):
        return []
    ocr = (
        f", {extraction['pages_ocr']} OCR'd in {extraction['ocr_seconds']:.1f}s" if extraction.get("pages_ocr") else ""
    )
    lines = [
        f"extracted: {extraction['files']} files, {extraction['pages']} pages/slides/sheets{ocr}, "
        f"{extraction['characters']:,} characters, {extraction['warnings']} warnings"
    ]
    reports = extraction.get("reports") or []
    for report in reports[:limit]:
        notes = [f"{report['pages_ocr']} pages OCR'd"] if report.get("pages_ocr") else []
        notes += list(report.get("warnings") or [])
        lines.append(f"  {report['path']}: {'; '.join(notes)}")
    if len(reports) > limit:
        lines.append(f"  ... and {len(reports) - limit} more (rag jobs --json)")
    return lines


def jobs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Most recent N jobs.", min=1)] = 20,
    as_json: JsonOpt = False,
    local: LocalOpt = False,
) -> None:
    """List ingestion jobs, newest first (the same records as ``GET /v1/jobs``).

    Asks the running API when one answers, else reads the database itself (``--local`` forces it).
    """
    from app.cli.remote import ApiError

    if ctx.invoked_subcommand is not None:
        return

    settings = load_settings()
    client = api_client(settings, local=local)
    if client is not None:
        try:
            with client:
                rows = client.jobs(limit)
        except ApiError as e:
            api_failure(e, settings)
    else:
        rows = asyncio.run(_jobs(settings, limit))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    console.print(jobs_table(rows, width=console.width))
    for line in jobs_errors(rows):
        console.print(line, markup=False, highlight=False)


def jobs_table(rows: list[dict[str, Any]], *, width: int) -> Table:
    """Jobs (``JobOut`` wire form) as a table ``width`` characters wide.

    Id, status and the root path's last part are never cut: the collection and the file counts
    wrap when space runs out, the root path is shortened from the left, and a failed job's error
    goes under the table (``jobs_errors``), where it can be read whole.
    """
    table = Table(title="ingest jobs", caption="files: new/changed/unchanged/deleted/failed")
    table.add_column("id", no_wrap=True, justify="right")
    table.add_column("collection", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("done", no_wrap=True, justify="right")
    table.add_column("files", overflow="fold")
    table.add_column("root", no_wrap=True)

    def longest(key: str, default: int) -> int:
        return max((len(str(r[key])) for r in rows), default=default)

    files_width = len("1200/3/10000/0/12")
    # 6 columns: 7 rules and 12 spaces of padding; "done" is 4 wide.
    frame = 19 + longest("id", 2) + longest("status", 9) + 4
    budget = width - frame - longest("collection", 10) - files_width
    if budget < 24:  # then the collection and the counts wrap rather than the root's name go
        budget = width - frame - min(12, longest("collection", 10)) - 10
    budget = max(16, budget)
    for r in rows:
        files = r["files"]
        table.add_row(
            str(r["id"]),
            r["collection"],
            r["status"],
            f"{r['progress'] * 100:.0f}%",
            "/".join(str(files[k]) for k in ("new", "changed", "unchanged", "deleted", "failed")),
            # A reindex has no folder: its kind takes the place (its "changed" files are re-cut documents).
            "(reindex)" if r.get("kind") == "reindex" else short_path(r["root_path"], budget),
        )
    return table


def jobs_errors(rows: list[dict[str, Any]]) -> list[str]:
    """``job N: <error>`` for every listed job that has one (printed under the table, unwrapped)."""
    return [f"job {r['id']}: {r['error']}" for r in rows if r.get("error")]


def cancel(
    job_id: Annotated[int, typer.Argument(help="The job's id (rag jobs lists them).", min=1)],
    as_json: JsonOpt = False,
    local: LocalOpt = False,
) -> None:
    """Cancel an ingestion job (the same as ``POST /v1/jobs/ID/cancel``).

    A queued job is cancelled at once; a running one stops at its next batch boundary, keeping
    what it committed. Exits 1 when the job does not exist or already ended.
    """
    from app.cli.remote import ApiError

    settings = load_settings()
    client = api_client(settings, local=local)
    if client is not None:
        try:
            with client:
                row = client.cancel_job(job_id)
        except ApiError as e:
            api_failure(e, settings)
    else:
        row = asyncio.run(_cancel(settings, job_id))
    if as_json:
        typer.echo(json.dumps(row, indent=2))
    elif row["status"] == "cancelled":
        console.print(f"job [bold]{job_id}[/] cancelled")
    else:
        console.print(f"job [bold]{job_id}[/] will stop at its next batch boundary (its worker was told)")


async def _cancel(settings: Settings, job_id: int) -> dict[str, Any]:
    from app.schemas.jobs import JobOut
    from app.services.errors import ServiceError
    from app.services.jobs import cancel_job
    from app.services.keys import ANONYMOUS_ADMIN
    from core.wiring import open_database

    db = await open_database(settings)
    try:
        async with db.sessionmaker() as session:
            try:
                job, name = await cancel_job(session, ANONYMOUS_ADMIN, job_id)
            except ServiceError as e:
                fail(e.message)
            await session.commit()
            return JobOut.from_row(job, name).model_dump(mode="json")
    finally:
        await db.aclose()


async def _jobs(settings: Settings, limit: int) -> list[dict[str, Any]]:
    from app.schemas.jobs import JobOut
    from app.services.jobs import list_jobs
    from app.services.keys import ANONYMOUS_ADMIN
    from core.wiring import open_database

    db = await open_database(settings)
    try:
        async with db.sessionmaker() as session:
            rows, _total = await list_jobs(session, ANONYMOUS_ADMIN, limit=limit)
            return [JobOut.from_row(job, name).model_dump(mode="json") for job, name in rows]
    finally:
        await db.aclose()


def worker(
    once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty.")] = False,
    verbose: VerboseOpt = True,
) -> None:
    """Run the ingestion worker: claim queued jobs and process them, and keep the watched folders
    (``RAG_INGEST__WATCH``) ingested as their files change."""
    from ingest.queue import QueueError
    from ingest.worker import run_worker

    setup_logging(verbose)
    settings = load_settings()
    lower_priority(settings.ingest.nice)

    async def main() -> int:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_worker(settings, once=once, stop=stop)

    try:
        ran = asyncio.run(main())
    except (QueueError, FileNotFoundError) as e:
        fail(str(e))
    err_console.print(f"worker stopped after {ran} job(s)")
