"""The recipe an index was built with: what decides its chunks and their vectors.

Two indexes whose recipes have the same :meth:`IndexRecipe.fingerprint` hold chunks cut and
embedded the same way, so their chunks may live side by side; two that differ must not be mixed
in one collection (a search would compare vectors of different models, or rank 240-token
passages against 120-token ones). The recipe is recorded in every snapshot manifest
(:class:`retrieval.store.Manifest`) and in the collection's database row; ``rag reindex``
rebuilds a collection whose recorded recipe differs from the configured one.

What is in it and what is not:

* the embedding model id and dimension (the vectors);
* the splitter's sizes: ``chunk_tokens``, ``overlap_tokens``, ``min_piece_tokens`` and the
  context budget ``context_tokens`` (the chunks, and what is embedded for each);
* :data:`retrieval.chunk_context.CONTEXT_VERSION` (how the context line is made) and
  :data:`RECIPE_VERSION` (bumped when the splitter's cutting rules change);
* not the BM25 tokenizer or parameters: the store re-tokenizes a collection from its stored
  chunk texts on the next publish when they change (no re-embedding needed), and the manifest
  records them on their own;
* not the document embedding backend (PyTorch fp32/bf16 or the int8 ONNX path): the same model
  on another numeric path gives vectors within its calibrated tolerance, and ``auto`` is decided
  by measuring the machine, so it would flag reindexes on a hardware change for no gain.

Pure values, no I/O; a leaf like the rest of :mod:`retrieval`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from retrieval.chunk_context import CONTEXT_VERSION

__all__ = ["RECIPE_VERSION", "IndexRecipe", "recipe_from_json", "reindex_needed"]

RECIPE_VERSION = 1
"""Bump when the splitter cuts differently for the same sizes (every index then needs a reindex)."""

_INT_FIELDS = ("dimension", "chunk_tokens", "overlap_tokens", "min_piece_tokens", "context_tokens")


@dataclass(frozen=True, slots=True)
class IndexRecipe:
    """How a collection's chunks were cut and embedded (see the module docstring)."""

    model_id: str
    dimension: int
    chunk_tokens: int
    overlap_tokens: int
    min_piece_tokens: int
    context_tokens: int
    context_version: int = CONTEXT_VERSION
    version: int = RECIPE_VERSION

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (manifests, the collections table, the API)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IndexRecipe:
        """Parse :meth:`to_json` output.

        Raises:
            ValueError: A field is missing or has the wrong type.
        """
        try:
            model_id = data["model_id"]
            if not isinstance(model_id, str) or not model_id:
                raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
            ints = {name: data[name] for name in (*_INT_FIELDS, "context_version", "version")}
        except KeyError as e:
            raise ValueError(f"index recipe without {e.args[0]!r}") from None
        for name, value in ints.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"index recipe field {name!r} must be an integer, got {value!r}")
        return cls(model_id=model_id, **ints)

    def fingerprint(self) -> str:
        """A stable short id of the recipe: 12 hex digits of the sha256 of its canonical JSON.

        Equal recipes have equal fingerprints in every process and Python version (sorted keys,
        no whitespace); any field change changes it.
        """
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]

    def describe(self) -> str:
        """One line for logs and tables: ``model 384d, 240/40 tokens (min 24, context 32) #fingerprint``."""
        return (
            f"{self.model_id} {self.dimension}d, {self.chunk_tokens}/{self.overlap_tokens} tokens "
            f"(min {self.min_piece_tokens}, context {self.context_tokens}) #{self.fingerprint()}"
        )

    def differences(self, other: IndexRecipe) -> list[str]:
        """``field: mine -> other`` for every field that differs (empty when equal)."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k}: {mine[k]!r} -> {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def recipe_from_json(data: object) -> IndexRecipe | None:
    """The recipe stored as ``data``, or ``None`` (unknown) when nothing or something unreadable is
    stored: indexes built before recipes were recorded read as "unknown recipe", never as an error."""
    if not isinstance(data, Mapping):
        return None
    try:
        return IndexRecipe.from_json(data)
    except ValueError:
        return None


def reindex_needed(recorded: IndexRecipe | None, configured: IndexRecipe, *, has_chunks: bool) -> bool:
    """Whether a collection must be reindexed to match ``configured``: it has chunks and their recipe
    differs or is unknown (an empty collection simply adopts the configured recipe)."""
    return has_chunks and recorded != configured
