"""Versioned snapshot store: publish/load, deltas, atomic switch, GC, locking, mismatch errors."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from retrieval.dense import DenseIndex
from retrieval.sparse import SparseIndex
from retrieval.store import IndexStore, Snapshot
from retrieval.tokenize import TokenizerOptions
from retrieval.types import Chunk, IndexCorruptError, IndexMismatchError
from tests.unit.fakes_retrieval import CORPUS, HashEmbedder, make_chunk

pytestmark = pytest.mark.unit

EMB = HashEmbedder(dimension=32)


def _store(root: Path, **kw: object) -> IndexStore:
    args: dict[str, object] = {"model_id": EMB.model_id, "dimension": EMB.dimension, **kw}
    return IndexStore(root, **args)  # type: ignore[arg-type]


def _publish(store: IndexStore, chunks: list[Chunk], collection: str = "docs", **kw: object) -> Snapshot:
    vectors = EMB.embed_documents([c.text for c in chunks])
    return store.publish(collection, add=chunks, vectors=vectors, **kw)  # type: ignore[arg-type]


def _corpus_chunks(collection: str = "docs") -> list[Chunk]:
    return [make_chunk(i, t, collection=collection) for i, t in CORPUS.items()]


def _versions(root: Path, collection: str = "docs") -> list[str]:
    return sorted(d.name for d in (root / collection / "versions").iterdir())


def test_publish_then_load_from_another_store(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    chunks = _corpus_chunks()
    chunks[0] = Chunk(
        id=1, document_id=10, collection="docs", path="py/faq.html", ordinal=3, text=CORPUS[1],
        start=5, end=5 + len(CORPUS[1]), page=2, title="Paths — ünïcode", metadata={"lang": "en"},
    )  # fmt: skip
    published = _publish(writer, chunks)

    reader = _store(tmp_path)  # a second process, as far as the store knows
    snap = reader.load("docs")
    assert snap is not None and snap is not published
    assert snap.version == published.version
    assert snap.ids.tolist() == sorted(CORPUS)
    assert snap.chunks[1] == chunks[0]
    assert snap.chunks[1].metadata == {"lang": "en"}
    m = snap.manifest
    assert (m.model_id, m.dimension, m.chunk_count, m.collection) == (EMB.model_id, 32, 8, "docs")
    assert m.tokenizer == TokenizerOptions() and m.created_at.endswith("+00:00")
    ids, scores = snap.dense.search(EMB.embed_query(CORPUS[3]), 3)
    assert ids[0] == 3 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert snap.sparse.search("git rebase", 3)[0][0] == 3
    assert reader.collections() == ["docs"]
    assert reader.load("docs") is snap  # cached: CURRENT unchanged
    manifest = json.loads((tmp_path / "docs" / "versions" / snap.version / "manifest.json").read_text())
    assert manifest["chunk_count"] == 8 and manifest["tokenizer"]["compounds"] is True


def test_delta_replaces_and_removes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    first = _publish(store, _corpus_chunks())
    new_text = "Completely different text about SQLite transactions."
    second = _publish(store, [make_chunk(2, new_text), make_chunk(100, "A brand new chunk")], remove=[5, 4242])
    assert second.ids.tolist() == [1, 2, 3, 4, 6, 7, 8, 100]
    assert second.chunks[2].text == new_text
    # The replaced chunk's vector and tokens were replaced too.
    np.testing.assert_allclose(second.dense.reconstruct(2), EMB.embed_query(new_text), atol=1e-6)
    assert second.sparse.search("sqlite transactions", 1)[0].tolist() == [2]
    assert second.sparse.search("fs.readfile", 5)[0].size == 0
    # The old snapshot is untouched (copy-on-write).
    assert first.chunks[2].text == CORPUS[2] and 5 in first.chunks
    assert first.sparse.search("fs.readfile", 1)[0].tolist() == [2]
    np.testing.assert_allclose(first.dense.reconstruct(2), EMB.embed_query(CORPUS[2]), atol=1e-6)
    assert int(second.version[:8]) == int(first.version[:8]) + 1


def test_reader_keeps_old_snapshot_while_new_ones_publish_and_gc(tmp_path: Path) -> None:
    writer, reader = _store(tmp_path), _store(tmp_path)
    _publish(writer, _corpus_chunks())
    old = reader.load("docs")
    assert old is not None
    for i in range(3):
        _publish(writer, [make_chunk(200 + i, f"extra chunk {i}")])
    # Only the newest two versions remain on disk; the old snapshot's files are gone ...
    assert len(_versions(tmp_path)) == 2
    assert old.version not in _versions(tmp_path)
    # ... and it still answers from memory, unchanged.
    assert len(old) == 8 and old.sparse.search("git", 1)[0].tolist() == [3]
    assert old.dense.search(EMB.embed_query(CORPUS[4]), 1)[0].tolist() == [4]
    new = reader.load("docs")
    assert new is not None and len(new) == 11 and new.version == _versions(tmp_path)[-1]
    assert (tmp_path / "docs" / "CURRENT").read_text().strip() == new.version


def test_failed_publish_leaves_current_version_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    first = _publish(store, _corpus_chunks())

    def broken_save(self: SparseIndex, path: object) -> None:
        Path(str(path)).write_text("partial", encoding="utf-8")
        raise OSError("disk full")

    monkeypatch.setattr(SparseIndex, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _publish(store, [make_chunk(50, "never visible")])
    monkeypatch.undo()
    # CURRENT still names the first version, no half-written directory is left behind.
    assert (tmp_path / "docs" / "CURRENT").read_text().strip() == first.version
    assert _versions(tmp_path) == [first.version]
    fresh = _store(tmp_path).load("docs")
    assert fresh is not None and fresh.version == first.version and 50 not in fresh.chunks
    # The next publish works and does not reuse anything of the failed one.
    third = _publish(store, [make_chunk(51, "visible")])
    assert 51 in third.chunks and 50 not in third.chunks


def test_crash_leftovers_are_collected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _publish(store, _corpus_chunks())
    (tmp_path / "docs" / "versions" / ".tmp-00000009-deadbeef").mkdir()
    _publish(store, [make_chunk(60, "x")])
    assert not any(n.startswith(".tmp") for n in _versions(tmp_path))


def test_model_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    _publish(_store(tmp_path), _corpus_chunks())
    other_model = IndexStore(tmp_path, model_id="another-model", dimension=32)
    with pytest.raises(IndexMismatchError, match=r"'fake-hash'.*'another-model'.*[Rr]e-ingest.*rebuild"):
        other_model.load("docs")
    other_dim = IndexStore(tmp_path, model_id=EMB.model_id, dimension=48)
    with pytest.raises(IndexMismatchError, match="32 dimensions"):
        other_dim.load("docs")
    # Publishing a delta on top would mix embeddings: refused too ...
    with pytest.raises(IndexMismatchError):
        other_dim.publish("docs", add=[make_chunk(70, "x")], vectors=np.zeros((1, 48), dtype=np.float32))
    # ... while a rebuild from scratch replaces the index.
    rebuilt = other_dim.publish(
        "docs", add=[make_chunk(70, "x")], vectors=np.ones((1, 48), dtype=np.float32), from_scratch=True
    )
    assert rebuilt.ids.tolist() == [70] and rebuilt.manifest.dimension == 48
    with pytest.raises(IndexMismatchError):
        _store(tmp_path).load("docs")


def test_corrupt_version_is_reported(tmp_path: Path) -> None:
    snap = _publish(_store(tmp_path), _corpus_chunks())
    vdir = tmp_path / "docs" / "versions" / snap.version
    chunks = (vdir / "chunks.jsonl").read_text().splitlines()
    (vdir / "chunks.jsonl").write_text("\n".join(chunks[:-1]) + "\n")
    with pytest.raises(IndexCorruptError, match="chunks"):
        _store(tmp_path).load("docs")
    (vdir / "manifest.json").unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        _store(tmp_path).load("docs")


def test_drop(tmp_path: Path) -> None:
    store = _store(tmp_path)
    snap = _publish(store, _corpus_chunks())
    _publish(store, _corpus_chunks("other"), collection="other")
    reader = _store(tmp_path)
    assert reader.collections() == ["docs", "other"]
    assert store.drop("docs") is True
    assert store.drop("docs") is False
    assert reader.collections() == ["other"]
    assert reader.load("docs") is None and store.load("docs") is None
    assert snap.sparse.search("git", 1)[0].tolist() == [3]  # still usable
    again = _publish(store, [make_chunk(1, "reborn")])
    assert again.ids.tolist() == [1] and again.version != snap.version


def test_noop_publish_and_validation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    snap = _publish(store, _corpus_chunks())
    assert store.publish("docs", remove=[12345]) is snap
    assert _versions(tmp_path) == [snap.version]
    with pytest.raises(ValueError, match="collection name"):
        store.publish("../evil", add=[])
    with pytest.raises(ValueError, match="collection name"):
        store.load(".locks")
    with pytest.raises(ValueError, match="shape"):
        store.publish("docs", add=[make_chunk(1, "a")], vectors=np.zeros((2, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        _publish(store, [make_chunk(1, "a"), make_chunk(1, "b")])
    with pytest.raises(ValueError, match="another collection"):
        _publish(store, [make_chunk(1, "a", collection="other")])
    empty = store.publish("empty")
    assert len(empty) == 0 and store.load("empty") is empty


def test_tokenizer_change_retokenizes_on_next_publish(tmp_path: Path) -> None:
    _publish(_store(tmp_path), _corpus_chunks())
    opts = TokenizerOptions(stopwords=True, stem=True)
    store = _store(tmp_path, tokenizer=opts)
    loaded = store.load("docs")
    assert loaded is not None and loaded.manifest.tokenizer == TokenizerOptions()  # queries follow the index
    snap = _publish(store, [make_chunk(99, "Reading streams")])
    assert snap.manifest.tokenizer == opts and snap.sparse.tokenizer.options == opts
    assert "the" not in snap.sparse.term_counts(1) and "path" in snap.sparse.term_counts(1)
    assert "stream" in snap.sparse.term_counts(99)


def test_path_prefix_ids(tmp_path: Path) -> None:
    chunks = [make_chunk(i, f"text {i}", path=p) for i, p in enumerate(["a/x.md", "a/y.md", "ab.md", "b/z.md"], 1)]
    snap = _publish(_store(tmp_path), chunks)
    assert snap.ids_with_path_prefix("a/").tolist() == [1, 2]
    assert snap.ids_with_path_prefix("a").tolist() == [1, 2, 3]
    assert snap.ids_with_path_prefix("").tolist() == [1, 2, 3, 4]
    assert snap.ids_with_path_prefix("c").size == 0


def test_concurrent_publishers_threads_lose_nothing(tmp_path: Path) -> None:
    _publish(_store(tmp_path), [make_chunk(0, "seed")])
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        store = _store(tmp_path)  # separate instances: separate lock file descriptors
        try:
            for j in range(4):
                _publish(store, [make_chunk(offset + j, f"thread chunk {offset} {j}")])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = _store(tmp_path).load("docs")
    assert final is not None
    assert final.ids.tolist() == [0] + [1000 * t + j for t in range(1, 4) for j in range(4)]
    assert int(final.version[:8]) == 13


def _process_publisher(root: str, offset: int) -> None:
    store = IndexStore(root, model_id=EMB.model_id, dimension=EMB.dimension)
    for j in range(3):
        _publish(store, [make_chunk(offset + j, f"process chunk {offset} {j}")])


def test_concurrent_publishers_processes_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # fork + OpenMP threads can deadlock
    procs = [ctx.Process(target=_process_publisher, args=(str(tmp_path), 100 * p)) for p in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    final = _store(tmp_path).load("docs")
    assert final is not None
    assert final.ids.tolist() == [100, 101, 102, 200, 201, 202]


def test_readers_during_publish_see_whole_versions(tmp_path: Path) -> None:
    # Every version v holds chunks whose text all say "version v": a reader must never see
    # a mix, whatever the timing.
    writer = _store(tmp_path)

    def version_chunks(v: int) -> list[Chunk]:
        return [make_chunk(i, f"version {v} chunk {i}", metadata={"v": str(v)}) for i in range(1, 6)]

    _publish(writer, version_chunks(0))
    stop = threading.Event()
    seen: set[str] = set()
    errors: list[BaseException] = []

    def read() -> None:
        reader = _store(tmp_path)
        try:
            while not stop.is_set():
                snap = reader.load("docs")
                assert snap is not None
                versions = {c.metadata["v"] for c in snap.chunks.values()}
                assert len(versions) == 1, versions
                seen.update(versions)
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for v in range(1, 6):
        _publish(writer, version_chunks(v))
    stop.set()
    for t in readers:
        t.join()
    assert not errors
    assert seen  # the readers did read
    final = _store(tmp_path).load("docs")
    assert final is not None and {c.metadata["v"] for c in final.chunks.values()} == {"5"}


# ---------------------------------------------------------------------- the dense index itself


def _unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "IVF2,Flat"])
def test_dense_index_add_search_filter_remove(factory: str, tmp_path: Path) -> None:
    vectors = _unit_rows(200, 16)
    ids = np.arange(1000, 1200, dtype=np.int64)
    index = DenseIndex(16, factory=factory, nprobe=2)  # nprobe = nlist: exact for the test
    index.add(ids, vectors)
    assert len(index) == 200 and index.ids().tolist() == ids.tolist()
    query = vectors[7]
    found, scores = index.search(query, 5)
    assert found[0] == 1007 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores) <= 0)
    # Exact inner-product order, as numpy computes it.
    assert found.tolist() == ids[np.argsort(-(vectors @ query), kind="stable")[:5]].tolist()
    allowed = np.array([1003, 1150, 1199, 5], dtype=np.int64)
    found, _ = index.search(query, 10, allowed_ids=allowed)
    assert sorted(found.tolist()) == [1003, 1150, 1199]
    assert index.search(query, 10, allowed_ids=np.array([], dtype=np.int64))[0].size == 0
    with pytest.raises(ValueError, match="already indexed"):
        index.add(ids[:1], vectors[:1])
    with pytest.raises(ValueError, match="shape"):
        index.add(ids[:2], vectors[:1])
    copy = index.copy()
    assert index.remove([1007, 99]) == 1
    assert 1007 not in index.search(query, 5)[0] and copy.search(query, 1)[0].tolist() == [1007]
    index.save(tmp_path / "dense.faiss")
    loaded = DenseIndex.load(tmp_path / "dense.faiss", factory=factory, nprobe=2)
    assert loaded.ids().tolist() == index.ids().tolist()
    np.testing.assert_array_equal(loaded.search(query, 5)[0], index.search(query, 5)[0])


def _clustered_rows(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around ``clusters`` centres: embeddings have structure, IVF relies on it."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact_top(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return ids[np.argsort(-(vectors @ query), kind="stable")[:k]].tolist()


@pytest.mark.parametrize("kind", ["sq16", "ivf"])
def test_accelerator_lifecycle(kind: str, tmp_path: Path) -> None:
    dim = 16
    vectors = _clustered_rows(3000, dim, clusters=24)
    ids = np.arange(1, 3001, dtype=np.int64)
    label = "SQfp16" if kind == "sq16" else "IVF128,Flat"  # 128: power of two near 2*sqrt(3000)
    index = DenseIndex(dim, accelerator=kind, accelerate_from=2000, nprobe=8)  # type: ignore[arg-type]
    index.add(ids[:1500], vectors[:1500])
    assert not index.maintain() and index.accelerator is None  # below the threshold: exact
    index.add(ids[1500:], vectors[1500:])
    assert index.maintain() and index.accelerator == label
    assert not index.maintain()  # built for this size: nothing to do
    queries = _clustered_rows(40, dim, clusters=24, seed=1)
    hits = [set(index.search(q, 20)[0].tolist()) & set(_exact_top(vectors, ids, q, 20)) for q in queries]
    recall = np.mean([len(h) / 20 for h in hits])
    assert recall >= (0.99 if kind == "sq16" else 0.9), recall
    # Scores are exact inner products (re-ranked with the float32 vectors), best first.
    found, scores = index.search(queries[0], 10)
    np.testing.assert_allclose(scores, vectors[found - 1] @ queries[0], rtol=1e-5)
    assert np.all(np.diff(scores) <= 0)
    # The accelerator follows removals and additions (and copies are independent).
    copy = index.copy()
    target = vectors[5]
    assert index.search(target, 1)[0].tolist() == [6]
    index.remove([6])
    assert 6 not in index.search(target, 50)[0] and copy.search(target, 1)[0].tolist() == [6]
    index.add(np.array([9999], dtype=np.int64), target[None, :])
    assert index.search(target, 1)[0].tolist() == [9999]
    # Broad filters go through the accelerator, narrow ones are exact: every allowed id comes back.
    allowed = np.array([10, 20, 30, 9999], dtype=np.int64)
    found, _ = index.search(target, 10, allowed_ids=allowed)
    assert found[0] == 9999 and sorted(found.tolist()) == sorted(allowed.tolist())
    broad = ids[ids % 2 == 0]
    found, _ = index.search(queries[1], 10, allowed_ids=broad)
    assert found.size == 10 and all(int(i) % 2 == 0 for i in found)
    # Saved beside the index and loaded without rebuilding.
    index.save(tmp_path / "dense.faiss")
    assert (tmp_path / "dense.accel.faiss").is_file()
    loaded = DenseIndex.load(tmp_path / "dense.faiss", accelerator=kind, accelerate_from=2000, nprobe=8)  # type: ignore[arg-type]
    assert loaded.accelerator == label
    for q in queries[:10]:
        np.testing.assert_array_equal(loaded.search(q, 10)[0], index.search(q, 10)[0])
    # Another configured kind replaces it on load; an older version without one gets one; none: exact.
    other = "ivf" if kind == "sq16" else "sq16"
    swapped = DenseIndex.load(tmp_path / "dense.faiss", accelerator=other, accelerate_from=2000)  # type: ignore[arg-type]
    assert swapped.accelerator == ("IVF128,Flat" if other == "ivf" else "SQfp16")
    (tmp_path / "dense.accel.faiss").unlink()
    assert DenseIndex.load(tmp_path / "dense.faiss", accelerator=kind, accelerate_from=2000).accelerator == label  # type: ignore[arg-type]
    exact = DenseIndex.load(tmp_path / "dense.faiss", accelerator=None)
    assert exact.accelerator is None
    assert exact.search(queries[0], 5)[0].tolist() == _exact_top(
        np.vstack([np.delete(vectors, 5, axis=0), target[None, :]]), np.append(np.delete(ids, 5), 9999), queries[0], 5
    )
    # Shrinking below the threshold drops it.
    index.remove(ids[:1500])
    assert not index.maintain() and index.accelerator is None


def test_ivf_accelerator_retrains_when_the_collection_doubles() -> None:
    vectors = _clustered_rows(5000, 8, clusters=10)
    ids = np.arange(5000, dtype=np.int64)
    index = DenseIndex(8, accelerator="ivf", accelerate_from=1000)
    index.add(ids[:1000], vectors[:1000])
    assert index.maintain() and index.accelerator == "IVF64,Flat"
    index.add(ids[1000:2000], vectors[1000:2000])
    assert not index.maintain()  # doubled, not more: the lists still fit
    index.add(ids[2000:], vectors[2000:])
    assert index.maintain() and index.accelerator == "IVF128,Flat"


def test_store_accelerates_large_collections(tmp_path: Path) -> None:
    chunks = [make_chunk(i, f"chunk {i} about topic {i % 7}") for i in range(1, 401)]
    store = _store(tmp_path, accelerate_from=300)
    snap = _publish(store, chunks[:200])
    assert snap.dense.accelerator is None
    snap = _publish(store, chunks[200:])
    assert snap.dense.accelerator == "SQfp16"
    query = EMB.embed_query("chunk 17 about topic 3")
    reloaded = _store(tmp_path, accelerate_from=300).load("docs")
    assert reloaded is not None and reloaded.dense.accelerator == "SQfp16"
    np.testing.assert_array_equal(reloaded.dense.search(query, 10)[0], snap.dense.search(query, 10)[0])
    exact = _store(tmp_path, accelerator=None).load("docs")
    assert exact is not None and exact.dense.accelerator is None
    # Near-exact with exact re-ranking (hash vectors tie a lot: compare scores).
    np.testing.assert_allclose(exact.dense.search(query, 10)[1], snap.dense.search(query, 10)[1], rtol=1e-6)
    assert exact.dense.search(query, 1)[0].tolist() == snap.dense.search(query, 1)[0].tolist() == [17]


def test_dense_index_gpu_request_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    index = DenseIndex(8, use_gpu=True)
    index.add(np.array([1, 2], dtype=np.int64), _unit_rows(2, 8))
    with caplog.at_level("INFO", logger="retrieval.dense"):
        assert index.search(_unit_rows(2, 8)[1], 1)[0].tolist() == [2]
    assert "no GPU" in caplog.text
    empty = DenseIndex(8)
    assert empty.search(np.zeros(8, dtype=np.float32), 3)[0].size == 0
    with pytest.raises(ValueError, match="dimension"):
        empty.search(np.zeros(4, dtype=np.float32), 3)


def test_readers_get_the_previous_snapshot_while_one_thread_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = _store(tmp_path), _store(tmp_path)
    _publish(writer, _corpus_chunks())
    old = reader.load("docs")
    new_version = _publish(writer, [make_chunk(300, "newer")]).version

    started, release = threading.Event(), threading.Event()
    real = IndexStore._read_snapshot

    def slow_read(self: IndexStore, collection: str, version: str) -> Snapshot:
        started.set()
        assert release.wait(10)
        return real(self, collection, version)

    monkeypatch.setattr(IndexStore, "_read_snapshot", slow_read)
    loaded: list[Snapshot | None] = []
    slow = threading.Thread(target=lambda: loaded.append(reader.load("docs")))
    slow.start()
    assert started.wait(10)
    assert reader.load("docs") is old  # not blocked behind the reload
    release.set()
    slow.join()
    assert loaded[0] is not None and loaded[0].version == new_version
    assert reader.load("docs") is loaded[0]
