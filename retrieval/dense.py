"""Dense (vector) index over chunk ids, backed by FAISS.

The index is ``IndexIDMap2`` around an inner index built from a FAISS factory string
(``"Flat"`` by default: exact inner-product search, which on L2-normalized embeddings is
cosine similarity). ``IDMap2`` keys vectors by int64 chunk id and supports removal and
``reconstruct(id)``; the inner index can be swapped for ``"IVF1024,Flat"`` or
``"HNSW32,Flat"`` when collections grow (note: HNSW cannot remove vectors, so it only
suits collections that are rebuilt rather than updated).

Scores are inner products: higher is better, as the fusion code assumes.

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
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    FloatArray = npt.NDArray[np.float32]

__all__ = ["DenseIndex"]

log = logging.getLogger(__name__)


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
        nprobe: IVF lists probed per query (IVF inner indexes only).
        ef_search: HNSW search breadth (HNSW inner indexes only).
    """

    def __init__(
        self,
        dimension: int,
        *,
        factory: str = "Flat",
        use_gpu: bool = False,
        nprobe: int = 16,
        ef_search: int = 64,
    ) -> None:
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        faiss = _faiss()
        self._dimension = dimension
        self._factory = factory
        self._nprobe = nprobe
        self._ef_search = ef_search
        self._use_gpu = use_gpu
        self._cpu: Any = faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        self._gpu: Any = None
        self._gpu_lock = threading.Lock()

    @classmethod
    def _wrap(cls, index: Any, *, factory: str, use_gpu: bool, nprobe: int, ef_search: int) -> DenseIndex:
        faiss = _faiss()
        if not isinstance(index, faiss.IndexIDMap2):
            raise ValueError(f"expected an IndexIDMap2, got {type(index).__name__}")
        self = cls.__new__(cls)
        self._dimension = int(index.d)
        self._factory = factory
        self._nprobe = nprobe
        self._ef_search = ef_search
        self._use_gpu = use_gpu
        self._cpu = index
        self._gpu = None
        self._gpu_lock = threading.Lock()
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
        self._gpu = None  # the GPU copy is stale; re-cloned on the next search

    def remove(self, ids: IntArray | list[int]) -> int:
        """Remove chunk ids; absent ids are ignored.

        Returns:
            The number of vectors removed.
        """
        id_arr = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if id_arr.size == 0 or len(self) == 0:
            return 0
        removed = int(self._cpu.remove_ids(_faiss().IDSelectorBatch(id_arr)))
        if removed:
            self._gpu = None
        return removed

    def copy(self) -> DenseIndex:
        """An independent deep copy (same factory and search settings, CPU only until searched)."""
        clone = _faiss().clone_index(self._cpu)
        return DenseIndex._wrap(
            clone,
            factory=self._factory,
            use_gpu=self._use_gpu,
            nprobe=self._nprobe,
            ef_search=self._ef_search,
        )

    # ------------------------------------------------------------------ search

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

    def search(self, vector: FloatArray, k: int, allowed_ids: IntArray | None = None) -> tuple[IntArray, FloatArray]:
        """The ``k`` nearest chunks by inner product.

        Args:
            vector: Query vector of shape ``(dimension,)`` (or ``(1, dimension)``).
            k: Maximum number of results; ``k <= 0`` returns nothing.
            allowed_ids: If given, only these chunk ids may be returned (FAISS
                ``IDSelectorBatch``; always searched on the CPU index).

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
        if allowed is None:
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

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the (CPU) index with ``faiss.write_index`` and fsync the file."""
        _faiss().write_index(self._cpu, os.fspath(path))
        fd = os.open(path, os.O_RDONLY)
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
        nprobe: int = 16,
        ef_search: int = 64,
    ) -> DenseIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: The file.
            factory: The factory string it was built with (informational; from the manifest).
            use_gpu: As in the constructor.
            nprobe: As in the constructor.
            ef_search: As in the constructor.

        Raises:
            ValueError: If the file does not hold an ``IndexIDMap2``.
            RuntimeError: If FAISS cannot read it.
        """
        index = _faiss().read_index(os.fspath(path))
        return cls._wrap(index, factory=factory, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search)
