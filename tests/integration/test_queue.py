"""The job queue on a real database: concurrent claimers never share a job; abandoned jobs are
retried, then failed."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import update

from core.db.base import utcnow
from core.db.engine import create_engine, create_sessionmaker
from core.db.migrate import aupgrade
from core.db.models import IngestJob
from ingest import queue

pytestmark = [pytest.mark.integration]


async def test_concurrent_claims_are_exclusive(database_url: str) -> None:
    await aupgrade(database_url)
    engine = create_engine(database_url)
    sessionmaker = create_sessionmaker(engine)
    try:
        async with sessionmaker() as session:
            coll = await queue.get_or_create_collection(session, "q")
            for i in range(6):
                await queue.enqueue(session, collection=coll, root_path=f"/tmp/{i}", prune=True)
            await session.commit()

        async def claimer(n: int) -> list[int]:
            got = []
            while True:
                async with sessionmaker() as session:
                    job = await queue.claim(session, worker_id=f"w{n}", stale_after=60)
                if job is None:
                    return got
                got.append(job.id)

        results = await asyncio.gather(*(claimer(n) for n in range(4)))
        claimed = [j for r in results for j in r]
        assert sorted(claimed) == sorted(set(claimed))  # nobody claimed a job twice
        assert len(claimed) == 6

        # A running job with a stale heartbeat is claimed again, up to max_attempts, then failed.
        async with sessionmaker() as session:
            await session.execute(update(IngestJob).values(heartbeat_at=utcnow() - timedelta(seconds=600)))
            await session.commit()
            again = await queue.claim(session, worker_id="w9", stale_after=60, max_attempts=2)
            assert again is not None and again.attempts == 2
            await session.execute(update(IngestJob).values(heartbeat_at=utcnow() - timedelta(seconds=600), attempts=2))
            await session.commit()
            assert await queue.claim(session, worker_id="w9", stale_after=60, max_attempts=2) is None
            failed = await session.get(IngestJob, again.id, populate_existing=True)
            assert failed is not None and failed.status == "failed"
            assert failed.error and "abandoned" in failed.error
    finally:
        await engine.dispose()


def test_collection_names_are_checked() -> None:
    for bad in ("", "../etc", "a/b", ".hidden", "x" * 200, "sp ace"):
        with pytest.raises(queue.InvalidCollectionName):
            queue.check_collection_name(bad)
    assert queue.check_collection_name("manuals-v2.1_en") == "manuals-v2.1_en"


@pytest.mark.parametrize("name", ["a..b", "..", ".x", "a/b"])
async def test_the_queue_refuses_names_the_index_store_refuses(database_url: str, name: str) -> None:
    # Regression: the queue accepted "a..b"; the worker's reconcile then crashed on it at start-up.
    from retrieval.types import validate_collection_name

    with pytest.raises(ValueError):
        validate_collection_name(name)
    await aupgrade(database_url)
    engine = create_engine(database_url)
    try:
        async with create_sessionmaker(engine)() as session:
            with pytest.raises(queue.InvalidCollectionName):
                await queue.get_or_create_collection(session, name)
    finally:
        await engine.dispose()
