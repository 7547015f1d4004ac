"""index recipes: what a collection's chunks were made with, reindex jobs, stored document text

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 11:50:00

- ``collections.recipe`` (JSON, nullable): the index recipe of the collection's chunk rows
  (``retrieval.recipe``); existing collections read as "unknown recipe".
- ``documents.text`` / ``documents.layout``: the extracted text and its page/row spans, so that
  ``rag reindex`` re-chunks without reading the files again (``NULL`` for documents ingested
  before: their text is rebuilt from their chunks).
- ``ingest_jobs.kind``: ``ingest`` (every existing job) or ``reindex``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("collections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipe", sa.JSON(), nullable=True))
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("text", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("layout", sa.JSON(), nullable=True))
    with op.batch_alter_table("ingest_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="ingest", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("ingest_jobs", schema=None) as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_column("layout")
        batch_op.drop_column("text")
    with op.batch_alter_table("collections", schema=None) as batch_op:
        batch_op.drop_column("recipe")
