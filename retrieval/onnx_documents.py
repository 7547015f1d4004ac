"""Document embedding through ONNX Runtime with int8 dynamic quantization: fast without bfloat16.

On a CPU without AVX512-BF16/AMX the embedder runs in float32, several times slower than on
one with them. This module provides the other fast path: the query encoder's exported graph
(:func:`retrieval.onnx_queries.export_query_encoder`: transformer, mean pooling, L2 norm)
quantized by ONNX Runtime's ``quantize_dynamic`` (int8 weights, activations quantized on the
fly) and run in length-sorted batches.

What is quantized: every MatMul (and the embedding Gathers) except the six feed-forward output
projections (``layer.N/output/dense``), whose inputs (after GELU) have outliers that per-tensor
activation quantization flattens. Measured on 96 FAQ passages against PyTorch float32: mean
cosine 0.9957 (min 0.991) with them left in float32, against 0.952 (min 0.912) with everything
quantized, at about the same speed.

Nothing here decides whether the path is used: :class:`Calibration` holds what
:func:`calibrate` measured on this machine (float32 and int8 rates in the same run, and the
agreement of the vectors), and ``core.wiring`` picks the backend from it and the settings.
onnx and onnxruntime are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.onnx_queries import INPUTS, inference_session
from retrieval.types import RetrievalError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "Calibration",
    "OnnxDocumentEncoder",
    "calibrate",
    "calibration_passages",
    "cpu_signature",
    "quantize_document_encoder",
]

logger = logging.getLogger(__name__)

MIN_SPEEDUP = 2.0
"""``auto`` uses int8 only where it embeds at least this many times the float32 rate."""
MIN_COSINE = 0.98
"""Every calibration passage's int8 vector must have at least this cosine with float32's."""
MIN_MEAN_COSINE = 0.99
"""... and the mean cosine at least this (0.9957 measured where nDCG@10 stayed within 0.005)."""

_TEXT = (
    "The worker claims a queued job, walks the folder and hashes every file; unchanged files are "
    "skipped, new and changed ones are read by the loader of their format, split into chunks of "
    "about two hundred tokens and embedded in batches. Each batch is recorded in one transaction "
    "with the job's counters, so a crash leaves the database at a batch boundary. Debian packages "
    "are installed with apt-get; Python strings are immutable; git reset --soft HEAD~1 undoes the "
    "last commit but keeps its changes; in R, lapply applies a function over a list. "
)


def calibration_passages(n: int = 24) -> list[str]:
    """``n`` deterministic passages of chunk length (~150-220 tokens), different from each other."""
    words = _TEXT.split()
    out = []
    for i in range(n):
        start = (i * 7) % len(words)
        length = 110 + (i * 13) % 50
        out.append(" ".join(words[(start + j) % len(words)] for j in range(length)))
    return out


def cpu_signature() -> str:
    """What the int8 kernels' speed and rounding depend on: CPU model, the SIMD flags ONNX Runtime
    dispatches on, and the ONNX Runtime version. A stored calibration is reused only on a match."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    simd = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c", "sse4_2"))
    try:
        import onnxruntime as ort

        version = ort.__version__
    except ImportError:
        version = "missing"
    return f"{model} | {' '.join(simd)} | onnxruntime {version}"


def quantize_document_encoder(float_path: Path, path: Path) -> None:
    """Write the int8 dynamically quantized form of an exported encoder (see the module docstring).

    Written beside ``path`` and renamed into place (concurrent processes never read half a file).

    Raises:
        RetrievalError: onnx/onnxruntime missing, or the quantization failed.
    """
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise RetrievalError(f"int8 document embedding needs onnx and onnxruntime: {e}") from e
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        graph = onnx.load(str(float_path), load_external_data=False)
        keep_float = [
            node.name
            for node in graph.graph.node
            if node.op_type == "MatMul" and "/output/dense/" in node.name and "/attention/" not in node.name
        ]
        del graph
        # quantize_dynamic logs a hint about pre-processing through the root logger; it is noise here.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_root_logger():
            quantize_dynamic(str(float_path), str(tmp), weight_type=QuantType.QInt8, nodes_to_exclude=keep_float)
        tmp.replace(path)
    except Exception as e:
        raise RetrievalError(f"quantizing the document encoder failed: {type(e).__name__}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_root_logger() -> Any:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class OnnxDocumentEncoder:
    """Embeds passages with an (int8) exported graph, in batches of similar length.

    Sorting by token count before batching keeps padding small (a batch pads to its longest
    passage); the vectors come back in the input order. Thread-safe (the tokenizer is used under
    a lock; ONNX Runtime sessions may run concurrently).

    Args:
        path: The ``.onnx`` file.
        tokenizer: The model's Hugging Face tokenizer.
        max_length: Tokens the model reads (longer passages are truncated, as in PyTorch).
        threads: ONNX Runtime intra-op threads.
        batch_size: Passages per forward pass.

    Raises:
        RetrievalError: onnxruntime is missing or cannot load the file.
    """

    def __init__(self, path: Path, tokenizer: Any, *, max_length: int, threads: int, batch_size: int = 32) -> None:
        import threading

        self._session = inference_session(path, threads)
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._batch_size = max(1, batch_size)
        self._lock = threading.Lock()
        self.path = path

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Normalized float32 vectors, shape ``(len(texts), dimension)``, in the order given."""
        if not texts:
            raise ValueError("nothing to embed")
        with self._lock:
            lengths = [
                len(ids)
                for ids in self._tokenizer(list(texts), truncation=True, max_length=self._max_length)["input_ids"]
            ]
        order = np.argsort(lengths, kind="stable")[::-1]
        parts: list[npt.NDArray[np.float32]] = []
        for start in range(0, len(order), self._batch_size):
            batch = [texts[i] for i in order[start : start + self._batch_size]]
            with self._lock:
                encoded = self._tokenizer(
                    batch, return_tensors="np", truncation=True, max_length=self._max_length, padding=True
                )
            feeds = {
                name: np.asarray(
                    encoded[name] if name in encoded else np.zeros_like(encoded["input_ids"]), dtype=np.int64
                )
                for name in INPUTS
            }
            (vectors,) = self._session.run(None, feeds)
            parts.append(np.asarray(vectors, dtype=np.float32))
        stacked = np.concatenate(parts)
        out = np.empty_like(stacked)
        out[order] = stacked
        return np.ascontiguousarray(out)


@dataclass(frozen=True, slots=True)
class Calibration:
    """What :func:`calibrate` measured on one machine; stored as JSON in the data directory."""

    cpu: str
    threads: int
    passages: int
    float32_per_second: float
    int8_per_second: float
    min_cosine: float
    mean_cosine: float

    @property
    def speedup(self) -> float:
        """int8 rate over float32 rate, measured in the same run."""
        return self.int8_per_second / self.float32_per_second if self.float32_per_second > 0 else 0.0

    @property
    def agrees(self) -> bool:
        """Whether the int8 vectors are close enough to float32's to leave retrieval unchanged."""
        return self.min_cosine >= MIN_COSINE and self.mean_cosine >= MIN_MEAN_COSINE

    @property
    def chosen(self) -> bool:
        """Whether ``auto`` uses int8 here: fast enough and close enough."""
        return self.agrees and self.speedup >= MIN_SPEEDUP

    def to_json(self) -> dict[str, Any]:
        """The stored form (with the derived verdicts, for people reading the file)."""
        return {**asdict(self), "speedup": round(self.speedup, 3), "agrees": self.agrees, "chosen": self.chosen}

    @classmethod
    def load(cls, path: Path) -> Calibration | None:
        """A stored calibration, or None if the file is missing or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path) -> None:
        """Write atomically (rename into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)


def calibrate(
    float32: Callable[[Sequence[str]], npt.NDArray[np.float32]],
    int8: Callable[[Sequence[str]], npt.NDArray[np.float32]],
    *,
    threads: int,
    passages: Sequence[str] | None = None,
    rounds: int = 2,
) -> Calibration:
    """Measure both document paths on the same passages, interleaved, in this run.

    Interleaving (float32, int8, float32, int8, ...) spreads a burst of load from other processes
    over both; the rates are totals over ``rounds``. The first call of each is a warm-up.
    """
    texts = list(passages or calibration_passages())
    reference = float32(texts[:4])
    int8(texts[:4])
    spent = {"float32": 0.0, "int8": 0.0}
    ref = fast = reference
    for _ in range(rounds):
        t0 = time.perf_counter()
        ref = float32(texts)
        spent["float32"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = int8(texts)
        spent["int8"] += time.perf_counter() - t0
    cosines = (ref * fast).sum(axis=1)
    n = len(texts) * rounds
    return Calibration(
        cpu=cpu_signature(),
        threads=threads,
        passages=len(texts),
        float32_per_second=round(n / spent["float32"], 3),
        int8_per_second=round(n / spent["int8"], 3),
        min_cosine=round(float(cosines.min()), 6),
        mean_cosine=round(float(cosines.mean()), 6),
    )
