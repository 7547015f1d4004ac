"""postgres retrieval backend: section leads for the dense leg, BM25 bounds for MaxScore pruning

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 12:00:00

- ``rag_index.chunks.lead_id``: the chunk's section lead (the first chunk of its document under its
  heading path, :mod:`retrieval.leads`), written by the writer with the chunk; filled here from
  the chunk rows. A partial HNSW index over the leads (``chunk_id = lead_id``) finds the sections
  whose lead matches a question (the local backend's lead candidates).
- ``rag_index.terms.max_tf`` / ``min_len_per_tf``: the largest tf and smallest ``doc_len / tf`` of
  a term's postings, the per-term upper bound of a BM25 contribution (``core/pgindex/bm25.py``);
  kept by the insert trigger (a delete leaves them: a stale bound is looser, still a bound).
- ``rag_index.bm25_top``: exact BM25 top-k with MaxScore pruning (``core/pgindex/bm25.py``).
- ``rag_index.postings``' primary key index covers ``tf`` and ``doc_len`` (index-only scans).

Nothing on SQLite or where 0005 created nothing (no pgvector).
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import Connection, text

from core.pgindex.bm25 import bm25_function

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The insert trigger of 0005, now also keeping max_tf and min_len_per_tf. NULL means unknown (and
# stays so until the term's postings are all gone): greatest() and least() would skip it.
_TRIGGER = """CREATE OR REPLACE FUNCTION rag_index.postings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH d AS (
        SELECT collection_id, term, count(*)::int AS n, max(tf) AS max_tf, min(doc_len::float8 / tf) AS min_lt
        FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
    ), up AS (
        INSERT INTO rag_index.terms AS t (collection_id, term, df, max_tf, min_len_per_tf)
        SELECT collection_id, term, n, max_tf, min_lt FROM d
        ON CONFLICT (collection_id, term) DO UPDATE SET
            df = t.df + excluded.df,
            max_tf = CASE WHEN t.max_tf IS NULL THEN NULL ELSE greatest(t.max_tf, excluded.max_tf) END,
            min_len_per_tf = CASE WHEN t.min_len_per_tf IS NULL THEN NULL
                                  ELSE least(t.min_len_per_tf, excluded.min_len_per_tf) END
        RETURNING t.collection_id, t.term, t.df
    ), moves AS (
        SELECT up.collection_id, up.df - d.n AS old_df, up.df AS new_df
        FROM up JOIN d ON d.collection_id = up.collection_id AND d.term = up.term
    ), delta AS (
        SELECT collection_id, df, sum(c)::int AS c FROM (
            SELECT collection_id, old_df AS df, -1 AS c FROM moves WHERE old_df > 0
            UNION ALL SELECT collection_id, new_df, 1 FROM moves
        ) x GROUP BY 1, 2
    )
    INSERT INTO rag_index.df_hist AS h (collection_id, df, terms)
    SELECT collection_id, df, c FROM delta WHERE c <> 0 ORDER BY 1, 2
    ON CONFLICT (collection_id, df) DO UPDATE SET terms = h.terms + excluded.terms;
    DELETE FROM rag_index.df_hist h
    WHERE h.terms = 0 AND h.collection_id IN (SELECT DISTINCT collection_id FROM new_rows);
    RETURN NULL;
END $$"""

# 0005's trigger function, for the downgrade.
_TRIGGER_0005 = """CREATE OR REPLACE FUNCTION rag_index.postings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH d AS (
        SELECT collection_id, term, count(*)::int AS n FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
    ), up AS (
        INSERT INTO rag_index.terms AS t (collection_id, term, df)
        SELECT collection_id, term, n FROM d
        ON CONFLICT (collection_id, term) DO UPDATE SET df = t.df + excluded.df
        RETURNING t.collection_id, t.term, t.df
    ), moves AS (
        SELECT up.collection_id, up.df - d.n AS old_df, up.df AS new_df
        FROM up JOIN d ON d.collection_id = up.collection_id AND d.term = up.term
    ), delta AS (
        SELECT collection_id, df, sum(c)::int AS c FROM (
            SELECT collection_id, old_df AS df, -1 AS c FROM moves WHERE old_df > 0
            UNION ALL SELECT collection_id, new_df, 1 FROM moves
        ) x GROUP BY 1, 2
    )
    INSERT INTO rag_index.df_hist AS h (collection_id, df, terms)
    SELECT collection_id, df, c FROM delta WHERE c <> 0 ORDER BY 1, 2
    ON CONFLICT (collection_id, df) DO UPDATE SET terms = h.terms + excluded.terms;
    DELETE FROM rag_index.df_hist h
    WHERE h.terms = 0 AND h.collection_id IN (SELECT DISTINCT collection_id FROM new_rows);
    RETURN NULL;
END $$"""

_UPGRADE = [
    "ALTER TABLE rag_index.chunks ADD COLUMN lead_id bigint",
    """UPDATE rag_index.chunks r SET lead_id = l.lead_id
       FROM (SELECT c.id, first_value(c.id) OVER (
                 PARTITION BY c.document_id, coalesce(c.heading, '') ORDER BY c.ordinal, c.id) AS lead_id
             FROM public.chunks c) l
       WHERE l.id = r.chunk_id""",
    "UPDATE rag_index.chunks SET lead_id = chunk_id WHERE lead_id IS NULL",
    "ALTER TABLE rag_index.chunks ALTER COLUMN lead_id SET NOT NULL",
    """CREATE INDEX ix_rag_index_chunks_lead_embedding ON rag_index.chunks
       USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64) WHERE chunk_id = lead_id""",
    # The BM25 leg reads postings by (collection, term): with tf and doc_len in the key's index
    # that is an index-only scan of adjacent leaf pages, not a heap fetch per posting.
    """ALTER TABLE rag_index.postings DROP CONSTRAINT postings_pkey,
       ADD CONSTRAINT postings_pkey PRIMARY KEY (collection_id, term, chunk_id) INCLUDE (tf, doc_len)""",
    "ALTER TABLE rag_index.terms ADD COLUMN max_tf integer, ADD COLUMN min_len_per_tf double precision",
    """UPDATE rag_index.terms t SET max_tf = p.max_tf, min_len_per_tf = p.min_lt
       FROM (SELECT collection_id, term, max(tf) AS max_tf, min(doc_len::float8 / tf) AS min_lt
             FROM rag_index.postings GROUP BY 1, 2) p
       WHERE p.collection_id = t.collection_id AND p.term = t.term""",
    _TRIGGER,
    bm25_function("rag_index"),
]

_DOWNGRADE = [
    "DROP FUNCTION IF EXISTS rag_index.bm25_top",
    _TRIGGER_0005,
    "ALTER TABLE rag_index.terms DROP COLUMN IF EXISTS max_tf, DROP COLUMN IF EXISTS min_len_per_tf",
    """ALTER TABLE rag_index.postings DROP CONSTRAINT postings_pkey,
       ADD CONSTRAINT postings_pkey PRIMARY KEY (collection_id, term, chunk_id)""",
    "DROP INDEX IF EXISTS rag_index.ix_rag_index_chunks_lead_embedding",
    "ALTER TABLE rag_index.chunks DROP COLUMN IF EXISTS lead_id",
]


def _has_index(bind: Connection) -> bool:
    return bool(bind.execute(text("SELECT to_regclass('rag_index.chunks') IS NOT NULL")).scalar())


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not _has_index(bind):
        return
    for statement in _UPGRADE:
        bind.exec_driver_sql(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or not _has_index(bind):
        return
    for statement in _DOWNGRADE:
        bind.exec_driver_sql(statement)
