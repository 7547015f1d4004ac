"""BM25 (Okapi) over chunk ids: rank-bm25's scores from numpy postings with precomputed impacts.

rank-bm25's ``BM25Okapi`` defines the scores (its idf with the epsilon floor, its length
normalization, query terms summed in order, repeats included). It is the oracle, not the
engine: it keeps one Python dict per document and walks all of them for every query term
(22 ms a query at 10.8k passages; building it for 1M chunks grew a process past 12 GB), so
this module computes the same statistics with numpy and stores, per term, a postings list
of ``(document, impact)`` where ``impact = idf · tf·(k1+1) / (tf + k1·(1−b+b·len/avgdl))``
is the term's whole contribution to that document's score. A query then costs one
scatter-add of the query terms' impacts; the float64 operations are rank-bm25's, in its
order, so the scores equal ``BM25Okapi.get_scores`` (the only difference: the average idf
behind the epsilon floor is summed exactly, with ``math.fsum``, where rank-bm25 sums
sequentially — at most a rounding step apart; ``tests/unit/test_sparse.py`` holds the parity
test).

Layout (all numpy; documents are positions in the id-sorted :attr:`SparseIndex.ids`):

- ``terms`` / vocabulary: term id → string;
- ``post_ptr`` (int64, terms + 1), ``post_docs`` (int32), ``post_tf`` (int32): postings
  CSR over terms, documents ascending within a term;
- ``doc_len`` (int64): tokens per document;
- derived on construction and load: ``idf``, ``impact`` (float64 per posting).

A :class:`SparseIndex` is immutable. :meth:`SparseIndex.with_changes` builds the next index
from the postings (removed documents filtered out, added ones merged in, statistics and
impacts recomputed; no re-tokenizing of unchanged documents, all vectorized). Persistence is
one uncompressed ``.npz`` of the postings (no pickle); the JSON-lines token files of format 1
still load.

Errors: :class:`~retrieval.types.IndexCorruptError` when a saved file is unreadable.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zipfile
from collections import Counter
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
    Int32Array = npt.NDArray[np.int32]
    ScoreArray = npt.NDArray[np.float64]

__all__ = ["BM25Params", "SparseIndex"]

_FORMAT = "bm25-postings/2"
_LEGACY_FORMAT = "bm25-tokens/1"
# Impacts are computed in slices of this many postings: bounded temporaries at 1M chunks.
_BLOCK = 1 << 22


@dataclass(frozen=True, slots=True)
class BM25Params:
    """``BM25Okapi`` parameters (rank-bm25's defaults); recorded in manifests."""

    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25


def _readonly(array: Any) -> Any:
    array.setflags(write=False)
    return array


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
        "_doc_len",
        "_idf",
        "_ids",
        "_impact",
        "_params",
        "_post_docs",
        "_post_ptr",
        "_post_tf",
        "_terms",
        "_tokenizer",
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
        vocab: dict[str, int] = {}
        terms, docs, tfs, doc_len = _count([tokens[i] for i in order.tolist()], vocab)
        post_ptr, post_docs, post_tf = _csr(terms, docs, tfs, len(vocab))
        self._init(
            id_array,
            doc_len,
            list(vocab),
            post_ptr,
            post_docs,
            post_tf,
            tokenizer=tokenizer or Tokenizer(),
            params=params or BM25Params(),
        )

    @classmethod
    def from_postings(
        cls,
        ids: IntArray,
        doc_len: IntArray,
        terms: Sequence[str],
        post_ptr: IntArray,
        post_docs: Int32Array,
        post_tf: Int32Array,
        *,
        tokenizer: Tokenizer | None = None,
        params: BM25Params | None = None,
    ) -> SparseIndex:
        """An index from ready-made postings (loaders, bulk builders, benchmarks).

        Args:
            ids: Chunk ids, strictly ascending.
            doc_len: Token count of each document (aligned with ``ids``).
            terms: Term strings; term ``t`` owns postings ``post_ptr[t]:post_ptr[t+1]``.
            post_ptr: CSR offsets, ``len(terms) + 1`` entries from 0 to ``len(post_docs)``.
            post_docs: Document positions (into ``ids``), ascending within each term.
            post_tf: Term frequency of each posting (>= 1).
            tokenizer: As in the constructor.
            params: As in the constructor.

        Raises:
            ValueError: If the arrays are inconsistent.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        doc_len = np.asarray(doc_len, dtype=np.int64).reshape(-1)
        post_ptr = np.asarray(post_ptr, dtype=np.int64).reshape(-1)
        post_docs = np.asarray(post_docs, dtype=np.int32).reshape(-1)
        post_tf = np.asarray(post_tf, dtype=np.int32).reshape(-1)
        n, n_post = ids.size, post_docs.size
        problems = []
        if ids.size > 1 and bool(np.any(ids[1:] <= ids[:-1])):
            problems.append("ids are not strictly ascending")
        if doc_len.size != n:
            problems.append(f"{doc_len.size} document lengths for {n} ids")
        if post_ptr.size != len(terms) + 1 or post_ptr[0] != 0 or post_ptr[-1] != n_post:
            problems.append("postings offsets do not cover the postings")
        elif bool(np.any(np.diff(post_ptr) < 0)):
            problems.append("postings offsets decrease")
        if post_tf.size != n_post:
            problems.append(f"{post_tf.size} term frequencies for {n_post} postings")
        if n_post and (int(post_docs.min()) < 0 or int(post_docs.max()) >= n):
            problems.append("a posting names a document that does not exist")
        if n_post and int(post_tf.min()) < 1:
            problems.append("a posting has a term frequency below 1")
        if len(set(terms)) != len(terms):
            problems.append("repeated terms")
        if problems:
            raise ValueError("inconsistent postings: " + "; ".join(problems))
        self = cls.__new__(cls)
        self._init(
            ids,
            doc_len,
            list(terms),
            post_ptr,
            post_docs,
            post_tf,
            tokenizer=tokenizer or Tokenizer(),
            params=params or BM25Params(),
        )
        return self

    def _init(
        self,
        ids: IntArray,
        doc_len: IntArray,
        terms: list[str],
        post_ptr: IntArray,
        post_docs: Int32Array,
        post_tf: Int32Array,
        *,
        tokenizer: Tokenizer,
        params: BM25Params,
    ) -> None:
        df = np.diff(post_ptr)
        if terms and not bool(df.all()):
            # Terms whose documents were all removed: drop them so that the statistics
            # (rank-bm25's average idf runs over the corpus' words) never see them.
            keep = np.flatnonzero(df)
            terms = [terms[t] for t in keep.tolist()]
            post_ptr = np.concatenate(([0], np.cumsum(df[keep]))).astype(np.int64)
            df = df[keep]
        self._ids: IntArray = _readonly(ids)
        self._doc_len: IntArray = _readonly(doc_len)
        self._terms: tuple[str, ...] = tuple(terms)
        self._vocab: dict[str, int] = {term: t for t, term in enumerate(self._terms)}
        self._post_ptr: IntArray = _readonly(post_ptr)
        self._post_docs: Int32Array = _readonly(post_docs)
        self._post_tf: Int32Array = _readonly(post_tf)
        self._tokenizer = tokenizer
        self._params = params
        self._idf: ScoreArray = np.zeros(0, dtype=np.float64)
        self._impact: ScoreArray = np.zeros(0, dtype=np.float64)
        if ids.size == 0 or not self._terms:
            # rank-bm25 divides by the corpus size and by the vocabulary size: an empty
            # corpus has no statistics and no query term can match anything.
            return
        self._idf = _readonly(_idf(df, int(ids.size), params.epsilon))
        self._impact = _readonly(self._impacts())

    def _impacts(self) -> ScoreArray:
        p = self._params
        n = int(self._ids.size)
        # rank-bm25: ``avgdl = num_doc / corpus_size`` on Python ints, then
        # ``k1 * (1 - b + b * doc_len / avgdl)`` on the int64 array, the same order here.
        avgdl = int(self._doc_len.sum()) / n
        norm = p.k1 * (1 - p.b + p.b * self._doc_len / avgdl)
        k1_plus_1 = p.k1 + 1
        term_of = self._posting_terms(np.int32)
        impact = np.empty(self._post_docs.size, dtype=np.float64)
        for lo in range(0, impact.size, _BLOCK):
            hi = min(lo + _BLOCK, impact.size)
            # rank-bm25's ``q_freq`` is an int array: tf * (k1 + 1) is the same float64 product.
            tf = self._post_tf[lo:hi].astype(np.float64)
            impact[lo:hi] = self._idf[term_of[lo:hi]] * (tf * k1_plus_1 / (tf + norm[self._post_docs[lo:hi]]))
        return impact

    def _posting_terms(self, dtype: type[np.int32] | type[np.int64]) -> Any:
        """The term id of every posting (the CSR offsets expanded)."""
        return np.repeat(np.arange(len(self._terms), dtype=dtype), np.diff(self._post_ptr))

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

    @property
    def vocabulary_size(self) -> int:
        """Distinct terms in the corpus."""
        return len(self._terms)

    @property
    def postings_count(self) -> int:
        """``(term, document)`` pairs stored."""
        return int(self._post_docs.size)

    @property
    def nbytes(self) -> int:
        """Bytes held by the numpy arrays (the vocabulary's strings not included)."""
        arrays = (self._ids, self._doc_len, self._post_ptr, self._post_docs, self._post_tf, self._idf, self._impact)
        return sum(int(a.nbytes) for a in arrays)

    def __len__(self) -> int:
        return int(self._ids.size)

    def term_counts(self, chunk_id: int) -> dict[str, int]:
        """The terms of one chunk with their frequencies (a scan of all postings: for tests and tools).

        Raises:
            KeyError: If the id is not indexed.
        """
        pos = int(np.searchsorted(self._ids, chunk_id))
        if pos >= self._ids.size or int(self._ids[pos]) != chunk_id:
            raise KeyError(chunk_id)
        hits = np.flatnonzero(self._post_docs == pos)
        term_of = np.searchsorted(self._post_ptr, hits, side="right") - 1
        return {self._terms[int(t)]: int(self._post_tf[h]) for t, h in zip(term_of, hits, strict=True)}

    # ------------------------------------------------------------------ scoring

    def _accumulate(self, query_tokens: Sequence[str]) -> tuple[ScoreArray, npt.NDArray[np.bool_] | None]:
        """Scores of all documents; the match mask only when scores cannot tell (non-positive idf)."""
        scores = np.zeros(self._ids.size, dtype=np.float64)
        spans = []
        # Query terms in order, repeats included, as rank-bm25 does: same summation order.
        for word in query_tokens:
            term = self._vocab.get(word)
            if term is not None:
                spans.append((term, int(self._post_ptr[term]), int(self._post_ptr[term + 1])))
        for _, lo, hi in spans:
            # Documents without the term get ``+ idf * 0.0`` in rank-bm25: a no-op. ``add.at``
            # is an unbuffered scatter-add (2.5x faster than fancy-indexed ``+=`` in numpy 2).
            np.add.at(scores, self._post_docs[lo:hi], self._impact[lo:hi])
        if all(self._idf[term] > 0 for term, _, _ in spans):
            return scores, None  # every impact is positive: matched <=> score > 0
        matched = np.zeros(self._ids.size, dtype=np.bool_)
        for _, lo, hi in spans:
            matched[self._post_docs[lo:hi]] = True
        return scores, matched

    def scores(self, query_tokens: Sequence[str]) -> ScoreArray:
        """BM25 score of every document, aligned with :attr:`ids`.

        Equal to ``BM25Okapi(corpus).get_scores(query_tokens)`` for the same corpus in
        the same (id-sorted) order (see the module docstring for the one rounding step).
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
        if k <= 0 or not self._terms:
            return empty
        scores, matched = self._accumulate(query_tokens)
        if matched is None and allowed_ids is None:
            cand = _top_positive(scores, k)
        else:
            if matched is None:
                matched = scores > 0
            if allowed_ids is not None:
                matched &= self.allowed_mask(allowed_ids)
            cand = np.flatnonzero(matched)
        if cand.size == 0:
            return empty
        if cand.size > k:
            # O(n) selection of the k best before sorting only those. Ties at the k-th score
            # go to the lowest ids (``cand`` is ascending, as the ids are), as the sort would.
            part = scores[cand]
            kth = np.partition(part, part.size - k)[part.size - k]
            above = cand[part > kth]
            cand = np.concatenate((above, cand[part == kth][: k - above.size]))
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
        is a no-op. Unchanged documents keep their postings (nothing is re-tokenized); the
        statistics and impacts are recomputed for the new corpus, so the result equals a
        fresh build of the same documents.

        Args:
            add: ``(chunk_id, tokens)`` pairs.
            remove: Chunk ids to drop.
            tokenizer: Tokenizer of the new index (default: this index's). Pass a new one
                only together with tokens re-tokenized by it for every document.
        """
        added: dict[int, Sequence[str]] = {int(chunk_id): toks for chunk_id, toks in add}
        gone = np.asarray(sorted({int(i) for i in remove} | added.keys()), dtype=np.int64)
        keep = ~np.isin(self._ids, gone)
        kept_ids = self._ids[keep]
        add_ids = np.asarray(sorted(added), dtype=np.int64)
        new_ids = np.union1d(kept_ids, add_ids)  # disjoint, sorted
        # Old document positions -> new ones (-1 for dropped documents).
        remap = np.full(self._ids.size, -1, dtype=np.int64)
        remap[keep] = np.searchsorted(new_ids, kept_ids)

        vocab = dict(self._vocab)
        add_terms, local_docs, add_tfs, add_len = _count([added[i] for i in add_ids.tolist()], vocab)
        add_docs: IntArray = np.searchsorted(new_ids, add_ids)[local_docs]

        old_terms = self._posting_terms(np.int64)
        alive = keep[self._post_docs] if self._post_docs.size else np.zeros(0, dtype=np.bool_)
        old_docs = remap[self._post_docs[alive]]
        old_terms = old_terms[alive]
        old_tf = self._post_tf[alive]
        # Merge the (term, doc)-sorted old postings with the new ones by one sorted key.
        shift = max(1, int(new_ids.size).bit_length())
        old_key = (old_terms << shift) | old_docs
        new_key = (add_terms.astype(np.int64) << shift) | add_docs
        new_order = np.argsort(new_key, kind="stable")
        new_key, add_tfs = new_key[new_order], add_tfs[new_order]
        at = np.searchsorted(old_key, new_key)
        key = np.insert(old_key, at, new_key)
        tf = np.insert(old_tf, at, add_tfs)
        terms_of = key >> shift
        docs = (key & ((1 << shift) - 1)).astype(np.int32)
        post_ptr = np.concatenate(([0], np.cumsum(np.bincount(terms_of, minlength=len(vocab))))).astype(np.int64)

        doc_len = np.zeros(new_ids.size, dtype=np.int64)
        doc_len[remap[keep]] = self._doc_len[keep]
        if add_ids.size:
            doc_len[np.searchsorted(new_ids, add_ids)] = add_len
        return SparseIndex.from_postings(
            new_ids,
            doc_len,
            list(vocab),
            post_ptr,
            docs,
            tf.astype(np.int32, copy=False),
            tokenizer=tokenizer or self._tokenizer,
            params=self._params,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the postings as one uncompressed ``.npz`` (no pickled objects); fsynced.

        The header (format, BM25 parameters, tokenizer options) and the vocabulary are
        stored as JSON inside it; idf and impacts are recomputed on load.
        """
        header = {
            "format": _FORMAT,
            "count": len(self),
            "params": asdict(self._params),
            "tokenizer": self._tokenizer.options.to_dict(),
        }
        with Path(path).open("wb") as f:
            np.savez(
                f,
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                terms=np.frombuffer(json.dumps(self._terms, ensure_ascii=False).encode(), dtype=np.uint8),
                ids=self._ids,
                doc_len=self._doc_len,
                post_ptr=self._post_ptr,
                post_docs=self._post_docs,
                post_tf=self._post_tf,
            )
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseIndex:
        """Read a file written by :meth:`save` (or a JSON-lines file of format 1).

        Raises:
            IndexCorruptError: If the file is malformed or truncated.
            FileNotFoundError: If it does not exist.
        """
        name = str(path)
        with Path(path).open("rb") as f:
            magic = f.read(2)
            f.seek(0)
            if magic != b"PK":  # not a zip: the JSON-lines tokens of format 1
                return cls._read_legacy(f, name)
            try:
                with np.load(f, allow_pickle=False) as data:
                    header: dict[str, Any] = json.loads(bytes(data["header"]).decode())
                    if header.get("format") != _FORMAT:
                        raise IndexCorruptError(f"{name}: unknown sparse index format {header.get('format')!r}")
                    terms = json.loads(bytes(data["terms"]).decode())
                    arrays = {key: data[key] for key in ("ids", "doc_len", "post_ptr", "post_docs", "post_tf")}
                params = BM25Params(**header["params"])
                options = TokenizerOptions.from_dict(header["tokenizer"])
                if not isinstance(terms, list) or not all(isinstance(t, str) for t in terms):
                    raise ValueError("the vocabulary is not a list of strings")
                if arrays["ids"].size != header["count"]:
                    raise IndexCorruptError(
                        f"{name}: header says {header['count']} chunks, file has {arrays['ids'].size}"
                    )
                return cls.from_postings(
                    arrays["ids"],
                    arrays["doc_len"],
                    terms,
                    arrays["post_ptr"],
                    arrays["post_docs"],
                    arrays["post_tf"],
                    tokenizer=Tokenizer(options),
                    params=params,
                )
            except IndexCorruptError:
                raise
            except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise IndexCorruptError(f"{name}: unreadable sparse index: {e}") from e

    @classmethod
    def _read_legacy(cls, raw: IO[bytes], name: str) -> SparseIndex:
        try:
            lines = (line.decode("utf-8") for line in raw)
            header: dict[str, Any] = json.loads(next(lines, "null") or "null")
            if not isinstance(header, dict) or header.get("format") != _LEGACY_FORMAT:
                found = header.get("format") if isinstance(header, dict) else None
                raise IndexCorruptError(f"{name}: unknown sparse index format {found!r}")
            params = BM25Params(**header["params"])
            options = TokenizerOptions.from_dict(header["tokenizer"])
            ids: list[int] = []
            tokens: list[list[str]] = []
            for line in lines:
                row = json.loads(line)
                ids.append(int(row["id"]))
                tokens.append([sys.intern(t) for t in row["tokens"]])
        except IndexCorruptError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise IndexCorruptError(f"{name}: unreadable sparse index: {e}") from e
        if len(ids) != header["count"]:
            raise IndexCorruptError(f"{name}: header says {header['count']} chunks, file has {len(ids)}")
        return cls(ids, tokens, tokenizer=Tokenizer(options), params=params)


# ---------------------------------------------------------------------- building blocks

# Below this many documents a plain selection over all positive scores is as fast.
_SAMPLED_SELECTION_MIN = 50_000


def _top_positive(scores: ScoreArray, k: int) -> Int32Array | IntArray:
    """Positions of the positive scores that can be among the ``k`` best (a superset of them).

    Selecting the k best of a million scores with ``argpartition`` costs ~15 ms; most of a
    large corpus matches some common query term, so the candidates are nearly all documents.
    The k-th best score of any subset is a lower bound of the k-th best overall, so the
    documents scoring at least the k-th best of an evenly strided sample include every one
    of the true k best (ties included); about ``k * n / sample`` of them pass, and the
    caller selects among those.
    """
    n = scores.size
    if n < _SAMPLED_SELECTION_MIN:
        return np.flatnonzero(scores > 0)
    stride = max(1, n // (64 * k))
    sample = scores[::stride]
    if sample.size <= k:
        return np.flatnonzero(scores > 0)
    threshold = np.partition(sample, sample.size - k)[sample.size - k]
    if threshold <= 0:
        return np.flatnonzero(scores > 0)
    return np.flatnonzero(scores >= threshold)


def _count(docs: Sequence[Sequence[str]], vocab: dict[str, int]) -> tuple[Int32Array, Int32Array, Int32Array, IntArray]:
    """Doc-major ``(term, doc, tf)`` triples and document lengths; new terms are added to ``vocab``."""
    terms: list[int] = []
    doc_of: list[int] = []
    tfs: list[int] = []
    lengths: list[int] = []
    for doc, toks in enumerate(docs):
        counts = Counter(toks)
        for word in counts:
            if word not in vocab:
                vocab[word] = len(vocab)
        terms.extend(map(vocab.__getitem__, counts))
        tfs.extend(counts.values())
        doc_of.extend([doc] * len(counts))
        lengths.append(len(toks))
    return (
        np.asarray(terms, dtype=np.int32),
        np.asarray(doc_of, dtype=np.int32),
        np.asarray(tfs, dtype=np.int32),
        np.asarray(lengths, dtype=np.int64),
    )


def _csr(terms: Int32Array, docs: Int32Array, tfs: Int32Array, n_terms: int) -> tuple[IntArray, Int32Array, Int32Array]:
    """Term-major postings from doc-major triples (stable: documents stay ascending per term)."""
    order = np.argsort(terms, kind="stable")
    post_ptr = np.concatenate(([0], np.cumsum(np.bincount(terms, minlength=n_terms)))).astype(np.int64)
    return post_ptr, docs[order], tfs[order]


def _idf(df: IntArray, n: int, epsilon: float) -> ScoreArray:
    """rank-bm25's ``BM25Okapi`` idf: ``log(N - df + 0.5) - log(df + 0.5)``, negatives floored.

    ``math.log`` on Python floats, as rank-bm25 computes it (numpy's vectorized log may round
    differently), evaluated once per distinct document frequency.
    """
    distinct, inverse = np.unique(df, return_inverse=True)
    table = np.array([math.log(n - f + 0.5) - math.log(f + 0.5) for f in distinct.tolist()], dtype=np.float64)
    idf = table[inverse.reshape(-1)]
    # Negative idf (a term in more than half of the documents) becomes epsilon * average idf;
    # the average runs over every term of the corpus, negative ones included.
    average = math.fsum(idf.tolist()) / idf.size
    idf[idf < 0] = epsilon * average
    return idf
