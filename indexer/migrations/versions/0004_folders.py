"""Several folders per index: a `folders` table, each image row names its folder, and a rebuild job
says what it does to the folders (`jobs.action`).

The folder of every existing row is the one the published build was made from (else the newest
build's). An image is unique per (folder, path, content) instead of (path, content): two folders
may hold the same file at the same relative path.

SQLite cannot change a table's constraints in place, and Alembic's batch mode would drop `images`
with foreign keys on, deleting every caption (ON DELETE CASCADE). So captions are set aside, the
images table is rebuilt by hand, and the captions put back, ids unchanged, in the one transaction.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_IMAGE_COLUMNS = "id, path, content_hash, bytes, width, height, mtime, taken_at, taken_from, camera_make, " \
                 "camera_model, build_id"
_IMAGES_SQL = """CREATE TABLE images (
    id INTEGER NOT NULL PRIMARY KEY, {folder}path TEXT NOT NULL, content_hash VARCHAR(64) NOT NULL,
    bytes INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, mtime FLOAT NOT NULL,
    taken_at FLOAT, taken_from VARCHAR(8), camera_make VARCHAR(128), camera_model VARCHAR(128),
    build_id INTEGER NOT NULL, {unique},
    FOREIGN KEY(build_id) REFERENCES builds (id){folder_key})"""
_CAPTIONS_SQL = """CREATE TABLE captions (
    id INTEGER NOT NULL PRIMARY KEY, image_id INTEGER NOT NULL, text TEXT NOT NULL, "key" VARCHAR(64) NOT NULL,
    UNIQUE (image_id, text), FOREIGN KEY(image_id) REFERENCES images (id) ON DELETE CASCADE)"""


def upgrade() -> None:
    op.create_table("folders", sa.Column("id", sa.Integer(), primary_key=True),
                    sa.Column("path", sa.Text(), nullable=False, unique=True),
                    sa.Column("name", sa.String(255), nullable=False, unique=True),
                    sa.Column("captions_file", sa.Text(), nullable=True),
                    sa.Column("added_at", sa.DateTime(timezone=True), nullable=False))
    connection = op.get_bind()
    folder_id = _existing_folder(connection)
    if connection.dialect.name == "sqlite":
        _rebuild_sqlite(with_folder=True, folder_id=folder_id)
    else:
        op.add_column("images", sa.Column("folder_id", sa.Integer(), nullable=True))
        op.execute(sa.text("UPDATE images SET folder_id = :f").bindparams(f=folder_id or 0))
        op.alter_column("images", "folder_id", nullable=False)
        op.create_foreign_key("images_folder_id_fkey", "images", "folders", ["folder_id"], ["id"])
        op.drop_constraint("images_path_content_hash_key", "images", type_="unique")
        op.create_unique_constraint("images_folder_id_path_content_hash_key", "images",
                                    ["folder_id", "path", "content_hash"])
    op.create_index("ix_images_folder_id", "images", ["folder_id"])
    op.add_column("jobs", sa.Column("action", sa.String(16), nullable=True))


def _existing_folder(connection) -> int | None:
    """The folder the existing rows come from, as a row of `folders`; None when there are no builds."""
    build = connection.execute(sa.text("SELECT collection_root, captions_file FROM builds "
                                       "ORDER BY status = 'published' DESC, id DESC LIMIT 1")).first()
    if build is None:
        return None
    folders = sa.table("folders", sa.column("id", sa.Integer), sa.column("path", sa.Text),
                       sa.column("name", sa.String), sa.column("captions_file", sa.Text),
                       sa.column("added_at", sa.DateTime(timezone=True)))
    connection.execute(folders.insert().values(id=1, path=build[0], name=Path(build[0]).name or "folder",
                                               captions_file=build[1], added_at=datetime.now(timezone.utc)))
    return 1


def _rebuild_sqlite(with_folder: bool, folder_id: int | None = None) -> None:
    """The images table made again with or without `folder_id` (see the module's docstring)."""
    op.execute("CREATE TABLE captions_kept AS SELECT id, image_id, text, \"key\" FROM captions")
    op.execute("DROP TABLE captions")
    op.execute("ALTER TABLE images RENAME TO images_old")
    op.execute(_IMAGES_SQL.format(
        folder="folder_id INTEGER NOT NULL, " if with_folder else "",
        unique="UNIQUE (folder_id, path, content_hash)" if with_folder else "UNIQUE (path, content_hash)",
        folder_key=", FOREIGN KEY(folder_id) REFERENCES folders (id)" if with_folder else ""))
    if with_folder:
        op.execute(sa.text(f"INSERT INTO images (folder_id, {_IMAGE_COLUMNS}) SELECT :f, {_IMAGE_COLUMNS} "
                           "FROM images_old").bindparams(f=folder_id or 0))
    else:
        op.execute(f"INSERT INTO images ({_IMAGE_COLUMNS}) SELECT {_IMAGE_COLUMNS} FROM images_old")
    op.execute("DROP TABLE images_old")
    op.create_index("ix_images_content_hash", "images", ["content_hash"])
    op.create_index("ix_images_path", "images", ["path"])
    op.execute(_CAPTIONS_SQL)
    op.execute("INSERT INTO captions (id, image_id, text, \"key\") SELECT id, image_id, text, \"key\" FROM captions_kept")
    op.execute("DROP TABLE captions_kept")
    op.create_index("ix_captions_image_id", "captions", ["image_id"])
    op.create_index("ix_captions_key", "captions", ["key"])


def downgrade() -> None:
    """Back to one folder: fails where two folders hold the same file at the same path."""
    op.drop_column("jobs", "action")  # SQLite 3.35+ drops a column in place
    op.drop_index("ix_images_folder_id", "images")
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(with_folder=False)
    else:
        op.drop_constraint("images_folder_id_path_content_hash_key", "images", type_="unique")
        op.create_unique_constraint("images_path_content_hash_key", "images", ["path", "content_hash"])
        op.drop_constraint("images_folder_id_fkey", "images", type_="foreignkey")
        op.drop_column("images", "folder_id")
    op.drop_table("folders")
