"""Both retrieval backends on one collection recipe, and the sharded postgres index against one node.

    .venv/bin/python bench/pg_backend.py [--dataset ../shared/eval/faq-dev-small]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres] [--out bench/results/pg_backend.json]

1. A scratch PostgreSQL database; the dataset is ingested once by the real pipeline with
   ``RAG_RETRIEVAL__BACKEND=postgres`` (chunk rows, vectors, postings in one transaction per batch).
2. The local backend's snapshot is built from the very same chunk rows (``ingest.indexer.rebuild``):
   both backends search the same chunks with the same vectors, tokenizer and fusion.
3. ``evaluation.retrieval.RetrievalEvaluator`` (the code behind ``rag eval retrieval``) scores every
   mode on both: nDCG@10, Recall@10/100, MRR@10 and ms/query.
4. Two shard clusters are started (``pg_createcluster``; needs root and Debian's
   postgresql-common), the postgres index is sharded over them with PL/Proxy
   (:meth:`core.pgindex.shards.ShardedPgIndex.repair` puts every chunk on its shard), and every
   dev question is searched in every mode on the single node and on the two shards: the top-10
   ids must be equal (scores within 1e-9). The clusters and the scratch database are dropped.

Prints a table and writes JSON; latencies are of this run only (compare within it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_shards(count: int) -> tuple[str, list[str], list[str]]:
    """Start ``count`` throw-away clusters; returns (major, names, libpq strings)."""
    major = sorted((p.name for p in Path("/usr/lib/postgresql").iterdir() if p.name.isdigit()), key=int)[-1]
    names, dsns = [], []
    for i in range(count):
        name, port = f"benchshard{i}_{uuid.uuid4().hex[:6]}", free_port()
        subprocess.run(["pg_createcluster", major, name, "--port", str(port), "--", "--auth=trust"], check=True)
        names.append(name)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", major, name, "start"], check=True)
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-qc", "CREATE DATABASE rag_shard"],
            check=True,
        )
        dsns.append(f"host=127.0.0.1 port={port} dbname=rag_shard user=postgres")
    return major, names, dsns


def drop_shards(major: str, names: list[str]) -> None:
    for name in names:
        subprocess.run(["pg_dropcluster", "--stop", major, name], check=False)


async def admin(url: str, sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.pgindex.index import PgIndex
    from core.pgindex.shards import ShardedPgIndex
    from core.settings import Settings
    from core.wiring import build_retriever, open_store, search_defaults
    from evaluation.beir import load_dataset
    from evaluation.retrieval import RetrievalEvaluator, materialize_dataset, mode_options, scratch_collection
    from ingest.indexer import rebuild
    from ingest.worker import build_ingest_context, enqueue_path, run_job
    from retrieval.types import SearchFilters

    data = load_dataset(Path(args.dataset).resolve())
    name = f"rag_bench_{uuid.uuid4().hex[:8]}"
    await admin(args.admin_url, f'CREATE DATABASE "{name}"')
    url = args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    scratch = Path(args.scratch) / name
    record: dict[str, Any] = {}
    shards: tuple[str, list[str], list[str]] | None = None
    try:
        settings = Settings(data_dir=scratch, database={"url": url}, retrieval={"backend": "postgres"})
        collection = scratch_collection(data)
        folder, mapping = materialize_dataset(data, scratch, collection)
        ctx = await build_ingest_context(settings)
        try:
            started = time.perf_counter()
            job_id, _ = await enqueue_path(ctx.sessionmaker, folder, collection=collection)
            summary = await run_job(ctx, job_id)
            assert summary is not None
            record["ingest"] = {"seconds": round(time.perf_counter() - started, 1), "chunks": summary.chunks}
            pg_index = ctx.store
            assert isinstance(pg_index, PgIndex)
            local_settings = Settings(data_dir=scratch, database={"url": url})
            store = open_store(local_settings, model_id=ctx.embedder.model_id, dimension=ctx.embedder.dimension)
            await rebuild(ctx.sessionmaker, store, collection)  # type: ignore[arg-type]
            modes = mode_options(search_defaults(settings))
            retrievers = {
                "local": build_retriever(local_settings, store, ctx.embedder),
                "postgres": build_retriever(settings, pg_index, ctx.embedder),
            }
            record["backends"] = {}
            for backend, retriever in retrievers.items():
                report = RetrievalEvaluator(retriever, data, collection, mapping).evaluate(modes)
                record["backends"][backend] = {"results": report.results, "ms_per_query": report.seconds}
                print(backend, json.dumps(report.results["hybrid"]), flush=True)

            # Sharding: the same chunks on two shard clusters, every dev question in every mode.
            shards = start_shards(2)
            sharded = await asyncio.to_thread(
                ShardedPgIndex.open,
                url,
                shards=shards[2],
                model_id=pg_index.model_id,
                dimension=pg_index.dimension,
                tokenizer=pg_index.tokenizer.options,
            )
            try:
                put, _ = await asyncio.to_thread(sharded.repair)
                one = retrievers["postgres"]
                many = sharded.retriever(ctx.embedder)
                filters = SearchFilters((collection,))
                compared = {}
                for mode, options in modes.items():
                    same = 0
                    diffs = []
                    for qid, query in data.queries.items():
                        a = await asyncio.to_thread(one.search_sync, query, k=10, filters=filters, options=options)
                        b = await asyncio.to_thread(many.search_sync, query, k=10, filters=filters, options=options)
                        ids_equal = [h.chunk.id for h in a] == [h.chunk.id for h in b]
                        scores_equal = all(
                            math.isclose(x.score, y.score, rel_tol=1e-9, abs_tol=1e-9)
                            for x, y in zip(a, b, strict=False)
                        )
                        if ids_equal and scores_equal:
                            same += 1
                        else:
                            diffs.append(qid)
                    compared[mode] = {"questions": len(data.queries), "identical_top10": same, "differ": diffs[:20]}
                    print("sharded", mode, same, "/", len(data.queries), flush=True)
                shard_report = RetrievalEvaluator(many, data, collection, mapping).evaluate(modes)
                record["sharded"] = {
                    "shards": 2,
                    "chunks_put": put,
                    "rankings_vs_one_node": compared,
                    "results": shard_report.results,
                    "ms_per_query": shard_report.seconds,
                }
            finally:
                await asyncio.to_thread(sharded.close)
        finally:
            await ctx.aclose()
    finally:
        if shards is not None:
            drop_shards(shards[0], shards[1])
        await admin(args.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(scratch, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "eval" / "faq-dev-small"))
    parser.add_argument(
        "--admin-url", default=os.environ.get("RAG_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--scratch", default="/tmp")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pg_backend.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    started = time.perf_counter()
    record = asyncio.run(run(args))
    dataset = Path(args.dataset)
    out = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": f"../shared/eval/{dataset.name}" if dataset.parent.name == "eval" else dataset.name,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        **record,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"retrieval backends · {out['dataset']}")
    for col in ("backend", "mode", "nDCG@10", "Recall@100", "ms/query"):
        table.add_column(col)
    rows = [(b, r) for b, r in record["backends"].items()] + [("postgres, 2 shards", record["sharded"])]
    for backend, r in rows:
        for mode, m in r["results"].items():
            table.add_row(
                backend, mode, f"{m['ndcg@10']:.4f}", f"{m['recall@100']:.4f}", f"{r['ms_per_query'][mode]:.1f}"
            )
    Console().print(table)
    for mode, c in record["sharded"]["rankings_vs_one_node"].items():
        print(f"sharded vs one node, {mode}: {c['identical_top10']}/{c['questions']} identical top-10")


if __name__ == "__main__":
    main()
