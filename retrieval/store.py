"""Versioned, atomically published index snapshots, one series per collection.

Layout under ``root``::

    root/
      .locks/<collection>.lock          flock target of publishers (never deleted)
      <collection>/
        CURRENT                         names the live version; replaced with os.replace
        versions/<version>/
          manifest.json                 model id, dimension, counts, tokenizer, BM25 params,
                                        the index recipe (``retrieval.recipe``; absent: unknown)
          dense.faiss                   faiss.write_index of the IDMap2 index
          dense.accel.faiss             its accelerator (large collections only)
          sparse.npz                    BM25 postings (numpy, no pickle; format-1 versions
                                        have sparse.jsonl, BM25 tokens per chunk)
          chunks.jsonl                  Chunk payloads (JSON lines)

Publishing (any process) takes ``flock`` on the collection's lock file, builds the next
version from the current one plus a delta, writes it into a temporary directory, fsyncs
every file and the directory, renames it into ``versions/``, and only then points
``CURRENT`` at it (write ``CURRENT.tmp``, fsync, ``os.replace``, fsync the directory). A
reader therefore sees either the old or the new version, never a mix, and a crash leaves
the previous version live. The last ``keep_versions`` versions are kept so that a reader
of another process that has just read ``CURRENT`` can still open its version; a reader
that loses that race anyway retries with the newer ``CURRENT``.

Readers never lock. :meth:`IndexStore.load` re-reads ``CURRENT`` (one small file read)
and reloads only when it names another version; loaded :class:`Snapshot` objects live
entirely in memory and stay usable after newer versions are published or old ones
deleted. While one thread reloads a collection, other threads keep getting the previous
snapshot instead of queueing behind the reload.

Errors (see :mod:`retrieval.types`): :class:`~retrieval.types.IndexMismatchError` when a
stored index was built with another embedding model or dimension;
:class:`~retrieval.types.IndexCorruptError` when a version's files are unreadable or
disagree; :class:`ValueError` for invalid arguments (collection names, shapes).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.dense import DEFAULT_ACCELERATE_FROM, DEFAULT_NPROBE, AcceleratorKind, DenseIndex
from retrieval.leads import DocumentLeads
from retrieval.recipe import IndexRecipe, recipe_from_json
from retrieval.sparse import BM25Params, SparseIndex
from retrieval.tokenize import Tokenizer, TokenizerOptions
from retrieval.types import (
    Chunk,
    IndexCorruptError,
    IndexMismatchError,
    UnknownCollectionError,
    validate_collection_name,
)

if TYPE_CHECKING:
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    FloatMatrix = npt.NDArray[np.float32]

__all__ = ["IndexStore", "Manifest", "Snapshot"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_VERSION = re.compile(r"(\d{8})-[0-9a-f]{8}")
_LOAD_RETRIES = 3


def _is_collection_name(name: str) -> bool:
    try:
        validate_collection_name(name)
    except ValueError:
        return False
    return True


def _version_seq(version: str) -> int:
    m = _VERSION.fullmatch(version)
    return int(m.group(1)) if m else -1


# ---------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class Manifest:
    """Description of one snapshot version (``manifest.json``)."""

    version: str
    collection: str
    model_id: str
    dimension: int
    chunk_count: int
    created_at: str
    """ISO-8601 UTC timestamp of publication."""
    tokenizer: TokenizerOptions = field(default_factory=TokenizerOptions)
    bm25: BM25Params = field(default_factory=BM25Params)
    dense_factory: str = "Flat"
    format: int = FORMAT_VERSION
    recipe: IndexRecipe | None = None
    """How the chunks were cut and embedded; ``None``: unknown (a version written before recipes
    were recorded, or published without one)."""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``recipe`` is left out when unknown)."""
        data = asdict(self)
        data["tokenizer"] = self.tokenizer.to_dict()
        data["bm25"] = asdict(self.bm25)
        if self.recipe is None:
            del data["recipe"]
        else:
            data["recipe"] = self.recipe.to_json()
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse :meth:`to_json` output.

        Raises:
            IndexCorruptError: If fields are missing, mistyped, or the format is unknown.
        """
        try:
            if data.get("format") != FORMAT_VERSION:
                raise IndexCorruptError(f"unsupported index format {data.get('format')!r}")
            return cls(
                version=str(data["version"]),
                collection=str(data["collection"]),
                model_id=str(data["model_id"]),
                dimension=int(data["dimension"]),
                chunk_count=int(data["chunk_count"]),
                created_at=str(data["created_at"]),
                tokenizer=TokenizerOptions.from_dict(data["tokenizer"]),
                bm25=BM25Params(**data["bm25"]),
                dense_factory=str(data["dense_factory"]),
                # Older manifests have none, and an unreadable one must not make the index unusable.
                recipe=recipe_from_json(data.get("recipe")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCorruptError(f"malformed manifest: {e}") from e


# ---------------------------------------------------------------------- snapshot


class Snapshot:
    """One immutable, fully loaded version of a collection's index.

    Safe to share between threads and to keep using after newer versions are published.

    Attributes:
        collection: The collection name.
        version: The version name (``<8-digit sequence>-<random hex>``).
        manifest: The version's manifest.
        ids: All chunk ids, sorted ascending (read-only int64 array).
        dense: The FAISS index (never mutated once published).
        sparse: The BM25 index.
        chunks: ``chunk_id -> Chunk`` (read-only mapping).
    """

    __slots__ = (
        "_by_path",
        "_leads",
        "_leads_lock",
        "_paths",
        "chunks",
        "collection",
        "dense",
        "ids",
        "manifest",
        "sparse",
        "version",
    )

    def __init__(
        self,
        *,
        manifest: Manifest,
        dense: DenseIndex,
        sparse: SparseIndex,
        chunks: Mapping[int, Chunk],
    ) -> None:
        self.collection = manifest.collection
        self.version = manifest.version
        self.manifest = manifest
        self.dense = dense
        self.sparse = sparse
        self.chunks: Mapping[int, Chunk] = MappingProxyType(dict(chunks))
        ids = np.fromiter(self.chunks.keys(), dtype=np.int64, count=len(self.chunks))
        ids.sort()
        ids.setflags(write=False)
        self.ids: IntArray = ids
        # Chunks sorted by path, for O(log n) path-prefix filters.
        by_path = sorted(self.chunks.values(), key=lambda c: (c.path, c.id))
        self._paths = [c.path for c in by_path]
        self._by_path: IntArray = np.array([c.id for c in by_path], dtype=np.int64)
        self._leads: DocumentLeads | None = None
        self._leads_lock = threading.Lock()

    def leads(self) -> DocumentLeads:
        """Each document's lead chunk and its vector (built on first use, then kept)."""
        if self._leads is None:
            with self._leads_lock:
                if self._leads is None:
                    self._leads = DocumentLeads(self.chunks.values(), self.dense)
        return self._leads

    def __len__(self) -> int:
        return int(self.ids.size)

    def __repr__(self) -> str:
        return f"Snapshot(collection={self.collection!r}, version={self.version!r}, chunks={len(self)})"

    def ids_with_path_prefix(self, prefix: str) -> IntArray:
        """Sorted ids of the chunks whose ``path`` starts with ``prefix`` (plain string prefix)."""
        lo = bisect.bisect_left(self._paths, prefix)
        # Every string with this prefix sorts below prefix + the largest code point.
        hi = bisect.bisect_left(self._paths, prefix + "\U0010ffff", lo)
        return np.sort(self._by_path[lo:hi])

    def check(self) -> None:
        """Verify that manifest, dense ids, sparse ids and chunks agree.

        Raises:
            IndexCorruptError: On any disagreement.
        """
        where = f"collection {self.collection!r} version {self.version}"
        if self.manifest.chunk_count != len(self):
            raise IndexCorruptError(f"{where}: manifest says {self.manifest.chunk_count} chunks, found {len(self)}")
        if self.dense.dimension != self.manifest.dimension:
            raise IndexCorruptError(
                f"{where}: dense index has dimension {self.dense.dimension}, manifest says {self.manifest.dimension}"
            )
        if not np.array_equal(self.dense.ids(), self.ids):
            raise IndexCorruptError(f"{where}: dense index ids differ from the chunk ids")
        if not np.array_equal(self.sparse.ids, self.ids):
            raise IndexCorruptError(f"{where}: sparse index ids differ from the chunk ids")


# ---------------------------------------------------------------------- file helpers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------- store


class IndexStore:
    """Publishes and loads :class:`Snapshot` versions under ``root``.

    One instance per process is enough; it is thread-safe. Several processes may use the
    same root (the ingest worker publishes, the API loads): publishers serialize on a
    per-collection ``flock``, readers take no locks.

    Args:
        root: Directory of all collections (created on first publish).
        model_id: Embedding model id every index must have been built with.
        dimension: Its vector dimension.
        tokenizer: BM25 tokenizer options for new versions. Existing versions keep the
            options in their manifest for querying; the next publish re-tokenizes the
            collection from its stored chunk texts if the options changed.
        bm25: BM25 parameters for new versions.
        dense_factory: FAISS factory string of the inner dense index.
        use_gpu: Search dense indexes on the GPU when FAISS sees one.
        keep_versions: Versions kept on disk per collection (at least 2, see module doc).
        accelerator: Dense accelerator kind of large collections (``"sq16"``, ``"ivf"``; see
            :mod:`retrieval.dense`); ``None``: always exact.
        accelerate_from: Collections with at least this many chunks use it.
        nprobe: IVF lists probed per query (``"ivf"``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        model_id: str,
        dimension: int,
        tokenizer: TokenizerOptions | None = None,
        bm25: BM25Params | None = None,
        dense_factory: str = "Flat",
        use_gpu: bool = False,
        keep_versions: int = 2,
        accelerator: AcceleratorKind | None = "sq16",
        accelerate_from: int = DEFAULT_ACCELERATE_FROM,
        nprobe: int = DEFAULT_NPROBE,
    ) -> None:
        if dimension <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        if keep_versions < 2:
            raise ValueError("keep_versions must be at least 2 (readers of other processes need the previous)")
        self._root = Path(root)
        self._model_id = model_id
        self._dimension = dimension
        self._tokenizer_options = tokenizer or TokenizerOptions()
        self._bm25 = bm25 or BM25Params()
        self._dense_factory = dense_factory
        self._use_gpu = use_gpu
        self._keep = keep_versions
        self._dense_options: dict[str, Any] = {
            "accelerator": accelerator,
            "accelerate_from": accelerate_from,
            "nprobe": nprobe,
        }
        self._cache: dict[str, Snapshot] = {}
        self._unreadable: set[str] = set()
        self._load_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    transactional = False
    """Snapshots are published after the chunk rows commit, by reconciling (``ingest.indexer``)."""

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return self._root

    @property
    def model_id(self) -> str:
        """The embedding model id indexes must match."""
        return self._model_id

    @property
    def dimension(self) -> int:
        """The embedding dimension indexes must match."""
        return self._dimension

    @property
    def tokenizer_options(self) -> TokenizerOptions:
        """Tokenizer options used for new versions."""
        return self._tokenizer_options

    # ------------------------------------------------------------------ paths

    def _dir(self, collection: str) -> Path:
        return self._root / validate_collection_name(collection)

    def _read_current(self, collection: str) -> str | None:
        try:
            version = (self._dir(collection) / "CURRENT").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        if _version_seq(version) < 0:
            raise IndexCorruptError(f"collection {collection!r}: CURRENT names an invalid version {version!r}")
        return version

    @contextlib.contextmanager
    def _publish_lock(self, collection: str) -> Iterator[None]:
        # Lock files live outside the collection directory so drop() can delete the
        # directory without invalidating a lock another publisher is waiting on.
        lock_dir = self._root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{validate_collection_name(collection)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock conflicts between separate open()s even within one process, so this
            # serializes threads as well as processes.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ------------------------------------------------------------------ reading

    def collections(self) -> list[str]:
        """Names of the collections that have a published version, sorted."""
        if not self._root.is_dir():
            return []
        return sorted(d.name for d in self._root.iterdir() if _is_collection_name(d.name) and (d / "CURRENT").is_file())

    def _check_compatible(self, manifest: Manifest) -> None:
        if manifest.model_id != self._model_id or manifest.dimension != self._dimension:
            raise IndexMismatchError(
                f"collection {manifest.collection!r} (index version {manifest.version}) was built with "
                f"embedding model {manifest.model_id!r} ({manifest.dimension} dimensions), but the "
                f"service is configured with {self._model_id!r} ({self._dimension} dimensions). "
                "Re-ingest the collection or rebuild its index with the configured model from its stored "
                f"texts: `rag reindex -c {manifest.collection}` (or configure the original model again)."
            )

    def _read_manifest(self, vdir: Path) -> Manifest:
        try:
            data = json.loads((vdir / "manifest.json").read_text(encoding="utf-8"))
        except ValueError as e:  # not JSON, or not UTF-8 at all
            raise IndexCorruptError(f"{vdir}: unreadable manifest: {e}") from e
        return Manifest.from_json(data)

    def _read_snapshot(self, collection: str, version: str) -> Snapshot:
        vdir = self._dir(collection) / "versions" / version
        manifest = self._read_manifest(vdir)
        if manifest.version != version or manifest.collection != collection:
            raise IndexCorruptError(
                f"{vdir}: manifest names {manifest.collection!r}/{manifest.version}, not {collection!r}/{version}"
            )
        # Before reading the heavy files: a wrong model is the user's problem to fix, not corruption.
        self._check_compatible(manifest)
        try:
            dense = DenseIndex.load(
                vdir / "dense.faiss",
                factory=manifest.dense_factory,
                use_gpu=self._use_gpu,
                **self._dense_options,
            )
        except (RuntimeError, ValueError) as e:
            if not (vdir / "dense.faiss").exists():
                raise FileNotFoundError(vdir / "dense.faiss") from e
            raise IndexCorruptError(f"{vdir}: unreadable dense index: {e}") from e
        sparse_path = vdir / "sparse.npz"
        if not sparse_path.exists() and (vdir / "sparse.jsonl").exists():
            sparse_path = vdir / "sparse.jsonl"  # written before the postings format
        try:
            sparse = SparseIndex.load(sparse_path)
        except FileNotFoundError:
            raise
        except Exception as e:  # a truncated or garbled file fails in numpy/zipfile in many ways
            raise IndexCorruptError(f"{vdir}: unreadable sparse index: {e}") from e
        if sparse.tokenizer.options != manifest.tokenizer or sparse.params != manifest.bm25:
            raise IndexCorruptError(f"{vdir}: sparse index options differ from the manifest")
        chunks: dict[int, Chunk] = {}
        try:
            with (vdir / "chunks.jsonl").open(encoding="utf-8") as f:
                for line in f:
                    chunk = Chunk.from_dict(json.loads(line))
                    chunks[chunk.id] = chunk
        except (ValueError, KeyError, TypeError) as e:
            raise IndexCorruptError(f"{vdir}: unreadable chunks: {e}") from e
        snapshot = Snapshot(manifest=manifest, dense=dense, sparse=sparse, chunks=chunks)
        snapshot.check()
        return snapshot

    def _load_version(self, collection: str, version: str) -> Snapshot:
        """The snapshot of exactly ``version`` (cached), following CURRENT if it vanishes."""
        for _ in range(_LOAD_RETRIES):
            cached = self._cache.get(collection)
            if cached is not None and cached.version == version:
                return cached
            try:
                snapshot = self._read_snapshot(collection, version)
            except FileNotFoundError as e:
                # Garbage-collected between reading CURRENT and opening the files: two or
                # more publishes happened meanwhile. Follow CURRENT again.
                newer = self._read_current(collection)
                if newer is None:
                    raise UnknownCollectionError(f"collection {collection!r} was dropped while loading") from e
                if newer == version:
                    raise IndexCorruptError(
                        f"collection {collection!r}: CURRENT names version {version}, whose files are missing: {e}"
                    ) from e
                version = newer
                continue
            with self._guard:
                current = self._cache.get(collection)
                # Never move the cache backwards (a slow reload racing a publish).
                if current is None or _version_seq(current.version) <= _version_seq(snapshot.version):
                    self._cache[collection] = snapshot
            return snapshot
        raise IndexCorruptError(f"collection {collection!r}: versions keep disappearing while loading")

    def load(self, collection: str) -> Snapshot | None:
        """The collection's current snapshot, or ``None`` if it has never been published.

        Cheap when nothing changed (one read of ``CURRENT``). When another version is
        live, it is loaded once; meanwhile other threads get the previous snapshot.

        Raises:
            IndexMismatchError: If the live version was built with another embedding model
                or dimension than this store is configured with.
            IndexCorruptError: If the live version is unreadable.
            ValueError: If the collection name is invalid.
        """
        version = self._read_current(collection)
        if version is None:
            with self._guard:
                self._cache.pop(collection, None)
            return None
        cached = self._cache.get(collection)
        if cached is not None and cached.version == version:
            return cached
        with self._guard:
            lock = self._load_locks.setdefault(collection, threading.Lock())
        if not lock.acquire(blocking=cached is None):
            return cached  # another thread is loading the new version: serve the old one
        try:
            snapshot = self._load_version(collection, version)
        except UnknownCollectionError:
            return None  # dropped while we were loading it
        except IndexCorruptError:
            with self._guard:
                self._unreadable.add(collection)
            raise
        finally:
            lock.release()
        if collection in self._unreadable:
            with self._guard:
                self._unreadable.discard(collection)
        return snapshot

    def check(self, collection: str) -> None:
        """A cheap on-disk check of the live version, bypassing the in-memory cache.

        Reads ``CURRENT`` and the manifest, checks that every part exists and is not empty, that
        the postings archive's directory is readable and that the last chunk line parses. It does
        not load the indexes (that is :meth:`load`); it catches what disks and operators do to
        files: truncation, garbage, deletion.

        Raises:
            IndexCorruptError: The live version is damaged.
        """
        version = self._read_current(collection)
        if version is None:
            return
        vdir = self._dir(collection) / "versions" / version
        try:
            manifest = self._read_manifest(vdir)
            if manifest.version != version or manifest.collection != collection:
                raise IndexCorruptError(f"{vdir}: the manifest describes another version")
            parts = [vdir / "dense.faiss", vdir / "chunks.jsonl"]
            sparse = vdir / "sparse.npz"
            if sparse.exists():
                with zipfile.ZipFile(sparse) as archive:
                    archive.namelist()
            elif not (vdir / "sparse.jsonl").exists():
                parts.append(sparse)
            for part in parts:
                if part.stat().st_size == 0 and manifest.chunk_count:
                    raise IndexCorruptError(f"{part} is empty")
            if manifest.chunk_count:
                with (vdir / "chunks.jsonl").open("rb") as f:
                    f.seek(max(0, (vdir / "chunks.jsonl").stat().st_size - 65536))
                    Chunk.from_dict(json.loads(f.read().splitlines()[-1]))
        except IndexCorruptError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as e:
            raise IndexCorruptError(f"{vdir}: {type(e).__name__}: {e}") from e

    def unreadable(self) -> frozenset[str]:
        """Collections whose live version failed to load the last time it was tried (until one loads)."""
        with self._guard:
            return frozenset(self._unreadable)

    # ------------------------------------------------------------------ writing

    def publish(
        self,
        collection: str,
        *,
        add: Sequence[Chunk] = (),
        vectors: FloatMatrix | None = None,
        remove: Iterable[int] = (),
        from_scratch: bool = False,
        recipe: IndexRecipe | None = None,
    ) -> Snapshot:
        """Publish a new version: the current one, minus ``remove``, plus ``add``.

        Adding an id that already exists replaces that chunk (text, vector and tokens).
        Removing an absent id is a no-op; a publish that would change nothing returns the
        current snapshot without writing a version. Safe against concurrent publishers in any
        process (per-collection ``flock``). The new snapshot is cached, so a following
        :meth:`load` in this process costs nothing.

        Args:
            collection: Collection name (created if new).
            add: Chunks to insert or replace; each ``chunk.collection`` must equal
                ``collection`` and ids must be unique.
            vectors: ``(len(add), dimension)`` float32 embeddings of ``add``, same order
                (may be ``None`` when ``add`` is empty).
            remove: Chunk ids to delete.
            from_scratch: Ignore the current version (e.g. a rebuild with a new embedding
                model): the new version holds exactly ``add``.
            recipe: The recipe the collection's chunks were made with, recorded in the new
                manifest; ``None`` keeps the current version's (unknown for a new collection).
                The caller vouches for it: the store cannot tell how chunks were cut.

        Returns:
            The new snapshot.

        Raises:
            ValueError: On invalid names, shapes, duplicate ids or foreign chunks.
            IndexMismatchError: If the current version has another model/dimension (use
                ``from_scratch=True`` to replace it).
            IndexCorruptError: If the current version is unreadable (use ``from_scratch``).
        """
        validate_collection_name(collection)
        new_ids = np.array([c.id for c in add], dtype=np.int64)
        if np.unique(new_ids).size != new_ids.size:
            raise ValueError("duplicate chunk ids in add")
        foreign = [c.id for c in add if c.collection != collection]
        if foreign:
            raise ValueError(f"chunks {foreign[:10]} belong to another collection than {collection!r}")
        if vectors is None:
            if add:
                raise ValueError("vectors are required when adding chunks")
            vecs = np.zeros((0, self._dimension), dtype=np.float32)
        else:
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.shape != (len(add), self._dimension):
            raise ValueError(f"expected vectors of shape ({len(add)}, {self._dimension}), got {vecs.shape}")
        remove_ids = {int(i) for i in remove}

        with self._publish_lock(collection):
            current_version = self._read_current(collection)
            current: Snapshot | None = None
            if current_version is not None and not from_scratch:
                current = self._load_version(collection, current_version)
                if recipe is None:
                    recipe = current.manifest.recipe
                if (
                    not add
                    and not remove_ids.intersection(current.chunks)
                    and current.manifest.tokenizer == self._tokenizer_options
                    and current.manifest.bm25 == self._bm25
                    and current.manifest.recipe == recipe
                ):
                    return current  # nothing would change: no new version
            snapshot = self._build(collection, current, add, new_ids, vecs, remove_ids, recipe)
            self._write(collection, snapshot)
            with self._guard:
                self._cache[collection] = snapshot
            self._collect_garbage(collection)
        log.info(
            "published collection=%s version=%s chunks=%d added=%d removed=%d",
            collection,
            snapshot.version,
            len(snapshot),
            len(add),
            len(remove_ids),
        )
        return snapshot

    def _next_version(self, collection: str, current: str | None) -> str:
        seq = 0
        vroot = self._dir(collection) / "versions"
        if vroot.is_dir():
            seq = max((_version_seq(d.name) for d in vroot.iterdir()), default=0)
        if current is not None:
            seq = max(seq, _version_seq(current))
        # The random suffix keeps names unique even after drop() restarts the sequence, so
        # a reader's cached version can never be confused with a new one of the same number.
        return f"{seq + 1:08d}-{secrets.token_hex(4)}"

    def _build(
        self,
        collection: str,
        current: Snapshot | None,
        add: Sequence[Chunk],
        new_ids: IntArray,
        vecs: FloatMatrix,
        remove_ids: set[int],
        recipe: IndexRecipe | None,
    ) -> Snapshot:
        tokenizer = Tokenizer(self._tokenizer_options)
        if current is None:
            dense = DenseIndex(
                self._dimension,
                factory=self._dense_factory,
                use_gpu=self._use_gpu,
                **self._dense_options,
            )
            sparse = SparseIndex([], [], tokenizer=tokenizer, params=self._bm25)
            chunks: dict[int, Chunk] = {}
        else:
            dense = current.dense.copy()  # copy-on-write: the published index stays intact
            chunks = dict(current.chunks)
            sparse = current.sparse
            if current.manifest.tokenizer != self._tokenizer_options or current.manifest.bm25 != self._bm25:
                log.info(
                    "re-tokenizing collection=%s: tokenizer or BM25 options changed since version %s",
                    collection,
                    current.version,
                )
                sparse = SparseIndex(
                    list(chunks),
                    [tokenizer(c.text) for c in chunks.values()],
                    tokenizer=tokenizer,
                    params=self._bm25,
                )
        # Replaced ids are removed first, then re-added with their new payloads.
        to_remove = (remove_ids | set(new_ids.tolist())) & chunks.keys()
        dense.remove(np.fromiter(to_remove, dtype=np.int64, count=len(to_remove)))
        dense.add(new_ids, vecs)
        if dense.maintain():
            log.info("collection=%s: dense searches go through %s", collection, dense.accelerator)
        sparse = sparse.with_changes(
            add=[(c.id, tokenizer(c.text)) for c in add], remove=to_remove, tokenizer=tokenizer
        )
        for chunk_id in to_remove:
            del chunks[chunk_id]
        for chunk in add:
            chunks[chunk.id] = chunk
        manifest = Manifest(
            version=self._next_version(collection, None if current is None else current.version),
            collection=collection,
            model_id=self._model_id,
            dimension=self._dimension,
            chunk_count=len(chunks),
            created_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            tokenizer=self._tokenizer_options,
            bm25=self._bm25,
            dense_factory=self._dense_factory,
            recipe=recipe,
        )
        snapshot = Snapshot(manifest=manifest, dense=dense, sparse=sparse, chunks=chunks)
        snapshot.check()
        return snapshot

    def _write(self, collection: str, snapshot: Snapshot) -> None:
        cdir = self._dir(collection)
        vroot = cdir / "versions"
        vroot.mkdir(parents=True, exist_ok=True)
        tmp = vroot / f".tmp-{snapshot.version}"
        tmp.mkdir()
        try:
            snapshot.dense.save(tmp / "dense.faiss")
            snapshot.sparse.save(tmp / "sparse.npz")
            _write_jsonl(tmp / "chunks.jsonl", (snapshot.chunks[i].to_dict() for i in snapshot.ids.tolist()))
            # The manifest goes last: a directory with a manifest is complete.
            _write_text(tmp / "manifest.json", json.dumps(snapshot.manifest.to_json(), indent=2) + "\n")
            _fsync_path(tmp)
            tmp.rename(vroot / snapshot.version)
            _fsync_path(vroot)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        current_tmp = cdir / "CURRENT.tmp"
        _write_text(current_tmp, snapshot.version + "\n")
        current_tmp.replace(cdir / "CURRENT")  # os.replace: the atomic switch
        _fsync_path(cdir)

    def _collect_garbage(self, collection: str) -> None:
        """Delete all but the newest ``keep_versions`` versions and leftovers of crashed publishes.

        Called with the publish lock held, so any ``.tmp-*`` directory is abandoned.
        """
        vroot = self._dir(collection) / "versions"
        versions: list[tuple[int, str]] = []
        for d in vroot.iterdir():
            if d.name.startswith(".tmp-"):
                shutil.rmtree(d, ignore_errors=True)
            elif _version_seq(d.name) >= 0:
                versions.append((_version_seq(d.name), d.name))
        versions.sort()
        for _, name in versions[: -self._keep]:
            shutil.rmtree(vroot / name, ignore_errors=True)

    def drop(self, collection: str) -> bool:
        """Delete a collection and all its versions.

        ``CURRENT`` is removed first, so readers see the collection vanish atomically;
        snapshots already loaded stay usable.

        Returns:
            ``True`` if the collection existed.
        """
        cdir = self._dir(collection)
        with self._publish_lock(collection):
            existed = (cdir / "CURRENT").exists()
            with contextlib.suppress(FileNotFoundError):
                (cdir / "CURRENT").unlink()
            if cdir.exists():
                _fsync_path(cdir)
                shutil.rmtree(cdir, ignore_errors=True)
            with self._guard:
                self._cache.pop(collection, None)
        if existed:
            log.info("dropped collection=%s", collection)
        return existed
