"""pgvector retrieval index (PostgreSQL only): vectors, BM25 postings and statistics in schema rag_index

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 08:10:00

The ``postgres`` retrieval backend (``RAG_RETRIEVAL__BACKEND=postgres``, ``core/pgindex``) keeps
its index in these tables, written in the transaction that writes the chunk rows:

- ``rag_index.chunks``: one row per indexed chunk (its vector, HNSW-indexed; path and length);
  deleted with its ``public.chunks`` row (``ON DELETE CASCADE``);
- ``rag_index.postings``: ``(collection, term, chunk) -> tf, doc_len``, deleted with the chunk;
- ``rag_index.terms`` (document frequency per term), ``rag_index.df_hist`` (how many terms have
  each document frequency: rank-bm25's average idf in O(distinct df)) and ``rag_index.stats``
  (chunks and total length per collection), kept equal to the postings by statement-level
  triggers, so a delete by any path (a document re-ingested, pruned, a collection dropped) keeps
  the BM25 statistics exact with no reconcile.

A separate schema keeps these tables (and pgvector's ``vector`` type) out of the SQLAlchemy
models, so ``alembic check`` and SQLite are untouched. SQLite gets nothing (it stays on the
``local`` backend). On a PostgreSQL server without pgvector installed the revision is recorded
but creates nothing (a warning says so): the ``local`` backend does not need it, and the
``postgres`` backend refuses to start with the fix in its message. The vector dimension is 384,
the packaged embedding model's; the backend checks it against the configured model.
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIMENSION = 384

_DDL = f"""
CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS rag_index;

CREATE TABLE rag_index.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

CREATE TABLE rag_index.chunks (
    chunk_id bigint PRIMARY KEY REFERENCES public.chunks (id) ON DELETE CASCADE,
    collection_id integer NOT NULL,
    document_id integer NOT NULL,
    path text NOT NULL,
    doc_len integer NOT NULL,
    embedding vector({DIMENSION})  -- NULL when the vector lives on a shard (core/pgindex/shards.py)
);
CREATE INDEX ix_rag_index_chunks_path ON rag_index.chunks (collection_id, path text_pattern_ops);
CREATE INDEX ix_rag_index_chunks_embedding ON rag_index.chunks
    USING hnsw (embedding vector_ip_ops) WITH (m = 16, ef_construction = 64);

CREATE TABLE rag_index.postings (
    collection_id integer NOT NULL,
    term text NOT NULL,
    chunk_id bigint NOT NULL REFERENCES rag_index.chunks (chunk_id) ON DELETE CASCADE,
    tf integer NOT NULL,
    doc_len integer NOT NULL,
    PRIMARY KEY (collection_id, term, chunk_id)
);
CREATE INDEX ix_rag_index_postings_chunk ON rag_index.postings (chunk_id);

CREATE TABLE rag_index.terms (
    collection_id integer NOT NULL,
    term text NOT NULL,
    df integer NOT NULL,
    PRIMARY KEY (collection_id, term)
);
CREATE TABLE rag_index.df_hist (
    collection_id integer NOT NULL,
    df integer NOT NULL,
    terms integer NOT NULL,
    PRIMARY KEY (collection_id, df)
);
CREATE TABLE rag_index.stats (
    collection_id integer PRIMARY KEY,
    n_docs bigint NOT NULL,
    total_len bigint NOT NULL
);

-- Document frequencies and their histogram follow every insert/delete of postings. Rows are
-- grouped per (collection, term) first: ON CONFLICT may touch a row once per statement.
CREATE FUNCTION rag_index.postings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
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
END $$;

CREATE FUNCTION rag_index.postings_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH d AS (
        SELECT collection_id, term, count(*)::int AS n FROM old_rows GROUP BY 1, 2
    ), up AS (
        UPDATE rag_index.terms t SET df = t.df - d.n FROM d
        WHERE t.collection_id = d.collection_id AND t.term = d.term
        RETURNING t.collection_id, t.df AS new_df, t.df + d.n AS old_df
    ), delta AS (
        SELECT collection_id, df, sum(c)::int AS c FROM (
            SELECT collection_id, old_df AS df, -1 AS c FROM up
            UNION ALL SELECT collection_id, new_df, 1 FROM up WHERE new_df > 0
        ) x GROUP BY 1, 2
    )
    INSERT INTO rag_index.df_hist AS h (collection_id, df, terms)
    SELECT collection_id, df, c FROM delta WHERE c <> 0 ORDER BY 1, 2
    ON CONFLICT (collection_id, df) DO UPDATE SET terms = h.terms + excluded.terms;
    DELETE FROM rag_index.terms t
    USING (SELECT DISTINCT collection_id, term FROM old_rows) d
    WHERE t.collection_id = d.collection_id AND t.term = d.term AND t.df <= 0;
    DELETE FROM rag_index.df_hist h
    WHERE h.terms = 0 AND h.collection_id IN (SELECT DISTINCT collection_id FROM old_rows);
    RETURN NULL;
END $$;

CREATE TRIGGER postings_inserted AFTER INSERT ON rag_index.postings
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rag_index.postings_inserted();
CREATE TRIGGER postings_deleted AFTER DELETE ON rag_index.postings
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION rag_index.postings_deleted();

CREATE FUNCTION rag_index.chunks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO rag_index.stats AS s (collection_id, n_docs, total_len)
    SELECT collection_id, count(*), sum(doc_len) FROM new_rows GROUP BY 1 ORDER BY 1
    ON CONFLICT (collection_id) DO UPDATE
        SET n_docs = s.n_docs + excluded.n_docs, total_len = s.total_len + excluded.total_len;
    RETURN NULL;
END $$;

CREATE FUNCTION rag_index.chunks_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rag_index.stats s SET n_docs = s.n_docs - d.n, total_len = s.total_len - d.len
    FROM (SELECT collection_id, count(*) AS n, sum(doc_len) AS len FROM old_rows GROUP BY 1) d
    WHERE s.collection_id = d.collection_id;
    DELETE FROM rag_index.stats s
    WHERE s.n_docs <= 0 AND s.collection_id IN (SELECT DISTINCT collection_id FROM old_rows);
    RETURN NULL;
END $$;

CREATE TRIGGER chunks_inserted AFTER INSERT ON rag_index.chunks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION rag_index.chunks_inserted();
CREATE TRIGGER chunks_deleted AFTER DELETE ON rag_index.chunks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION rag_index.chunks_deleted();
"""


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    available = bind.execute(text("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'")).scalar()
    if not available:
        import logging

        logging.getLogger("alembic.runtime.migration").warning(
            "pgvector is not installed on this PostgreSQL server: the tables of the postgres retrieval "
            "backend were not created (the local backend does not need them; see docs/scale-out.md)"
        )
        return
    # One statement per call (the asyncpg driver prepares each); blocks end at a line with ";".
    for statement in _statements(_DDL):
        bind.exec_driver_sql(statement)


def _statements(script: str) -> list[str]:
    """Split the DDL at lines that end a statement (a ``$$`` body's inner ``;`` never ends a line
    outside of it: bodies are tracked)."""
    out, current, in_body = [], [], False
    for line in script.splitlines():
        if not line.strip() or line.lstrip().startswith("--"):
            continue
        current.append(line)
        in_body ^= line.count("$$") % 2 == 1
        if not in_body and line.rstrip().endswith(";"):
            out.append("\n".join(current))
            current = []
    return out


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.exec_driver_sql("DROP SCHEMA IF EXISTS rag_index CASCADE")
