"""BM25 (Okapi) over chunk ids, built with rank-bm25 and scored from an inverted index.

rank-bm25's ``BM25Okapi`` is the reference implementation (its idf with the epsilon
floor, its length normalization). It computes the corpus statistics here, but its
``get_scores`` walks every document's term dict in Python for every query term (22 ms a
query at 10.8k passages), so queries are scored from postings lists built once from
those statistics: the same float64 operations in the same order, so the scores are
*identical* to ``BM25Okapi.get_scores`` (``tests/unit/test_sparse.py`` holds the parity
test), at a cost proportional to the postings of the query terms only.

A :class:`SparseIndex` is immutable. rank-bm25 cannot update statistics incrementally,
so :meth:`SparseIndex.with_changes` builds a new index; it keeps the tokenized corpus so
rebuilds never re-tokenize. Persistence is JSON lines of tokens (no pickle).

Errors: :class:`~retrieval.types.IndexCorruptError` when a saved file is unreadable.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from retrieval.tokenize import Tokenizer, TokenizerOptions
from retrieval.types import IndexCorruptError

if TYPE_CHECKING:
    import numpy.typing as npt

    IntArray = npt.NDArray[np.int64]
    ScoreArray = npt.NDArray[np.float64]

__all__ = ["BM25Params", "SparseIndex"]

_FORMAT = "bm25-tokens/1"


@dataclass(frozen=True, slots=True)
class BM25Params:
    """``BM25Okapi`` parameters (rank-bm25's defaults); recorded in manifests."""

    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25


def _as_tuple(tokens: Sequence[str]) -> tuple[str, ...]:
    return tokens if isinstance(tokens, tuple) else tuple(tokens)


class SparseIndex:
    """An immutable BM25 index whose document keys are chunk ids.

    Thread-safe: nothing mutates after construction.

    Args:
        ids: Chunk ids, unique. Documents are kept sorted by id (order of ``ids`` is not
            significant).
        tokens: One token sequence per id (already tokenized with ``tokenizer``).
        tokenizer: Tokenizes query strings in :meth:`search`; must be the tokenizer the
            corpus was tokenized with. Default: ``Tokenizer()``.
        params: BM25 parameters.

    Raises:
        ValueError: If ``ids`` and ``tokens`` differ in length or ``ids`` repeat.
    """

    __slots__ = (
        "_doc_idx",
        "_idf",
        "_ids",
        "_indptr",
        "_norm",
        "_params",
        "_tf",
        "_tokenizer",
        "_tokens",
        "_vocab",
    )

    def __init__(
        self,
        ids: Sequence[int] | IntArray,
        tokens: Sequence[Sequence[str]],
        *,
        tokenizer: Tokenizer | None = None,
        params: BM25Params | None = None,
    ) -> None:
        if len(ids) != len(tokens):
            raise ValueError(f"{len(ids)} ids but {len(tokens)} token lists")
        id_array = np.asarray(ids, dtype=np.int64).reshape(-1)
        order = np.argsort(id_array, kind="stable")
        id_array = id_array[order]
        if id_array.size > 1 and bool(np.any(id_array[1:] == id_array[:-1])):
            raise ValueError("duplicate chunk ids in sparse index")
        self._ids: IntArray = id_array
        self._ids.setflags(write=False)
        # Tuples: immutable, and shared as-is by the next rebuild.
        self._tokens: tuple[tuple[str, ...], ...] = tuple(_as_tuple(tokens[i]) for i in order.tolist())
        self._tokenizer = tokenizer or Tokenizer()
        self._params = params or BM25Params()
        self._build()

    def _build(self) -> None:
        n = len(self._tokens)
        self._vocab: dict[str, int] = {}
        self._idf: ScoreArray = np.zeros(0, dtype=np.float64)
        self._indptr: IntArray = np.zeros(1, dtype=np.int64)
        self._doc_idx: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self._tf: ScoreArray = np.zeros(0, dtype=np.float64)
        self._norm: ScoreArray = np.zeros(n, dtype=np.float64)
        if n == 0 or not any(self._tokens):
            # rank-bm25 divides by the corpus size and by the vocabulary size: an empty
            # corpus has no statistics and no query term can match anything.
            return
        from rank_bm25 import BM25Okapi

        p = self._params
        bm25 = BM25Okapi(self._tokens, k1=p.k1, b=p.b, epsilon=p.epsilon)
        # Postings as CSR over terms, built from rank-bm25's own per-document counts.
        vocab = self._vocab
        term_ids: list[int] = []
        docs: list[int] = []
        tfs: list[int] = []
        for doc, freqs in enumerate(bm25.doc_freqs):
            for word, count in freqs.items():
                term = vocab.get(word)
                if term is None:
                    term = vocab[word] = len(vocab)
                term_ids.append(term)
                docs.append(doc)
                tfs.append(count)
        term_arr = np.asarray(term_ids, dtype=np.int64)
        order = np.argsort(term_arr, kind="stable")  # stable: doc order within a term
        self._doc_idx = np.asarray(docs, dtype=np.int32)[order]
        self._tf = np.asarray(tfs, dtype=np.float64)[order]
        self._indptr = np.concatenate(([0], np.cumsum(np.bincount(term_arr, minlength=len(vocab))))).astype(np.int64)
        idf = np.zeros(len(vocab), dtype=np.float64)
        for word, term in vocab.items():
            # rank-bm25 uses ``idf.get(q) or 0``; every corpus word has an idf.
            idf[term] = bm25.idf[word]
        self._idf = idf
        # Exactly rank-bm25's expression ``k1 * (1 - b + b * doc_len / avgdl)``, evaluated in
        # the same order, so per-term contributions are bit-identical to get_scores.
        doc_len = np.array(bm25.doc_len)
        self._norm = p.k1 * (1 - p.b + p.b * doc_len / bm25.avgdl)

    # ------------------------------------------------------------------ properties

    @property
    def ids(self) -> IntArray:
        """Chunk ids, sorted ascending (read-only array)."""
        return self._ids

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer applied to query strings."""
        return self._tokenizer

    @property
    def params(self) -> BM25Params:
        """The BM25 parameters."""
        return self._params

    def __len__(self) -> int:
        return int(self._ids.size)

    def tokens_of(self, chunk_id: int) -> tuple[str, ...]:
        """The stored tokens of one chunk.

        Raises:
            KeyError: If the id is not indexed.
        """
        pos = int(np.searchsorted(self._ids, chunk_id))
        if pos >= self._ids.size or int(self._ids[pos]) != chunk_id:
            raise KeyError(chunk_id)
        return self._tokens[pos]

    # ------------------------------------------------------------------ scoring

    def _accumulate(self, query_tokens: Sequence[str]) -> tuple[ScoreArray, npt.NDArray[np.bool_]]:
        scores = np.zeros(self._ids.size, dtype=np.float64)
        matched = np.zeros(self._ids.size, dtype=np.bool_)
        k1_plus_1 = self._params.k1 + 1
        # Query terms in order, repeats included, as rank-bm25 does: same summation order.
        for word in query_tokens:
            term = self._vocab.get(word)
            if term is None:
                continue
            lo, hi = int(self._indptr[term]), int(self._indptr[term + 1])
            docs = self._doc_idx[lo:hi]
            tf = self._tf[lo:hi]
            # Documents without the term get ``+ idf * 0.0`` in rank-bm25: a no-op.
            scores[docs] += self._idf[term] * (tf * k1_plus_1 / (tf + self._norm[docs]))
            matched[docs] = True
        return scores, matched

    def scores(self, query_tokens: Sequence[str]) -> ScoreArray:
        """BM25 score of every document, aligned with :attr:`ids`.

        Equal to ``BM25Okapi(corpus).get_scores(query_tokens)`` for the same corpus in
        the same (id-sorted) order.
        """
        return self._accumulate(query_tokens)[0]

    def allowed_mask(self, allowed_ids: IntArray) -> npt.NDArray[np.bool_]:
        """Boolean mask over :attr:`ids` that is true where the id is in ``allowed_ids``."""
        mask = np.zeros(self._ids.size, dtype=np.bool_)
        allowed = np.asarray(allowed_ids, dtype=np.int64).reshape(-1)
        if allowed.size and self._ids.size:
            pos = np.searchsorted(self._ids, allowed)
            pos_ok = pos < self._ids.size
            hit = pos[pos_ok][self._ids[pos[pos_ok]] == allowed[pos_ok]]
            mask[hit] = True
        return mask

    def search_tokens(
        self, query_tokens: Sequence[str], k: int, allowed_ids: IntArray | None = None
    ) -> tuple[IntArray, ScoreArray]:
        """Top-``k`` documents for already tokenized query terms.

        Only documents that contain at least one query term are candidates: a document
        with no term in common has no lexical evidence and must not occupy a BM25 rank.

        Args:
            query_tokens: Query terms (tokenized like the corpus).
            k: Maximum number of results; ``k <= 0`` returns nothing.
            allowed_ids: If given, only these chunk ids may be returned.

        Returns:
            ``(ids, scores)``, best first; ties are broken by ascending id.
        """
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        if k <= 0 or not self._vocab:
            return empty
        scores, matched = self._accumulate(query_tokens)
        if allowed_ids is not None:
            matched &= self.allowed_mask(allowed_ids)
        cand = np.flatnonzero(matched)
        if cand.size == 0:
            return empty
        if cand.size > k:
            # argpartition: O(n) selection of the k best before sorting only those.
            cand = cand[np.argpartition(-scores[cand], k - 1)[:k]]
        order = np.lexsort((self._ids[cand], -scores[cand]))
        cand = cand[order]
        return self._ids[cand].copy(), scores[cand]

    def search(self, query: str, k: int, allowed_ids: IntArray | None = None) -> tuple[IntArray, ScoreArray]:
        """Tokenize ``query`` with :attr:`tokenizer` and return :meth:`search_tokens`."""
        return self.search_tokens(self._tokenizer(query), k, allowed_ids)

    # ------------------------------------------------------------------ updates

    def with_changes(
        self,
        *,
        add: Iterable[tuple[int, Sequence[str]]] = (),
        remove: Iterable[int] = (),
        tokenizer: Tokenizer | None = None,
    ) -> SparseIndex:
        """A new index with ``remove`` dropped and ``add`` inserted; ``self`` is untouched.

        An added id that already exists replaces the old document. Removing an absent id
        is a no-op. Unchanged documents reuse their stored tokens.

        Args:
            add: ``(chunk_id, tokens)`` pairs.
            remove: Chunk ids to drop.
            tokenizer: Tokenizer of the new index (default: this index's). Pass a new one
                only together with a corpus re-tokenized by it.
        """
        docs: dict[int, Sequence[str]] = dict(zip(self._ids.tolist(), self._tokens, strict=True))
        for chunk_id in remove:
            docs.pop(int(chunk_id), None)
        for chunk_id, toks in add:
            docs[int(chunk_id)] = toks
        return SparseIndex(list(docs), list(docs.values()), tokenizer=tokenizer or self._tokenizer, params=self._params)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenized corpus as JSON lines: a header, then ``{"id", "tokens"}`` per chunk.

        The file is flushed and fsynced before returning.
        """
        with Path(path).open("w", encoding="utf-8") as f:
            header = {
                "format": _FORMAT,
                "count": len(self),
                "params": asdict(self._params),
                "tokenizer": self._tokenizer.options.to_dict(),
            }
            f.write(json.dumps(header) + "\n")
            for chunk_id, toks in zip(self._ids.tolist(), self._tokens, strict=True):
                f.write(json.dumps({"id": chunk_id, "tokens": toks}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseIndex:
        """Read a file written by :meth:`save` and rebuild the BM25 statistics.

        Raises:
            IndexCorruptError: If the file is malformed or truncated.
            FileNotFoundError: If it does not exist.
        """
        with Path(path).open(encoding="utf-8") as f:
            return cls._read(f, str(path))

    @classmethod
    def _read(cls, f: IO[str], name: str) -> SparseIndex:
        try:
            header: dict[str, Any] = json.loads(f.readline())
            if header.get("format") != _FORMAT:
                raise IndexCorruptError(f"{name}: unknown sparse index format {header.get('format')!r}")
            params = BM25Params(**header["params"])
            options = TokenizerOptions.from_dict(header["tokenizer"])
            ids: list[int] = []
            tokens: list[list[str]] = []
            for line in f:
                row = json.loads(line)
                ids.append(int(row["id"]))
                # Interned: one string object per distinct term across the corpus.
                tokens.append([sys.intern(t) for t in row["tokens"]])
        except IndexCorruptError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise IndexCorruptError(f"{name}: unreadable sparse index: {e}") from e
        if len(ids) != header["count"]:
            raise IndexCorruptError(f"{name}: header says {header['count']} chunks, file has {len(ids)}")
        return cls(ids, tokens, tokenizer=Tokenizer(options), params=params)
