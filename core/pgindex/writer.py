"""Writes chunks into the PostgreSQL retrieval index, in the caller's transaction.

The ingestion pipeline calls :meth:`PgIndexWriter.add` right after inserting the chunk rows, in
the same transaction: the vectors, the BM25 postings and (through the triggers of migration
0003) the document frequencies and collection statistics commit or roll back with the chunks.
Deletes need no call at all: ``rag_index`` rows cascade from ``public.chunks`` and the triggers
subtract their statistics. So an API replica holds no index state and a crash needs no
reconcile.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import text

from retrieval.leads import section_leads
from retrieval.tokenize import Tokenizer

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["IndexedChunk", "PgIndexWriter", "lead_ids", "vector_literal"]


@dataclass(frozen=True, slots=True)
class IndexedChunk:
    """One chunk as the index needs it: its row id, owner, path, BM25 text and vector, and where it
    sits in its document (heading path and ordinal: its section lead, :mod:`retrieval.leads`)."""

    chunk_id: int
    document_id: int
    path: str
    text: str
    vector: npt.NDArray[np.float32]
    heading: str | None
    ordinal: int


def vector_literal(vector: npt.NDArray[np.float32]) -> str:
    """pgvector's text form of a float32 vector (``[0.1,0.2,...]``), exact: 9 significant digits
    round-trip every float32."""
    return "[" + ",".join(format(float(x), ".9g") for x in vector.tolist()) + "]"


_INSERT_CHUNKS = text(
    """
    INSERT INTO rag_index.chunks (chunk_id, collection_id, document_id, path, doc_len, embedding, lead_id)
    SELECT u.chunk_id, :collection_id, u.document_id, u.path, u.doc_len, CAST(u.embedding AS vector), u.lead_id
    FROM unnest(CAST(:chunk_ids AS bigint[]), CAST(:document_ids AS int[]), CAST(:paths AS text[]),
                CAST(:doc_lens AS int[]), CAST(:embeddings AS text[]), CAST(:lead_ids AS bigint[]))
         AS u(chunk_id, document_id, path, doc_len, embedding, lead_id)
    """
)

_INSERT_POSTINGS = text(
    """
    INSERT INTO rag_index.postings (collection_id, term, chunk_id, tf, doc_len)
    SELECT :collection_id, u.term, u.chunk_id, u.tf, u.doc_len
    FROM unnest(CAST(:terms AS text[]), CAST(:chunk_ids AS bigint[]), CAST(:tfs AS int[]), CAST(:doc_lens AS int[]))
         AS u(term, chunk_id, tf, doc_len)
    """
)


def lead_ids(chunks: Sequence[IndexedChunk]) -> list[int]:
    """Each chunk's section lead (:func:`retrieval.leads.section_leads`), in the order of ``chunks``.

    ``chunks`` must hold every chunk of their documents (the pipeline writes a document's chunks
    in one call, after deleting its old ones), so that the lead is the document's own.
    """
    lead = section_leads((c.chunk_id, c.document_id, c.heading, c.ordinal) for c in chunks)
    return [lead[c.chunk_id] for c in chunks]


def postings(chunks: Sequence[IndexedChunk], tokenizer: Tokenizer) -> tuple[list[int], dict[str, list[object]]]:
    """Document lengths and the postings columns (term, chunk, tf, doc_len) of ``chunks``."""
    lengths: list[int] = []
    columns: dict[str, list[object]] = {"terms": [], "chunk_ids": [], "tfs": [], "doc_lens": []}
    for chunk in chunks:
        tokens = tokenizer(chunk.text)
        lengths.append(len(tokens))
        for term, tf in Counter(tokens).items():
            columns["terms"].append(term)
            columns["chunk_ids"].append(chunk.chunk_id)
            columns["tfs"].append(tf)
            columns["doc_lens"].append(len(tokens))
    return lengths, columns


class PgIndexWriter:
    """Adds chunks to the ``rag_index`` tables with the BM25 tokenizer of the index.

    Args:
        tokenizer: The BM25 tokenizer (the one :class:`~core.pgindex.index.PgIndex` recorded).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    async def add(self, session: AsyncSession, *, collection_id: int, chunks: Sequence[IndexedChunk]) -> None:
        """Insert ``chunks`` of ``collection_id`` (flushes; the caller commits or rolls back)."""
        await self._add_rows(session, collection_id=collection_id, chunks=chunks, with_vectors=True)

    async def _add_rows(
        self, session: AsyncSession, *, collection_id: int, chunks: Sequence[IndexedChunk], with_vectors: bool
    ) -> None:
        if not chunks:
            return
        lengths, columns = postings(chunks, self._tokenizer)
        await session.execute(
            _INSERT_CHUNKS,
            {
                "collection_id": collection_id,
                "chunk_ids": [c.chunk_id for c in chunks],
                "document_ids": [c.document_id for c in chunks],
                "paths": [c.path for c in chunks],
                "doc_lens": lengths,
                "embeddings": [vector_literal(c.vector) if with_vectors else None for c in chunks],
                "lead_ids": lead_ids(chunks),
            },
        )
        if columns["terms"]:
            await session.execute(_INSERT_POSTINGS, {"collection_id": collection_id, **columns})
