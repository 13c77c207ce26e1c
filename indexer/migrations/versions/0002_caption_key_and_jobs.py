"""Store each caption's vector key; keep rebuild jobs in the database.

A caption's vector is stored under the hash of its text; the key was recomputed wherever it
was needed and is now a column. Rebuild jobs move from one service's memory into a table,
so that every replica sharing the database can answer for any job.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""
import hashlib

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _text_key(text: str) -> str:
    """Frozen copy of the key function at this revision (store.caption_key)."""
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def upgrade() -> None:
    op.add_column("captions", sa.Column("key", sa.String(64), nullable=True))
    connection = op.get_bind()
    captions = sa.table("captions", sa.column("id", sa.Integer), sa.column("text", sa.Text),
                        sa.column("key", sa.String))
    rows = connection.execute(sa.select(captions.c.id, captions.c.text)).all()
    for start in range(0, len(rows), 10_000):
        connection.execute(captions.update().where(captions.c.id == sa.bindparam("row_id"))
                           .values(key=sa.bindparam("text_key")),
                           [{"row_id": i, "text_key": _text_key(text)} for i, text in rows[start:start + 10_000]])
    with op.batch_alter_table("captions") as batch:
        batch.alter_column("key", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_captions_key", "captions", ["key"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("collection", sa.Text(), nullable=False),
        sa.Column("captions", sa.Text(), nullable=True),
        sa.Column("model", sa.String(512), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state", "jobs")
    op.drop_table("jobs")
    op.drop_index("ix_captions_key", "captions")
    with op.batch_alter_table("captions") as batch:
        batch.drop_column("key")
