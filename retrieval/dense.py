"""Dense (vector) index over chunk ids, backed by FAISS.

The index is ``IndexIDMap2`` around an inner index built from a FAISS factory string
(``"Flat"`` by default: exact inner-product search, which on L2-normalized embeddings is
cosine similarity). ``IDMap2`` keys vectors by int64 chunk id and supports removal and
``reconstruct(id)``; the inner index can be swapped for ``"IVF1024,Flat"`` or
``"HNSW32,Flat"`` when collections grow (note: HNSW cannot remove vectors, so it only
suits collections that are rebuilt rather than updated).

Scores are inner products: higher is better, as the fusion code assumes.

**Accelerators.** Exact search reads every float32 vector: 11 ms a query at 100k chunks on one
quiet core, most of a hybrid search's budget. A ``"Flat"`` index of at least
``accelerate_from`` vectors therefore also keeps a smaller copy that searches read instead,
and re-ranks its best ``rerank_factor × k`` candidates with the exact vectors, so returned
scores are exact inner products and only a candidate the copy ranks far too low can be missed:

- ``"sq16"`` (default): the vectors as float16 (FAISS ``SQfp16``): half the bytes, 2.5x faster
  at 100k, recall@100 against exact 0.9998 before re-ranking and 1.000 after, on the FAQ
  dev set's real embeddings (``bench/dense_recall.py``). Needs no training.
- ``"ivf"``: an ``IndexIVFFlat`` (``nlist`` ≈ 2·√n, a power of two; k-means on a capped,
  seeded sample) probed at ``nprobe`` lists: sub-linear, for collections far beyond 100k, at
  a measured cost in recall (0.89 recall@100 probing 12.5 % of the lists on the same data);
  retrained by :meth:`DenseIndex.maintain` when the collection has doubled or halved.

The exact index stays the source of truth (mutations, rebuilds, narrow filters,
``reconstruct``); the accelerator follows every add and remove.

Thread-safety: concurrent :meth:`DenseIndex.search` calls are safe; mutation
(:meth:`DenseIndex.add`/:meth:`DenseIndex.remove`) must not overlap with anything else.
The store never mutates a published index (it :meth:`DenseIndex.copy`-ies it), so
searches never need a lock.

Errors: :class:`ValueError` for bad arguments; FAISS' own ``RuntimeError`` for
operations the chosen inner index does not support.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    FloatArray = npt.NDArray[np.float32]

__all__ = [
    "DEFAULT_ACCELERATE_FROM",
    "DEFAULT_NPROBE",
    "AcceleratorKind",
    "DenseIndex",
    "ivf_nlist",
    "set_search_threads",
]

log = logging.getLogger(__name__)

AcceleratorKind = Literal["sq16", "ivf"]
DEFAULT_ACCELERATE_FROM = 50_000
"""Exact ``Flat`` search stays below this size (a few ms); the accelerator starts here."""
DEFAULT_NPROBE = 32
"""IVF lists probed per query (see ``bench/dense_recall.py`` for the recall it buys)."""
DEFAULT_RERANK_FACTOR = 2
"""Accelerated searches fetch this many times ``k`` candidates and re-rank them exactly."""
# A filter that keeps at most this share of the vectors is searched exactly: an approximate
# search with a narrow selector could return too few (IVF probes lists without allowed vectors).
_EXACT_FILTER_SHARE = 0.25
# k-means of the accelerator: a capped, deterministic training sample and few iterations keep a
# 100k-vector build to seconds (FAISS warns below 39 points per list; 40 is enough for IVF).
_TRAIN_POINTS_PER_LIST = 40
_TRAIN_ITERATIONS = 10


def set_search_threads(threads: int) -> None:
    """FAISS' OpenMP threads for this process (a process-wide setting; composition roots call it).

    One query searched with two threads on two busy cores was measured slower than with one
    (17 ms vs 11 ms, exact search of 100k vectors); search processes use 1, while an ingest
    worker keeps the default for k-means training.
    """
    _faiss().omp_set_num_threads(max(1, threads))


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest ``2 * sqrt(n)``, 64 at least."""
    target = 2.0 * float(np.sqrt(max(n, 1)))
    return int(max(64, 2 ** round(np.log2(target))))


def _faiss() -> Any:
    # Imported lazily: importing retrieval (e.g. retrieval.types from generation) must not
    # load FAISS' native libraries.
    import faiss

    return faiss


class DenseIndex:
    """Inner-product vector index keyed by chunk id.

    Args:
        dimension: Vector dimension.
        factory: FAISS factory string of the inner index (``"Flat"``, ``"IVF1024,Flat"``,
            ``"HNSW32,Flat"`` …); it is wrapped in ``IDMap2`` here.
        use_gpu: Search on all GPUs (``faiss.index_cpu_to_all_gpus``) when faiss-gpu sees
            one; otherwise log and stay on the CPU. The CPU index remains the source of
            truth (mutations, filtered searches, saving).
        nprobe: IVF lists probed per query (IVF inner indexes and the ``"ivf"`` accelerator).
        ef_search: HNSW search breadth (HNSW inner indexes only).
        accelerator: The accelerator kind (see the module docstring); ``None``: always exact.
        accelerate_from: A ``"Flat"`` index this large gets the accelerator once
            :meth:`maintain` runs.
        rerank_factor: Candidates fetched from the accelerator per result, re-ranked exactly.
    """

    def __init__(
        self,
        dimension: int,
        *,
        factory: str = "Flat",
        use_gpu: bool = False,
        nprobe: int = DEFAULT_NPROBE,
        ef_search: int = 64,
        accelerator: AcceleratorKind | None = "sq16",
        accelerate_from: int = DEFAULT_ACCELERATE_FROM,
        rerank_factor: int = DEFAULT_RERANK_FACTOR,
    ) -> None:
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        faiss = _faiss()
        cpu = faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        self._setup(
            cpu,
            factory=factory,
            use_gpu=use_gpu,
            nprobe=nprobe,
            ef_search=ef_search,
            accel=_AccelConfig(accelerator, accelerate_from, rerank_factor),
        )

    def _setup(
        self, cpu: Any, *, factory: str, use_gpu: bool, nprobe: int, ef_search: int, accel: _AccelConfig
    ) -> None:
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        if accel.kind not in (None, "sq16", "ivf"):
            raise ValueError(f"unknown accelerator {accel.kind!r} (use 'sq16', 'ivf' or None)")
        if accel.rerank_factor < 1:
            raise ValueError(f"rerank_factor must be at least 1, got {accel.rerank_factor}")
        self._dimension = int(cpu.d)
        self._factory = factory
        self._nprobe = nprobe
        self._ef_search = ef_search
        self._use_gpu = use_gpu
        self._cpu: Any = cpu
        self._gpu: Any = None
        self._gpu_lock = threading.Lock()
        # Only an exact inner index is accelerated: a user who chose IVF/HNSW has chosen already.
        self._config = accel if factory == "Flat" else _AccelConfig(None, accel.accelerate_from, accel.rerank_factor)
        self._accel: Any = None
        self._accel_kind: AcceleratorKind | None = None
        self._accel_trained_on = 0

    @classmethod
    def _wrap(
        cls, index: Any, *, factory: str, use_gpu: bool, nprobe: int, ef_search: int, accel: _AccelConfig
    ) -> DenseIndex:
        faiss = _faiss()
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"expected an IndexIDMap2, got {type(index).__name__}")
        self = cls.__new__(cls)
        self._setup(index, factory=factory, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search, accel=accel)
        return self

    # ------------------------------------------------------------------ properties

    @property
    def dimension(self) -> int:
        """Vector dimension."""
        return self._dimension

    @property
    def factory(self) -> str:
        """FAISS factory string of the inner index."""
        return self._factory

    @property
    def nprobe(self) -> int:
        """IVF lists probed per query."""
        return self._nprobe

    @property
    def accelerator(self) -> str | None:
        """What searches read (``"SQfp16"``, ``"IVF512,Flat"``), or ``None`` when they are exact."""
        if self._accel is None:
            return None
        if self._accel_kind == "ivf":
            return f"IVF{int(_faiss().extract_index_ivf(self._accel).nlist)},Flat"
        return "SQfp16"

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def ids(self) -> IntArray:
        """All chunk ids in the index, sorted ascending (a fresh array)."""
        return np.sort(_faiss().vector_to_array(self._cpu.id_map).astype(np.int64, copy=False))

    def reconstruct(self, chunk_id: int) -> FloatArray:
        """The stored vector of ``chunk_id``.

        Raises:
            RuntimeError: If the id is not in the index (FAISS' error).
        """
        return np.asarray(self._cpu.reconstruct(int(chunk_id)), dtype=np.float32)

    # ------------------------------------------------------------------ mutation

    def add(self, ids: IntArray | list[int], vectors: FloatArray) -> None:
        """Add vectors under new chunk ids.

        An untrained inner index (IVF) is trained on these vectors first.

        Args:
            ids: New chunk ids, unique and not yet in the index.
            vectors: ``(len(ids), dimension)`` matrix, float32 (converted if needed).

        Raises:
            ValueError: On a shape mismatch, a repeated id, or an id already present (use
                :meth:`remove` first to replace a vector).
        """
        id_arr = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (id_arr.size, self._dimension):
            raise ValueError(f"expected vectors of shape ({id_arr.size}, {self._dimension}), got {vecs.shape}")
        if id_arr.size == 0:
            return
        if np.unique(id_arr).size != id_arr.size:
            raise ValueError("repeated chunk ids in one add()")
        present = id_arr[np.isin(id_arr, self.ids())]
        if present.size:
            raise ValueError(f"chunk ids already indexed: {present[:10].tolist()}")
        if not self._cpu.is_trained:
            self._cpu.train(vecs)
        self._cpu.add_with_ids(vecs, id_arr)
        if self._accel is not None:
            self._accel.add_with_ids(vecs, id_arr)
        self._gpu = None  # the GPU copy is stale; re-cloned on the next search

    def remove(self, ids: IntArray | list[int]) -> int:
        """Remove chunk ids; absent ids are ignored.

        Returns:
            The number of vectors removed.
        """
        id_arr = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if id_arr.size == 0 or len(self) == 0:
            return 0
        faiss = _faiss()
        removed = int(self._cpu.remove_ids(faiss.IDSelectorBatch(id_arr)))
        if removed:
            if self._accel is not None:
                self._accel.remove_ids(faiss.IDSelectorBatch(id_arr))
            self._gpu = None
        return removed

    def copy(self) -> DenseIndex:
        """An independent deep copy (same factory, search settings and accelerator; CPU only until searched)."""
        faiss = _faiss()
        clone = DenseIndex._wrap(
            faiss.clone_index(self._cpu),
            factory=self._factory,
            use_gpu=self._use_gpu,
            nprobe=self._nprobe,
            ef_search=self._ef_search,
            accel=self._config,
        )
        if self._accel is not None:
            clone._accel = faiss.clone_index(self._accel)
            clone._accel_kind, clone._accel_trained_on = self._accel_kind, self._accel_trained_on
        return clone

    # ------------------------------------------------------------------ accelerator

    def maintain(self) -> bool:
        """Build, retrain or drop the accelerator as the index size and the configuration require.

        Builds it when the index reached ``accelerate_from`` (or holds another kind than
        configured), retrains an IVF accelerator when the index has doubled or halved since it
        was trained (its lists would no longer fit the data), and drops it below the
        threshold. Call it after a batch of mutations; it is the only expensive step (seconds
        at 100k vectors), never done during a search.

        Returns:
            True when it built or retrained the accelerator.
        """
        n = len(self)
        kind = self._config.kind
        if kind is None or n < max(self._config.accelerate_from, 1):
            self._accel, self._accel_kind, self._accel_trained_on = None, None, 0
            return False
        if self._accel is not None and self._accel_kind == kind:
            trained = self._accel_trained_on
            if kind == "sq16" or trained // 2 <= n <= 2 * trained:
                return False
        self._accel = self._build_accelerator(kind)
        self._accel_kind, self._accel_trained_on = kind, n
        return True

    def _exact_vectors(self) -> tuple[FloatArray, IntArray]:
        faiss = _faiss()
        inner = faiss.downcast_index(self._cpu.index)
        n = int(inner.ntotal)
        vectors = faiss.rev_swig_ptr(inner.get_xb(), n * self._dimension)
        ids = faiss.vector_to_array(self._cpu.id_map).astype(np.int64, copy=False)
        return np.array(vectors, dtype=np.float32).reshape(n, self._dimension), ids

    def _build_accelerator(self, kind: AcceleratorKind) -> Any:
        faiss = _faiss()
        vectors, ids = self._exact_vectors()
        if kind == "sq16":
            index = faiss.index_factory(self._dimension, "IDMap,SQfp16", faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = ivf_nlist(len(ids))
            index = faiss.index_factory(self._dimension, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.niter = _TRAIN_ITERATIONS
            ivf.cp.max_points_per_centroid = _TRAIN_POINTS_PER_LIST  # FAISS subsamples (seeded) above this
            ivf.cp.seed = 1234
            ivf.cp.verbose = False
        index.train(vectors)
        index.add_with_ids(vectors, ids)
        log.info("built dense accelerator kind=%s vectors=%d", kind, len(ids))
        return index

    def _accelerated_search(
        self, query: FloatArray, limit: int, allowed: IntArray | None, nprobe: int | None
    ) -> tuple[Any, Any]:
        """Candidates from the accelerator, re-ranked with the exact vectors (FAISS' result shapes)."""
        faiss = _faiss()
        fetch = min(len(self), limit * self._config.rerank_factor)
        selector = None if allowed is None else faiss.IDSelectorBatch(allowed)
        kwargs = {} if selector is None else {"sel": selector}
        if self._accel_kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=nprobe or self._nprobe, **kwargs)
        else:
            params = faiss.SearchParameters(**kwargs)
        _, found = self._accel.search(query, fetch, params=params)
        cand = found[0][found[0] >= 0]
        exact = np.asarray(self._cpu.reconstruct_batch(cand), dtype=np.float32) @ query[0]
        order = np.argsort(-exact, kind="stable")[:limit]
        return exact[order][None, :], cand[order][None, :]

    def _search_params(self, faiss: Any, selector: Any) -> Any:
        kwargs = {} if selector is None else {"sel": selector}
        inner = faiss.downcast_index(self._cpu.index)
        if isinstance(inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(nprobe=self._nprobe, **kwargs)
        if isinstance(inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(efSearch=self._ef_search, **kwargs)
        return faiss.SearchParameters(**kwargs)

    def _searcher(self, faiss: Any) -> Any:
        if not self._use_gpu:
            return self._cpu
        with self._gpu_lock:
            if self._gpu is None:
                if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
                    self._gpu = faiss.index_cpu_to_all_gpus(self._cpu)
                else:
                    log.info("use_gpu is set but FAISS sees no GPU; searching on the CPU")
                    self._use_gpu = False  # log once, then stay on the CPU
                    return self._cpu
            return self._gpu

    def search(
        self, vector: FloatArray, k: int, allowed_ids: IntArray | None = None, *, nprobe: int | None = None
    ) -> tuple[IntArray, FloatArray]:
        """The ``k`` nearest chunks by inner product.

        Args:
            vector: Query vector of shape ``(dimension,)`` (or ``(1, dimension)``).
            k: Maximum number of results; ``k <= 0`` returns nothing.
            allowed_ids: If given, only these chunk ids may be returned (FAISS
                ``IDSelectorBatch``; always searched on the CPU index).
            nprobe: IVF lists to probe for this search (default: the index's ``nprobe``).

        Returns:
            ``(ids, scores)`` best first, at most ``min(k, len(self))`` entries.

        Raises:
            ValueError: If the vector has the wrong dimension.
        """
        faiss = _faiss()
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self._dimension:
            raise ValueError(f"query has dimension {query.shape[1]}, index has {self._dimension}")
        limit = min(k, len(self))
        allowed = None
        if allowed_ids is not None:
            allowed = np.ascontiguousarray(allowed_ids, dtype=np.int64).reshape(-1)
            limit = min(limit, allowed.size)
        if limit <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        # On a GPU the exact index is fast enough: the accelerator is for CPU searches.
        accelerate = self._accel is not None and not self._use_gpu
        if accelerate and (allowed is None or allowed.size > _EXACT_FILTER_SHARE * len(self)):
            scores, ids = self._accelerated_search(query, limit, allowed, nprobe)
        elif allowed is None:
            searcher = self._searcher(faiss)
            if searcher is self._cpu:
                # Params even without a filter: they carry nprobe/efSearch for IVF/HNSW.
                scores, ids = searcher.search(query, limit, params=self._search_params(faiss, None))
            else:
                scores, ids = searcher.search(query, limit)
        else:
            # ``selector`` must stay referenced until search returns (SWIG keeps no ref).
            selector = faiss.IDSelectorBatch(allowed)
            scores, ids = self._cpu.search(query, limit, params=self._search_params(faiss, selector))
        ids_row = ids[0]
        keep = ids_row >= 0  # FAISS pads with -1 when fewer results exist
        return ids_row[keep].astype(np.int64, copy=False), scores[0][keep].astype(np.float32, copy=False)

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def accelerator_path(path: str | os.PathLike[str]) -> str:
        """Where :meth:`save` writes the accelerator of an index saved at ``path``."""
        base = os.fspath(path)
        return (base[: -len(".faiss")] if base.endswith(".faiss") else base) + ".accel.faiss"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the (CPU) index with ``faiss.write_index`` and fsync it; the accelerator, if
        any, goes beside it (:meth:`accelerator_path`), so loading never retrains."""
        faiss = _faiss()
        targets = [(self._cpu, os.fspath(path))]
        if self._accel is not None:
            targets.append((self._accel, self.accelerator_path(path)))
        for index, target in targets:
            faiss.write_index(index, target)
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        factory: str = "Flat",
        use_gpu: bool = False,
        nprobe: int = DEFAULT_NPROBE,
        ef_search: int = 64,
        accelerator: AcceleratorKind | None = "sq16",
        accelerate_from: int = DEFAULT_ACCELERATE_FROM,
        rerank_factor: int = DEFAULT_RERANK_FACTOR,
    ) -> DenseIndex:
        """Read an index written by :meth:`save` (with its accelerator, when one was saved).

        An index saved without the accelerator it now needs (an older version, another
        configuration) is accelerated here, once.

        Args:
            path: The file.
            factory: The factory string it was built with (informational; from the manifest).
            use_gpu: As in the constructor.
            nprobe: As in the constructor.
            ef_search: As in the constructor.
            accelerator: As in the constructor.
            accelerate_from: As in the constructor.
            rerank_factor: As in the constructor.

        Raises:
            ValueError: If the file does not hold an ``IndexIDMap2``, or the accelerator
                disagrees with it.
            RuntimeError: If FAISS cannot read it.
        """
        faiss = _faiss()
        index = faiss.read_index(os.fspath(path))
        config = _AccelConfig(accelerator, accelerate_from, rerank_factor)
        self = cls._wrap(index, factory=factory, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search, accel=config)
        accel_path = cls.accelerator_path(path)
        if self._config.kind is not None and len(self) >= accelerate_from and Path(accel_path).exists():
            accel = faiss.read_index(accel_path)
            if int(accel.ntotal) != len(self) or int(accel.d) != self._dimension:
                raise ValueError(f"{accel_path}: accelerator holds {accel.ntotal} vectors, the index {len(self)}")
            self._accel, self._accel_trained_on = accel, len(self)
            self._accel_kind = "ivf" if isinstance(faiss.downcast_index(accel), faiss.IndexIVF) else "sq16"
        self.maintain()  # builds what is missing, or replaces an accelerator of another kind
        return self


@dataclass(frozen=True, slots=True)
class _AccelConfig:
    kind: AcceleratorKind | None
    accelerate_from: int
    rerank_factor: int
