"""BM25 index: parity with plain rank-bm25, top-k, filters, rebuilds, persistence; the tokenizer."""

from __future__ import annotations

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
    for query in QUERIES:
        # Bit-identical, not merely close: same operations in the same order.
        np.testing.assert_array_equal(index.scores(query), oracle.get_scores(query))


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
            np.testing.assert_array_equal(got_scores, expected_scores[ranked[:k]])


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
    assert changed.tokens_of(ids[0]) == ("w1", "w1", "new")
    np.testing.assert_array_equal(index.scores(["w1", "w2"]), before)  # immutable
    assert ids[1] in index.ids and ids[1] not in changed.ids


def test_save_load_roundtrip(tmp_path: Path) -> None:
    opts = TokenizerOptions(stopwords=True, stem=True)
    tok = Tokenizer(opts)
    texts = ["Les fichiers naïfs — ünïcode", "Reading files in Python", "queries and answers"]
    index = SparseIndex([3, 1, 2], [tok(t) for t in texts], tokenizer=tok, params=BM25Params(k1=1.2))
    path = tmp_path / "sparse.jsonl"
    index.save(path)
    loaded = SparseIndex.load(path)
    assert loaded.ids.tolist() == [1, 2, 3]
    assert loaded.tokenizer.options == opts
    assert loaded.params == BM25Params(k1=1.2)
    for query in ("file", "query answer", "naïfs"):
        np.testing.assert_array_equal(loaded.search(query, 5)[0], index.search(query, 5)[0])
        np.testing.assert_array_equal(loaded.search(query, 5)[1], index.search(query, 5)[1])
    header = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert header["format"] == "bm25-tokens/1" and header["count"] == 3


def test_load_rejects_corrupt_files(tmp_path: Path) -> None:
    index = SparseIndex([1, 2], [["a"], ["b"]])
    path = tmp_path / "sparse.jsonl"
    index.save(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # truncated
    with pytest.raises(IndexCorruptError, match="header says 2"):
        SparseIndex.load(path)
    path.write_text(lines[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(IndexCorruptError):
        SparseIndex.load(path)
    path.write_text('{"format": "pickle"}\n', encoding="utf-8")
    with pytest.raises(IndexCorruptError, match="format"):
        SparseIndex.load(path)


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
