"""BM25 index: parity with plain rank-bm25, top-k, filters, rebuilds, persistence; the tokenizer."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from retrieval.sparse import BM25Params, SparseIndex
from retrieval.tokenize import Tokenizer, TokenizerOptions, minimal_stem
from retrieval.types import IndexCorruptError

pytestmark = pytest.mark.unit


def _random_corpus(seed: int, n_docs: int = 200, vocab: int = 60) -> tuple[list[int], list[list[str]]]:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    # Zipf-like weights: a few words occur in most documents (negative raw idf -> rank-bm25's
    # epsilon floor), many are rare; some documents are empty.
    weights = [1.0 / (i + 1) for i in range(vocab)]
    ids = rng.sample(range(1, 100_000), n_docs)
    docs = [rng.choices(words, weights, k=rng.randint(0, 40)) for _ in range(n_docs)]
    return ids, docs


QUERIES = [
    ["w0"],  # in most documents: epsilon-floored idf
    ["w1", "w5", "w17"],
    ["w3", "w3", "w40"],  # repeated term counts twice, as in rank-bm25
    ["w59", "unknown", "w2"],
    ["nothing", "matches"],
    [],
]


@pytest.mark.parametrize("params", [BM25Params(), BM25Params(k1=0.9, b=0.4, epsilon=0.1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_scores_identical_to_rank_bm25(seed: int, params: BM25Params) -> None:
    ids, docs = _random_corpus(seed)
    index = SparseIndex(ids, docs, params=params)
    # The index keeps documents sorted by id; the oracle gets the same order.
    order = np.argsort(ids, kind="stable")
    oracle = BM25Okapi([docs[i] for i in order], k1=params.k1, b=params.b, epsilon=params.epsilon)
    assert index.ids.tolist() == sorted(ids)
    floored = {w for w, v in oracle.idf.items() if v == params.epsilon * oracle.average_idf}
    assert floored, "the corpus must exercise the epsilon floor"
    for query in QUERIES:
        got, expected = index.scores(query), oracle.get_scores(query)
        if not floored.intersection(query):
            # Same float64 operations in the same order: bit-identical.
            np.testing.assert_array_equal(got, expected)
        else:
            # The floor's average idf is summed exactly (math.fsum) where rank-bm25 sums
            # sequentially: a rounding step apart at most.
            np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_top_k_matches_oracle_ranking() -> None:
    ids, docs = _random_corpus(2)
    index = SparseIndex(ids, docs)
    sorted_ids = np.array(sorted(ids))
    oracle = BM25Okapi([docs[i] for i in np.argsort(ids, kind="stable")])
    for query in QUERIES[:4]:
        expected_scores = oracle.get_scores(query)
        # Candidates: documents that contain a query term; best first, ties by id.
        has_term = np.array([any(t in d for t in query) for d in (docs[i] for i in np.argsort(ids))])
        cand = np.flatnonzero(has_term)
        ranked = cand[np.lexsort((sorted_ids[cand], -expected_scores[cand]))]
        for k in (1, 5, 50, 10_000):
            got_ids, got_scores = index.search_tokens(query, k)
            assert got_ids.tolist() == sorted_ids[ranked[:k]].tolist()
            np.testing.assert_allclose(got_scores, expected_scores[ranked[:k]], rtol=1e-13, atol=0)


def test_no_shared_term_no_result() -> None:
    index = SparseIndex([1, 2], [["alpha", "beta"], ["gamma"]])
    ids, _ = index.search_tokens(["beta", "zeta"], 10)
    assert ids.tolist() == [1]
    assert index.search_tokens(["zeta"], 10)[0].size == 0
    assert index.search_tokens(["beta"], 0)[0].size == 0


def test_allowed_ids_filter() -> None:
    index = SparseIndex([10, 20, 30, 40], [["a", "b"], ["a"], ["a", "a"], ["b"]])
    ids, _ = index.search_tokens(["a"], 10)
    assert set(ids.tolist()) == {10, 20, 30}
    ids, _ = index.search_tokens(["a"], 10, allowed_ids=np.array([20, 40, 99], dtype=np.int64))
    assert ids.tolist() == [20]
    ids, _ = index.search_tokens(["a"], 10, allowed_ids=np.array([], dtype=np.int64))
    assert ids.size == 0


def test_search_tokenizes_query_like_the_corpus() -> None:
    tok = Tokenizer()
    texts = {1: "Call os.path.join to build paths", 2: "Join the mailing list", 3: "readFileSync blocks"}
    index = SparseIndex(list(texts), [tok(t) for t in texts.values()], tokenizer=tok)
    ids, _ = index.search("os.path.join", 3)
    assert ids[0] == 1  # the compound term only occurs in chunk 1
    ids, _ = index.search("read file sync", 3)
    assert ids.tolist() == [3]


def test_with_changes_equals_fresh_build_and_keeps_original() -> None:
    ids, docs = _random_corpus(3, n_docs=50)
    index = SparseIndex(ids, docs)
    before = index.scores(["w1", "w2"]).copy()
    changed = index.with_changes(
        add=[(ids[0], ["w1", "w1", "new"]), (123_456, ["w2", "fresh"])], remove=[ids[1], 999_999_999]
    )
    corpus = dict(zip(ids, docs, strict=True))
    del corpus[ids[1]]
    corpus[ids[0]] = ["w1", "w1", "new"]
    corpus[123_456] = ["w2", "fresh"]
    fresh = SparseIndex(list(corpus), list(corpus.values()))
    np.testing.assert_array_equal(changed.ids, fresh.ids)
    for query in (["w1", "w2"], ["new"], ["fresh", "w0"]):
        np.testing.assert_array_equal(changed.scores(query), fresh.scores(query))
    assert changed.term_counts(ids[0]) == {"w1": 2, "new": 1}
    np.testing.assert_array_equal(index.scores(["w1", "w2"]), before)  # immutable
    assert ids[1] in index.ids and ids[1] not in changed.ids


def test_save_load_roundtrip(tmp_path: Path) -> None:
    opts = TokenizerOptions(stopwords=True, stem=True)
    tok = Tokenizer(opts)
    texts = ["Les fichiers naïfs — ünïcode", "Reading files in Python", "queries and answers"]
    index = SparseIndex([3, 1, 2], [tok(t) for t in texts], tokenizer=tok, params=BM25Params(k1=1.2))
    path = tmp_path / "sparse.npz"
    index.save(path)
    loaded = SparseIndex.load(path)
    assert loaded.ids.tolist() == [1, 2, 3]
    assert loaded.tokenizer.options == opts
    assert loaded.params == BM25Params(k1=1.2)
    for query in ("file", "query answer", "naïfs"):
        np.testing.assert_array_equal(loaded.search(query, 5)[0], index.search(query, 5)[0])
        np.testing.assert_array_equal(loaded.search(query, 5)[1], index.search(query, 5)[1])
    with np.load(path, allow_pickle=False) as data:  # plain arrays, nothing pickled
        header = json.loads(bytes(data["header"]).decode())
        assert "naïf" in json.loads(bytes(data["terms"]).decode())  # stemmed like the corpus
    assert header["format"] == "bm25-postings/2" and header["count"] == 3


def _legacy_file(path: Path, ids: list[int], tokens: list[list[str]], opts: TokenizerOptions) -> list[str]:
    """A sparse index file as versions before the postings format wrote it (JSON lines of tokens)."""
    header = {"format": "bm25-tokens/1", "count": len(ids), "params": {"k1": 1.5, "b": 0.75, "epsilon": 0.25}}
    lines = [json.dumps({**header, "tokenizer": opts.to_dict()})]
    lines += [json.dumps({"id": i, "tokens": t}) for i, t in zip(ids, tokens, strict=True)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_legacy_token_files_still_load(tmp_path: Path) -> None:
    tok = Tokenizer()
    texts = {4: "Reading files in Python", 2: "queries and answers", 9: "files and paths"}
    tokens = [tok(t) for t in texts.values()]
    path = tmp_path / "sparse.jsonl"
    _legacy_file(path, list(texts), tokens, tok.options)
    loaded = SparseIndex.load(path)
    fresh = SparseIndex(list(texts), tokens, tokenizer=tok)
    np.testing.assert_array_equal(loaded.ids, fresh.ids)
    for query in ("file", "answers paths"):
        np.testing.assert_array_equal(loaded.search(query, 5)[1], fresh.search(query, 5)[1])


def test_load_rejects_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "sparse.jsonl"
    lines = _legacy_file(path, [1, 2], [["a"], ["b"]], TokenizerOptions())
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # truncated
    with pytest.raises(IndexCorruptError, match="header says 2"):
        SparseIndex.load(path)
    path.write_text(lines[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(IndexCorruptError):
        SparseIndex.load(path)
    path.write_text('{"format": "pickle"}\n', encoding="utf-8")
    with pytest.raises(IndexCorruptError, match="format"):
        SparseIndex.load(path)
    # The postings format: truncated, tampered, or a zip of something else.
    npz = tmp_path / "sparse.npz"
    SparseIndex([1, 2], [["a"], ["b", "a"]]).save(npz)
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError, match="unreadable"):
        SparseIndex.load(npz)
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        fields = {key: arrays[key] for key in arrays.files}
    np.savez(npz, **{**fields, "post_docs": np.array([0, 5, 1], dtype=np.int32)})  # a document that does not exist
    with pytest.raises(IndexCorruptError, match="does not exist"):
        SparseIndex.load(npz)
    np.savez(npz, something=np.zeros(3))
    with pytest.raises(IndexCorruptError):
        SparseIndex.load(npz)


def test_empty_indexes() -> None:
    for index in (SparseIndex([], []), SparseIndex([1, 2], [[], []])):
        assert index.search("anything", 5)[0].size == 0
        assert index.scores(["x"]).tolist() == [0.0] * len(index)
    grown = SparseIndex([], []).with_changes(add=[(5, ["hello"])])
    assert grown.search_tokens(["hello"], 5)[0].tolist() == [5]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        SparseIndex([1, 1], [["a"], ["b"]])
    with pytest.raises(ValueError, match="token lists"):
        SparseIndex([1, 2], [["a"]])


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_keeps_identifiers_and_their_parts() -> None:
    tok = Tokenizer()
    assert tok("Use os.path.join()") == ["use", "os.path.join", "os", "path", "join"]
    assert tok("snake_case and File::Find") == [
        "snake_case",
        "snake",
        "case",
        "and",
        "file::find",
        "file",
        "find",
    ]
    assert tok("readFileSync XMLHttpRequest") == [
        *("readfilesync", "read", "file", "sync"),
        *("xmlhttprequest", "xml", "http", "request"),
    ]
    assert tok("python3 --no-ff end.") == ["python3", "python", "3", "no-ff", "no", "ff", "end"]
    assert tok("Café naïve") == ["café", "naïve"]  # no camel splitting outside ASCII


def test_tokenizer_options() -> None:
    plain = Tokenizer(TokenizerOptions(compounds=False, camel_case=False))
    assert plain("Use os.path.join readFile") == ["use", "os", "path", "join", "readfile"]
    stop = Tokenizer(TokenizerOptions(stopwords=True))
    assert stop("How do I read the file?") == ["read", "file"]
    stem = Tokenizer(TokenizerOptions(stem=True))
    assert stem("files queries process status os.paths") == [
        *("file", "query", "process", "status"),
        *("os.paths", "os", "path"),  # compounds are never stemmed, their parts are
    ]
    assert TokenizerOptions.from_dict(TokenizerOptions(stem=True).to_dict()) == TokenizerOptions(stem=True)
    with pytest.raises(ValueError, match="unknown"):
        TokenizerOptions.from_dict({"lowercase": True})


@pytest.mark.parametrize(
    ("word", "stem"),
    [
        ("files", "file"),
        ("queries", "query"),
        ("plays", "play"),
        ("status", "status"),
        ("class", "class"),
        ("goes", "goes"),
        ("is", "is"),
        ("series", "sery"),  # the S-stemmer's known over-stemming, kept for fidelity to Lucene
    ],
)
def test_minimal_stem(word: str, stem: str) -> None:
    assert minimal_stem(word) == stem


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chains_of_changes_equal_fresh_builds(seed: int) -> None:
    rng = random.Random(seed)
    ids, docs = _random_corpus(seed, n_docs=80, vocab=40)
    corpus = dict(zip(ids, docs, strict=True))
    index = SparseIndex(ids, docs)
    words = [f"w{i}" for i in range(40)] + [f"new{i}" for i in range(10)]
    for _ in range(6):
        present = list(corpus)
        removed = rng.sample(present, k=min(len(present), rng.randint(0, 15)))
        replaced = rng.sample(present, k=min(len(present), rng.randint(0, 5)))
        added = {i: rng.choices(words, k=rng.randint(0, 12)) for i in replaced + rng.sample(range(100_000, 200_000), 5)}
        index = index.with_changes(add=added.items(), remove=removed)
        for i in removed:
            corpus.pop(i, None)
        corpus.update(added)
        fresh = SparseIndex(list(corpus), list(corpus.values()))
        np.testing.assert_array_equal(index.ids, fresh.ids)
        assert index.vocabulary_size == fresh.vocabulary_size  # terms of removed documents are gone
        for query in (*QUERIES, ["new3", "w1"], words[:8]):
            np.testing.assert_array_equal(index.scores(query), fresh.scores(query))
            for k in (3, 100):
                got, want = index.search_tokens(query, k), fresh.search_tokens(query, k)
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])


def test_sampled_selection_returns_the_exact_top_k() -> None:
    # Large enough for the sampled threshold; many documents share every score (ties by id).
    rng = np.random.default_rng(0)
    n = 120_000
    common = rng.random(n) < 0.9
    rare = rng.random(n) < 0.01
    docs = [["common"] * (1 + i % 3) * bool(common[i]) + ["rare"] * bool(rare[i]) for i in range(n)]
    index = SparseIndex(list(range(1, n + 1)), docs)
    for query, k in ((["common"], 100), (["rare", "common"], 10), (["common"], 5000)):
        scores = index.scores(query)
        cand = np.flatnonzero(scores > 0)
        expected = cand[np.lexsort((index.ids[cand], -scores[cand]))][:k]
        got_ids, got_scores = index.search_tokens(query, k)
        assert got_ids.tolist() == index.ids[expected].tolist()
        np.testing.assert_array_equal(got_scores, scores[expected])
