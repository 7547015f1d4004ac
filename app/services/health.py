"""Readiness checks (``/readyz``) and the ingestion gauges of ``/metrics``.

Each check has its own timeout and never raises: a failing check is reported with its reason.
Only the database is essential: without the model server, search and the rest of the API
still work (answers get 503), so readiness is ``degraded``, not ``unavailable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.observability import Metrics
from app.services import jobs as jobs_service
from ingest.queue import STATUSES
from retrieval.types import IndexCatalog


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check."""

    ok: bool
    detail: str
    ms: float


async def _timed(check: Callable[[], Awaitable[str]], limit: float) -> CheckResult:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(check(), limit)
        ok = True
    except TimeoutError:
        ok, detail = False, f"no answer within {limit:g} s"
    except Exception as e:  # reported, not raised: readiness must always answer
        ok, detail = False, f"{type(e).__name__}: {e}"
    return CheckResult(ok, detail, round((time.perf_counter() - started) * 1000.0, 2))


async def readiness(
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    store: IndexCatalog,
    llm_probe: Callable[[], Awaitable[None]],
    limit_seconds: float,
) -> tuple[str, dict[str, CheckResult]]:
    """Run the checks concurrently; returns (``ready`` | ``degraded`` | ``unavailable``, checks)."""

    async def database() -> str:
        async with sessionmaker() as session:
            await session.execute(text("SELECT 1"))
        return "reachable"

    async def index() -> str:
        def load_all() -> str:
            names = store.collections()
            for name in names:
                store.load(name)  # cached after the first load; raises on a mismatched/corrupt index
            return f"{len(names)} collection(s) readable"

        return await asyncio.to_thread(load_all)

    async def model_server() -> str:
        await llm_probe()
        return "reachable"

    db, idx, llm = await asyncio.gather(
        _timed(database, limit_seconds), _timed(index, limit_seconds), _timed(model_server, limit_seconds)
    )
    checks = {"database": db, "index": idx, "model_server": llm}
    if not db.ok:
        status = "unavailable"
    elif not (idx.ok and llm.ok):
        status = "degraded"
    else:
        status = "ready"
    return status, checks


async def update_ingest_gauges(session: AsyncSession, metrics: Metrics) -> None:
    """Read the job table into the ingestion gauges (called on each scrape)."""
    by_status, (seen, total, progress) = await jobs_service.job_counts(session)
    for status in STATUSES:
        metrics.ingest_jobs.labels(status=status).set(by_status.get(status, 0))
    metrics.ingest_files_seen.set(seen)
    metrics.ingest_files_total.set(total)
    metrics.ingest_progress.set(progress)
