"""HybridRetriever: modes, fusion wiring, filters, cross-collection merging, async, concurrency."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from retrieval.fusion import Legs, rrf, weighted
from retrieval.hybrid import HybridRetriever
from retrieval.store import IndexStore
from retrieval.types import (
    Chunk,
    IndexMismatchError,
    Retriever,
    SearchFilters,
    SearchOptions,
    UnknownCollectionError,
)
from tests.unit.fakes_retrieval import CORPUS, HashEmbedder, make_chunk

pytestmark = pytest.mark.unit

# Two collections: "py" holds chunks 1-4 of CORPUS, "node" holds 5-8 (paths under docs/<name>/).
SPLIT = {"py": [1, 2, 3, 4], "node": [5, 6, 7, 8]}


@pytest.fixture
def emb() -> HashEmbedder:
    return HashEmbedder(dimension=64)


@pytest.fixture
def store(tmp_path: Path, emb: HashEmbedder) -> IndexStore:
    store = IndexStore(tmp_path, model_id=emb.model_id, dimension=emb.dimension)
    for name, ids in SPLIT.items():
        chunks = [
            make_chunk(i, CORPUS[i], collection=name, path=f"docs/{name}/{'a' if i % 2 else 'b'}/{i}.md") for i in ids
        ]
        store.publish(name, add=chunks, vectors=emb.embed_documents([c.text for c in chunks]))
    return store


def _expected_leg(store: IndexStore, emb: HashEmbedder, query: str, leg: str, depth: int) -> list[tuple[int, float]]:
    """The leg over the union of collections, computed independently of the retriever."""
    rows: list[tuple[int, float]] = []
    for name in store.collections():
        snap = store.load(name)
        assert snap is not None
        ids, scores = (
            snap.dense.search(emb._vector(query), depth) if leg == "dense" else snap.sparse.search(query, depth)
        )
        rows += [(int(i), float(s)) for i, s in zip(ids.tolist(), scores.tolist(), strict=True)]
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:depth]


QUERY = "How do I read a file in Python?"


def test_is_a_retriever(store: IndexStore, emb: HashEmbedder) -> None:
    assert isinstance(HybridRetriever(store, emb), Retriever)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_single_leg_modes(store: IndexStore, emb: HashEmbedder, mode: str) -> None:
    retriever = HybridRetriever(store, emb)
    results = retriever.search_sync(QUERY, k=5, options=SearchOptions(mode=mode))  # type: ignore[arg-type]
    expected = _expected_leg(store, emb, QUERY, mode, 100)[:5]
    assert [r.chunk.id for r in results] == [i for i, _ in expected]
    assert [r.score for r in results] == pytest.approx([s for _, s in expected])
    assert [r.rank for r in results] == list(range(1, len(results) + 1))
    for r in results:
        evidence = r.dense if mode == "dense" else r.sparse
        other = r.sparse if mode == "dense" else r.dense
        assert evidence is not None and evidence.rank == r.rank and other is None
        assert r.chunk.text == CORPUS[r.chunk.id]
    # One query embedding per request, and none when no dense leg runs.
    assert len(emb.query_calls) == (1 if mode == "dense" else 0)


@pytest.mark.parametrize(
    "options",
    [
        SearchOptions(fusion="weighted", alpha=0.7, normalization="zscore"),
        SearchOptions(fusion="weighted", alpha=0.3, normalization="minmax"),
        SearchOptions(fusion="rrf", rrf_k=60, dense_weight=1.0, sparse_weight=2.0),
    ],
)
def test_hybrid_fuses_the_union_legs(store: IndexStore, emb: HashEmbedder, options: SearchOptions) -> None:
    retriever = HybridRetriever(store, emb, defaults=options)
    results = retriever.search_sync(QUERY, k=6)
    legs = Legs(
        dense=_expected_leg(store, emb, QUERY, "dense", options.depth),
        sparse=_expected_leg(store, emb, QUERY, "sparse", options.depth),
    )
    if options.fusion == "rrf":
        fused = rrf(legs, k=options.rrf_k, weights=(options.dense_weight, options.sparse_weight))
    else:
        fused = weighted(legs, alpha=options.alpha, normalization=options.normalization)
    assert [r.chunk.id for r in results] == [f.id for f in fused[:6]]
    assert [r.score for r in results] == pytest.approx([f.score for f in fused[:6]])
    assert [(r.dense, r.sparse) for r in results] == [(f.dense, f.sparse) for f in fused[:6]]
    assert {r.chunk.collection for r in results} == {"py", "node"}  # merged across collections
    assert len(emb.query_calls) == 1


def test_depth_cuts_each_leg(store: IndexStore, emb: HashEmbedder) -> None:
    retriever = HybridRetriever(store, emb)
    results = retriever.search_sync(QUERY, k=1, options=SearchOptions(depth=2))
    assert len(results) == 1
    for r in retriever.search_sync(QUERY, k=8, options=SearchOptions(depth=2)):
        assert (r.dense is None or r.dense.rank <= 8) and (r.sparse is None or r.sparse.rank <= 8)
    # k beyond depth still returns k candidates per leg (depth is raised to k).
    assert len(retriever.search_sync(QUERY, k=8, options=SearchOptions(mode="dense", depth=2))) == 8


def test_collection_filter(store: IndexStore, emb: HashEmbedder) -> None:
    retriever = HybridRetriever(store, emb)
    results = retriever.search_sync(QUERY, k=10, filters=SearchFilters(collections=("node",)))
    assert results and {r.chunk.collection for r in results} == {"node"}
    with pytest.raises(UnknownCollectionError, match="nope"):
        retriever.search_sync(QUERY, filters=SearchFilters(collections=("py", "nope")))


@pytest.mark.parametrize("mode", ["hybrid", "dense", "sparse"])
def test_path_prefix_filter_applies_to_both_legs(store: IndexStore, emb: HashEmbedder, mode: str) -> None:
    retriever = HybridRetriever(store, emb)
    filters = SearchFilters(path_prefix="docs/py/a/")  # chunks 1 and 3
    results = retriever.search_sync(
        "Python file git rebase",
        k=10,
        filters=filters,
        options=SearchOptions(mode=mode),  # type: ignore[arg-type]
    )
    assert results and {r.chunk.id for r in results} <= {1, 3}
    for r in results:
        assert r.chunk.path.startswith("docs/py/a/")
    assert retriever.search_sync(QUERY, filters=SearchFilters(path_prefix="nowhere/")) == []


def test_edge_cases(store: IndexStore, emb: HashEmbedder, tmp_path: Path) -> None:
    retriever = HybridRetriever(store, emb)
    assert retriever.search_sync(QUERY, k=0) == []
    assert len(retriever.search_sync(QUERY, k=50)) <= 8
    assert retriever.search_sync("zzz qqq", k=5, options=SearchOptions(mode="sparse")) == []
    with pytest.raises(ValueError, match="depth"):
        retriever.search_sync(QUERY, options=SearchOptions(depth=0))
    empty = IndexStore(tmp_path / "empty", model_id=emb.model_id, dimension=emb.dimension)
    assert HybridRetriever(empty, emb).search_sync(QUERY) == []
    with pytest.raises(IndexMismatchError, match="other-model"):
        HybridRetriever(store, HashEmbedder(dimension=64, model_id="other-model"))


async def test_async_search_runs_in_the_executor(store: IndexStore, emb: HashEmbedder) -> None:
    retriever = HybridRetriever(store, emb, executor=ThreadPoolExecutor(1, thread_name_prefix="retrieval"))
    results = await retriever.search(QUERY, k=4, filters=SearchFilters(collections=("py",)))
    assert [r.chunk.id for r in results] == [
        r.chunk.id for r in retriever.search_sync(QUERY, k=4, filters=SearchFilters(collections=("py",)))
    ]
    assert emb.query_threads[0] != threading.get_ident()  # not on the event loop's thread


def test_search_during_publish(store: IndexStore, emb: HashEmbedder, tmp_path: Path) -> None:
    # A second store instance on the same root plays the ingest worker (another process);
    # searches in this one must keep working and see whole versions while it publishes.
    writer = IndexStore(tmp_path, model_id=emb.model_id, dimension=emb.dimension)
    retriever = HybridRetriever(store, emb)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: list[int] = []

    def search() -> None:
        try:
            while not stop.is_set():
                results = retriever.search_sync("python", k=20, filters=SearchFilters(collections=("py",)))
                # Every version adds exactly one chunk tagged with its number; a consistent
                # snapshot never holds a tag twice or skips one.
                tags = sorted(int(r.chunk.metadata["n"]) for r in results if "n" in r.chunk.metadata)
                assert tags == list(range(len(tags))), tags
                counts.append(len(tags))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=search) for _ in range(2)]
    for t in threads:
        t.start()
    for n in range(6):
        chunk = make_chunk(500 + n, f"python extra {n}", collection="py", metadata={"n": str(n)})
        writer.publish("py", add=[chunk], vectors=emb.embed_documents([chunk.text]))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert counts
    final = retriever.search_sync("python extra", k=20, filters=SearchFilters(collections=("py",)))
    assert {r.chunk.id for r in final} >= set(range(500, 506))


def test_chunks_resolve_to_their_collection(store: IndexStore, emb: HashEmbedder) -> None:
    retriever = HybridRetriever(store, emb)
    for r in retriever.search_sync(QUERY, k=8):
        assert isinstance(r.chunk, Chunk)
        assert r.chunk.id in SPLIT[r.chunk.collection]
    assert np.isfinite([r.score for r in retriever.search_sync(QUERY, k=8)]).all()


class _SlowEmbedder(HashEmbedder):
    """Records which threads ran while a query was being embedded."""

    def __init__(self, dimension: int) -> None:
        super().__init__(dimension=dimension)
        self.overlapped = threading.Event()
        self.embedding = threading.Event()

    def embed_query(self, text: str) -> np.ndarray:
        self.embedding.set()
        self.overlapped.wait(timeout=5)  # until the BM25 leg has run on the other executor
        return super().embed_query(text)


def test_bm25_leg_runs_during_the_embedding_with_a_leg_executor(store: IndexStore, emb: HashEmbedder) -> None:
    slow = _SlowEmbedder(dimension=emb.dimension)
    original = store.load("py")
    assert original is not None
    search = type(original.sparse).search

    def observed(self: object, *args: object, **kwargs: object) -> object:
        # Run only once the embedding has started; then release it. Run one after the
        # other, the two would each wait out their timeout instead.
        if slow.embedding.wait(timeout=5):
            slow.overlapped.set()  # the BM25 leg ran while the query was being embedded
        return search(self, *args, **kwargs)  # type: ignore[arg-type]

    options = SearchOptions(mode="hybrid", fusion="weighted")
    sequential = HybridRetriever(store, emb).search_sync(QUERY, k=6, options=options)
    with ThreadPoolExecutor(max_workers=1) as legs, pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(original.sparse), "search", observed)
        parallel = HybridRetriever(store, slow, leg_executor=legs).search_sync(QUERY, k=6, options=options)
    assert slow.overlapped.is_set()
    assert [(r.chunk.id, r.score, r.dense, r.sparse) for r in parallel] == [
        (r.chunk.id, r.score, r.dense, r.sparse) for r in sequential
    ]


def test_leg_executor_must_differ_from_the_search_executor(store: IndexStore, emb: HashEmbedder) -> None:
    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(ValueError, match="leg_executor"):
        HybridRetriever(store, emb, executor=pool, leg_executor=pool)


def test_a_failing_dense_leg_waits_for_the_bm25_leg(store: IndexStore, emb: HashEmbedder) -> None:
    class Broken(HashEmbedder):
        def embed_query(self, text: str) -> np.ndarray:
            raise RuntimeError("embedding failed")

    finished = threading.Event()
    original = store.load("py")
    assert original is not None
    search = type(original.sparse).search

    def slow_search(self: object, *args: object, **kwargs: object) -> object:
        result = search(self, *args, **kwargs)  # type: ignore[arg-type]
        finished.set()
        return result

    with ThreadPoolExecutor(max_workers=1) as legs, pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(original.sparse), "search", slow_search)
        retriever = HybridRetriever(store, Broken(dimension=emb.dimension), leg_executor=legs)
        with pytest.raises(RuntimeError, match="embedding failed"):
            retriever.search_sync(QUERY, k=3)
        assert finished.is_set()  # the leg had finished before the error reached the caller
