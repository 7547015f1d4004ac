"""``rag eval retrieval``: score every search mode on a BEIR-layout dataset.

The corpus is ingested through the real pipeline into a scratch collection (incremental,
so a second run reuses it), every query is searched in every mode, chunk hits are mapped
back to passage ids (a passage's best chunk gives its rank), and ir-measures computes
nDCG@10, Recall@10, Recall@100 and MRR@10.

``sweep`` scores a grid of fusion parameters from legs computed once per query; it is how
the defaults in ``docs/retrieval.md`` were chosen (on the development set only).

``passage_baseline`` scores the plain alternative in the same run (whole passages, dense only),
so every report shows whether chunking and fusion still gain anything over it.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.pgindex.index import PgRetriever
from evaluation.beir import Dataset, materialize
from retrieval.documents import rank_documents
from retrieval.fusion import Fused, Legs, rrf, weighted
from retrieval.hybrid import HybridRetriever
from retrieval.metrics import evaluate, run_from_rankings
from retrieval.types import Embedder, Normalization, ScoredChunk, SearchFilters, SearchOptions

DEPTH = 100  # Recall@100 needs 100 distinct passages per query


def scratch_collection(dataset: Dataset) -> str:
    """A stable collection name for a dataset folder (name + hash of its absolute path)."""
    digest = hashlib.sha1(str(dataset.root).encode("utf-8")).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in dataset.name)[:64]
    return f"eval-{safe}-{digest}"


def materialize_dataset(dataset: Dataset, data_dir: Path, collection: str) -> tuple[Path, dict[str, str]]:
    """Write the corpus as files under the data dir; returns (folder, file name -> passage id)."""
    folder = data_dir / "eval" / collection / "docs"
    return folder, materialize(dataset, folder)


def mode_options(defaults: SearchOptions) -> dict[str, SearchOptions]:
    """The modes every evaluation reports: the two legs, the default hybrid, and both fusions."""
    return {
        "dense": replace(defaults, mode="dense"),
        "sparse": replace(defaults, mode="sparse"),
        "hybrid": replace(defaults, mode="hybrid"),
        "hybrid-rrf-1:1": replace(defaults, mode="hybrid", fusion="rrf", rrf_k=60, dense_weight=1, sparse_weight=1),
    }


def _passage_ranking(
    hits: Iterable[tuple[int, float]], passage_of: Callable[[int], str | None], *, decay: float = 0.0
) -> list[str]:
    """Passage ids ranked from best-first ``(chunk_id, score)`` hits (:func:`rank_documents`)."""
    return [d.key for d in rank_documents(hits, passage_of, decay=decay)]


@dataclass
class EvalReport:
    """Per-mode metrics plus timing."""

    dataset: str
    collection: str
    queries: int
    results: dict[str, dict[str, float]]
    seconds: dict[str, float]
    options: dict[str, dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The documented JSON shape: ``{"dataset", "queries", "results": {mode: metrics}}`` (+ extras)."""
        return {
            "dataset": self.dataset,
            "collection": self.collection,
            "queries": self.queries,
            "results": self.results,
            "seconds": self.seconds,
            "options": self.options,
        }


class RetrievalEvaluator:
    """Runs searches for a dataset's queries against its scratch collection.

    A passage is ranked by its chunks' scores in the result list: its best chunk's, plus
    ``document_decay`` times the next one's, and so on (:func:`retrieval.documents.rank_documents`;
    0: its best chunk alone).
    """

    def __init__(
        self,
        retriever: HybridRetriever | PgRetriever,
        dataset: Dataset,
        collection: str,
        mapping: Mapping[str, str],
        *,
        document_decay: float = 0.0,
    ) -> None:
        self._retriever = retriever
        self._decay = document_decay
        self._dataset = dataset
        self._collection = collection
        self._mapping = mapping
        self._filters = SearchFilters(collections=(collection,))
        self._paths: dict[int, str | None] = {}

    def _passage_of(self, hit: ScoredChunk) -> str | None:
        return self._mapping.get(Path(hit.chunk.path).name)

    def _search(self, query: str, options: SearchOptions) -> list[ScoredChunk]:
        # Chunks per passage vary; ask for more chunks than passages needed.
        return self._retriever.search_sync(query, k=DEPTH * 2, filters=self._filters, options=options)

    def run_mode(self, options: SearchOptions) -> tuple[dict[str, dict[str, float]], float]:
        """Search every query with ``options``; returns the run and the mean latency in ms."""
        rankings: dict[str, list[str]] = {}
        started = time.perf_counter()
        for qid, text in self._dataset.queries.items():
            hits = self._search(text, options)
            for hit in hits:
                self._paths[hit.chunk.id] = self._passage_of(hit)
            ranked = ((h.chunk.id, h.score) for h in hits)
            rankings[qid] = _passage_ranking(ranked, self._paths.get, decay=self._decay)[:DEPTH]
        elapsed = (time.perf_counter() - started) * 1000 / max(len(self._dataset.queries), 1)
        return run_from_rankings(rankings), elapsed

    def evaluate(self, modes: Mapping[str, SearchOptions]) -> EvalReport:
        """Metrics for every mode in ``modes``."""
        results: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        for name, options in modes.items():
            run, ms = self.run_mode(options)
            results[name] = {k: round(v, 4) for k, v in evaluate(run, self._dataset.qrels).items()}
            seconds[name] = round(ms, 2)
        return EvalReport(
            dataset=str(self._dataset.root),
            collection=self._collection,
            queries=len(self._dataset.queries),
            results=results,
            seconds=seconds,
            options={name: _options_json(o) for name, o in modes.items()},
        )

    def legs(self, depth: int) -> dict[str, Legs]:
        """Each query's dense and sparse legs (``(chunk_id, score)`` best first), computed once."""
        out: dict[str, Legs] = {}
        for qid, text in self._dataset.queries.items():
            legs = []
            for mode in ("dense", "sparse"):
                hits = self._search(text, SearchOptions(mode=mode, depth=depth))  # type: ignore[arg-type]
                for hit in hits:
                    self._paths[hit.chunk.id] = self._passage_of(hit)
                legs.append([(h.chunk.id, h.score) for h in hits])
            out[qid] = Legs(dense=legs[0], sparse=legs[1])
        return out

    def sweep(
        self, legs: Mapping[str, Legs], grid: Sequence[tuple[str, Callable[[Legs], list[Fused]]]]
    ) -> list[tuple[str, dict[str, float]]]:
        """Score each named fusion in ``grid`` over precomputed legs, best nDCG@10 first."""
        rows = []
        for name, fuse in grid:
            rankings = {
                qid: _passage_ranking(((f.id, f.score) for f in fuse(leg)), self._paths.get, decay=self._decay)[:DEPTH]
                for qid, leg in legs.items()
            }
            metrics = evaluate(run_from_rankings(rankings), self._dataset.qrels)
            rows.append((name, {k: round(v, 4) for k, v in metrics.items()}))
        rows.sort(key=lambda r: -r[1]["ndcg@10"])
        return rows


Fusion = Callable[[Legs], list[Fused]]


def _weighted(alpha: float, normalization: Normalization) -> Fusion:
    return lambda legs: weighted(legs, alpha=alpha, normalization=normalization)


def _rrf(k: int, weights: tuple[float, float]) -> Fusion:
    return lambda legs: rrf(legs, k=k, weights=weights)


def default_grid() -> list[tuple[str, Fusion]]:
    """The fusion parameters the sweep tries."""
    grid: list[tuple[str, Fusion]] = []
    norms: tuple[Normalization, ...] = ("minmax", "zscore")
    for norm, alpha in itertools.product(norms, (0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)):
        grid.append((f"weighted {norm} alpha={alpha}", _weighted(alpha, norm)))
    for k, (wd, ws) in itertools.product((10, 30, 60), ((1.0, 1.0), (2.0, 1.0), (3.0, 1.0), (4.0, 1.0))):
        grid.append((f"rrf k={k} weights={wd:g}:{ws:g}", _rrf(k, (wd, ws))))
    return grid


def _options_json(options: SearchOptions) -> dict[str, Any]:
    return {
        "mode": options.mode,
        "fusion": options.fusion,
        "depth": options.depth,
        "rrf_k": options.rrf_k,
        "dense_weight": options.dense_weight,
        "sparse_weight": options.sparse_weight,
        "alpha": options.alpha,
        "normalization": options.normalization,
    }


BASELINE = "passage-dense (baseline)"
"""The name of the baseline row: the plain retriever every chunked recipe must beat."""


def passage_text(title: str, text: str) -> str:
    """What the baseline embeds for a passage: its title and text, as one string."""
    return f"{title}\n\n{text}" if title else text


def passage_baseline(
    dataset: Dataset,
    embedder: Embedder,
    cache: Path,
    *,
    batch: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], float]:
    """The plain baseline, computed in the same run: each *whole passage* (title + text, cut
    only by the model's own input limit) embedded once, exact inner-product search, no chunking,
    no BM25, same model. Returns its metrics and the mean query latency in ms.

    The passage vectors are cached in ``cache`` (a ``.npy`` file named by the model and a digest
    of the corpus file), so only the first run of a dataset pays for embedding it.
    """
    import numpy as np

    passages = list(dataset.passages())
    corpus = dataset.root / "corpus.jsonl"
    digest = hashlib.sha1(corpus.read_bytes()).hexdigest()[:12]  # a cache key
    model = "".join(c if c.isalnum() else "-" for c in embedder.model_id)[:60]
    path = cache / f"baseline-{model}-{digest}.npy"
    if path.is_file():
        vectors = np.load(path)
    else:
        parts = []
        for start in range(0, len(passages), batch):
            chunk = passages[start : start + batch]
            parts.append(np.asarray(embedder.embed_documents([passage_text(p.title, p.text) for p in chunk])))
            if on_progress is not None:
                on_progress(min(start + batch, len(passages)), len(passages))
        vectors = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, embedder.dimension), np.float32)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    ids = [p.id for p in passages]
    rankings: dict[str, list[str]] = {}
    started = time.perf_counter()
    depth = min(DEPTH, len(ids))
    for qid, text in dataset.queries.items():
        scores = vectors @ np.asarray(embedder.embed_query(text), dtype=np.float32)
        top = np.argpartition(-scores, depth - 1)[:depth] if depth else np.zeros(0, dtype=np.int64)
        rankings[qid] = [ids[i] for i in top[np.argsort(-scores[top], kind="stable")]]
    elapsed = (time.perf_counter() - started) * 1000 / max(len(dataset.queries), 1)
    metrics = evaluate(run_from_rankings(rankings), dataset.qrels)
    return {k: round(v, 4) for k, v in metrics.items()}, elapsed
