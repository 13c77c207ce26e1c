"""Photo facts for search filters, and the keyword index for hybrid search.

Images gain the date they were taken (EXIF DateTimeOriginal, else the file's mtime) and their
camera. Rows written before have `taken_from` NULL: the next build reads their files again for
these facts (their vectors are reused). The keyword index holds one document per caption
(doc id = caption id) and one per image file name (doc id = -image id): SQLite FTS5 with BM25,
or on PostgreSQL a table with a GIN full-text index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""
import re

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _path_words(path: str) -> str:
    """Frozen copy of store.path_keywords at this revision."""
    return " ".join(re.split(r"[\W_]+", path)).strip()


def upgrade() -> None:
    # Plain ALTER TABLE, never batch mode: SQLite's batch copy drops the old table, and with foreign keys
    # on, that deletes every caption (ON DELETE CASCADE).
    op.add_column("images", sa.Column("taken_at", sa.Float(), nullable=True))
    op.add_column("images", sa.Column("taken_from", sa.String(8), nullable=True))
    op.add_column("images", sa.Column("camera_make", sa.String(128), nullable=True))
    op.add_column("images", sa.Column("camera_model", sa.String(128), nullable=True))
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":
        op.execute("CREATE VIRTUAL TABLE keywords USING fts5(text, image_id UNINDEXED, tokenize='porter unicode61')")
    else:
        op.create_table("keywords", sa.Column("doc_id", sa.BigInteger(), primary_key=True, autoincrement=False),
                        sa.Column("image_id", sa.Integer(), nullable=False),
                        sa.Column("text", sa.Text(), nullable=False))
        op.execute("CREATE INDEX ix_keywords_text ON keywords USING GIN (to_tsvector('english', text))")
    images = connection.execute(sa.text("SELECT id, path FROM images")).all()
    captions = connection.execute(sa.text("SELECT id, image_id, text FROM captions")).all()
    docs = ([{"doc": -i, "image": i, "text": _path_words(path)} for i, path in images]
            + [{"doc": c, "image": i, "text": text} for c, i, text in captions])
    column = "rowid" if connection.dialect.name == "sqlite" else "doc_id"
    for start in range(0, len(docs), 10_000):
        connection.execute(sa.text(f"INSERT INTO keywords ({column}, image_id, text) VALUES (:doc, :image, :text)"),
                           docs[start:start + 10_000])


def downgrade() -> None:
    op.execute("DROP TABLE keywords")
    for column in ("camera_model", "camera_make", "taken_from", "taken_at"):
        op.drop_column("images", column)  # SQLite 3.35+ drops a column in place
