"""chunk locations and extraction reports

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 08:10:00.000000

``chunks.location``: where a citation says the chunk is (``slide 2, Launch plan``,
``Prices, rows 2-14``, ``page 4``); ``documents.report``: the extraction report of the file's
last load (pages read, pages OCR'd, characters, warnings); ``ingest_jobs.extraction``: a job's
totals and the reports of its files that were OCR'd or warned about. All nullable: rows written
before this revision have none. Batch mode so SQLite can alter the tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("location", sa.Text(), nullable=True))
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("report", sa.JSON(), nullable=True))
    with op.batch_alter_table("ingest_jobs") as batch:
        batch.add_column(sa.Column("extraction", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_jobs") as batch:
        batch.drop_column("extraction")
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("report")
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("location")
