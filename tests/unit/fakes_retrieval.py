"""Test doubles for the retrieval package: a deterministic hash embedder and chunk builders."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from retrieval.types import Chunk

_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Feature-hashing bag-of-words embedder: deterministic, instant, and similarity-preserving.

    Texts sharing words get similar vectors, so dense rankings in tests are meaningful. Uses
    blake2b (not ``hash``, which is salted per process) so vectors are stable across runs.
    Records calls (and their threads) so tests can assert "one query embedding per request".
    """

    def __init__(self, dimension: int = 64, model_id: str = "fake-hash") -> None:
        self._dimension = dimension
        self._model_id = model_id
        self.query_calls: list[str] = []
        self.query_threads: list[int] = []
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dimension(self) -> int:
        return self._dimension

    def _vector(self, text: str) -> npt.NDArray[np.float32]:
        vec = np.zeros(self._dimension, dtype=np.float32)
        for word in _WORD.findall(text.lower()):
            digest = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            vec[digest % self._dimension] += 1.0 if (digest >> 32) & 1 else -1.0
        norm = float(np.linalg.norm(vec))
        if norm == 0.0:
            vec[0] = 1.0
            return vec
        return vec / norm

    def embed_documents(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        return np.stack([self._vector(t) for t in texts]).astype(np.float32)

    def embed_query(self, text: str) -> npt.NDArray[np.float32]:
        with self._lock:
            self.query_calls.append(text)
            self.query_threads.append(threading.get_ident())
        return self._vector(text)

    def count_tokens(self, text: str) -> int:
        return len(_WORD.findall(text))


def make_chunk(
    chunk_id: int,
    text: str,
    *,
    collection: str = "docs",
    path: str | None = None,
    document_id: int | None = None,
    metadata: dict[str, str] | None = None,
) -> Chunk:
    """A chunk with plausible defaults (one document per chunk unless told otherwise)."""
    return Chunk(
        id=chunk_id,
        document_id=document_id if document_id is not None else chunk_id,
        collection=collection,
        path=path if path is not None else f"{collection}/doc{chunk_id}.md",
        ordinal=0,
        text=text,
        start=0,
        end=len(text),
        metadata=metadata or {},
    )


CORPUS: dict[int, str] = {
    1: "How do I join paths in Python? Use os.path.join to combine path components.",
    2: "The fs.readFile function reads a whole file asynchronously in Node.js.",
    3: "Use git rebase --interactive to squash commits before pushing a branch.",
    4: "In R, use the apply family of functions instead of explicit for loops.",
    5: "Debian packages are installed with apt-get install or with the apt command.",
    6: "Python lists are mutable sequences; tuples are immutable sequences.",
    7: "To read a file line by line in Python, iterate over the file object.",
    8: "Node.js streams process data piece by piece instead of reading it all at once.",
}
