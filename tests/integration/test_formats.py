"""The formats people really have, through the real worker pipeline: one file of each new format
(made by the tests with the same libraries the loaders read them with) and a scanned PDF with no
text layer, ingested with the packaged embedding model into SQLite and PostgreSQL; each file's
fact is asked about and must come first, cited at its page, slide, sheet and rows or heading path.
Bad Office files fail with a reason while the rest of the batch is indexed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.schemas.jobs import JobOut
from core.db.models import Chunk as ChunkRow
from core.db.models import Document, IngestJob
from ingest.worker import IngestContext, build_ingest_context, enqueue_path, run_job
from retrieval.hybrid import HybridRetriever
from tests.formats_factory import FormatFact, write_bad_inputs, write_docx, write_formats

pytestmark = [pytest.mark.integration]

_ROWS = re.compile(r"rows? (\d+)(?:-(\d+))?$")


async def ingest(ctx: IngestContext, path: Path, collection: str = "docs") -> dict[str, Any]:
    job_id, _ = await enqueue_path(ctx.sessionmaker, path, collection=collection)
    summary = await run_job(ctx, job_id)
    assert summary is not None
    return summary.as_json()


def assert_located(fact: FormatFact, location: str | None, page: int | None) -> None:
    """The chunk's location is the fact's: page/slide number, sheet and rows, or heading path."""
    assert location is not None, f"{fact.format}: no location"
    if fact.row is None:
        assert location == fact.location, f"{fact.format}: {location!r}"
        assert page == fact.page
        return
    # Spreadsheets: "<sheet>, rows a-b" (a CSV file has no sheet), and the fact's row inside.
    assert location.startswith(fact.location.removesuffix("rows")), f"{fact.format}: {location!r}"
    m = _ROWS.search(location)
    assert m is not None, f"{fact.format}: {location!r}"
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    assert first <= fact.row <= last, f"{fact.format}: row {fact.row} not in {location!r}"
    assert page is None


async def test_each_format_is_retrieved_first_at_its_location(
    database_url: str, make_settings: Any, embedder: Any, tmp_path: Path, tesseract: None
) -> None:
    folder = tmp_path / "office"
    facts = write_formats(folder)
    ctx = await build_ingest_context(make_settings(database_url), embedder=embedder)
    try:
        summary = await ingest(ctx, folder)
        assert summary["status"] == "succeeded"
        assert summary["files"]["new"] == len(facts), summary["errors"]
        assert summary["files"]["failed"] == 0

        # The extraction report: totals, and the files worth a look (the scan, the e-mail's
        # unread image attachment), in the summary and in the job's wire form alike.
        extraction = summary["extraction"]
        assert extraction["files"] == len(facts)
        assert extraction["pages_ocr"] == 2
        assert extraction["ocr_seconds"] > 0
        assert extraction["characters"] > 1000
        notable = {Path(r["path"]).name: r for r in extraction["reports"]}
        assert notable["scan.pdf"]["pages_ocr"] == 2
        assert notable["scan.pdf"]["pages"] == 2
        assert any("diagram.png" in w for w in notable["migration.eml"]["warnings"])
        async with ctx.sessionmaker() as session:
            job = await session.get(IngestJob, summary["job_id"])
            assert job is not None
            assert JobOut.from_row(job, "docs").extraction == extraction
            docs = {Path(d.path).name: d for d in await session.scalars(select(Document))}
            locations = set(await session.scalars(select(ChunkRow.location)))
        assert docs["scan.pdf"].report is not None and docs["scan.pdf"].report["pages_ocr"] == 2
        assert docs["sample.pptx"].page_count == 3
        assert None not in locations  # every chunk of these formats knows where it is

        retriever = HybridRetriever(ctx.store, ctx.embedder)
        for fact in facts:
            hits = await retriever.search(fact.query, k=5)
            top = hits[0].chunk
            assert top.path == str(fact.path), f"{fact.format}: {fact.query!r} found {Path(top.path).name} first"
            assert fact.answer in top.text, f"{fact.format}: {top.text!r}"
            assert_located(fact, top.location, top.page)
    finally:
        await ctx.aclose()


async def test_bad_office_files_fail_with_a_reason_and_the_batch_goes_on(
    database_url: str, make_settings: Any, embedder: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    bad = write_bad_inputs(folder, max_rows=500)
    good = write_docx(folder / "good.docx")
    ctx = await build_ingest_context(make_settings(database_url, ingest={"max_sheet_rows": 500}), embedder=embedder)
    try:
        summary = await ingest(ctx, folder)
    finally:
        await ctx.aclose()
    assert summary["status"] == "succeeded"
    assert summary["files"]["new"] == 1
    assert summary["files"]["failed"] == len(bad)
    reasons = {Path(e["path"]).name: e["reason"] for e in summary["errors"]}
    assert "password-protected" in reasons[bad["encrypted"].name]
    assert "not a valid Excel workbook" in reasons[bad["corrupt"].name]
    assert "zip bomb" in reasons[bad["bomb"].name]
    assert "more than 500 rows" in reasons[bad["huge"].name]
    assert "not a valid PowerPoint presentation" in reasons[bad["truncated"].name]
    assert summary["chunks"]["added"] > 0
    assert good.path.exists()
