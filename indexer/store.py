"""The metadata database: the one place the schema is defined (SQLAlchemy 2.0).

The schema has a revision; `migrations/` holds the Alembic steps from each to the next, and
every process that opens the database brings it to `SCHEMA_REVISION` first (`migrate_schema`).
FAISS ids are the primary keys of `images` and `captions`. Rows are immutable once
written: a changed file gets a new row, and rows that the newly published build no
longer holds are deleted in the same transaction that publishes it, so a reader of the
previous build never sees a row change under it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, UniqueConstraint,
                        create_engine, delete, event, func, insert, inspect, select, text, update)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload, sessionmaker

from crossmodal.indexer.collection import hash_bytes
from crossmodal.indexer.folders import unique_folder_name
from crossmodal.indexer.prefetch import read_ahead_in_child_process


# The newest revision in migrations/versions (a test holds the two equal). Checked with one
# query at open; Alembic itself is imported only when an upgrade is due (it costs 0.3-0.6 s).
SCHEMA_REVISION = "0004"


class BuildInProgress(RuntimeError):
    """Another build holds the build lock of this index."""


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to this version's."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Build(Base):
    """One run of the indexer; the newest `published` one is what search serves."""

    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="building")  # building|published|superseded|failed
    model: Mapped[str] = mapped_column(String(512))
    dim: Mapped[int] = mapped_column(Integer, default=0)
    image_index_type: Mapped[str] = mapped_column(String(128), default="")
    caption_index_type: Mapped[str] = mapped_column(String(128), default="")
    collection_root: Mapped[str] = mapped_column(Text)
    captions_file: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_images: Mapped[int] = mapped_column(Integer, default=0)
    n_captions: Mapped[int] = mapped_column(Integer, default=0)
    n_embedded: Mapped[int] = mapped_column(Integer, default=0)
    n_reused: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)


class FolderRow(Base):
    """A folder of images the index holds; an index holds one or several (issue 20). `name` is unique
    in the index: with several folders a photo's path is shown as name/path-in-folder."""

    __tablename__ = "folders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)  # absolute, resolved
    name: Mapped[str] = mapped_column(String(255), unique=True)
    captions_file: Mapped[str | None] = mapped_column(Text, nullable=True)  # the captions file it was read with last
    added_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("folder_id", "path", "content_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    folder_id: Mapped[int] = mapped_column(ForeignKey("folders.id"), index=True)
    path: Mapped[str] = mapped_column(Text, index=True)  # relative to its folder, '/' separators
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    # Photo facts (collection.PhotoFacts), for filters; taken_from NULL: not read yet (rows from before 0003)
    taken_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    taken_from: Mapped[str | None] = mapped_column(String(8), nullable=True)  # exif|mtime
    camera_make: Mapped[str | None] = mapped_column(String(128), nullable=True)
    camera_model: Mapped[str | None] = mapped_column(String(128), nullable=True)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"))
    captions: Mapped[list["CaptionRow"]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="CaptionRow.id")


class CaptionRow(Base):
    __tablename__ = "captions"
    __table_args__ = (UniqueConstraint("image_id", "text"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(String(64), index=True)  # its vector's key: caption_key(text)
    image: Mapped[ImageRow] = relationship(back_populates="captions")


class Embedding(Base):
    """Vectors by content: an image's by its file hash, a text's by its text hash, per model."""

    __tablename__ = "embeddings"
    model: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # image|text
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class JobRow(Base):
    """A rebuild started through the API; in the database so that every replica can report it."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # queued|running|done|failed
    action: Mapped[str | None] = mapped_column(String(16), nullable=True)  # replace|add|remove|rescan (0004)
    collection: Mapped[str] = mapped_column(Text)
    captions: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


# The keyword index (hybrid search) is not a model: on SQLite it is an FTS5 virtual table with
# shadow tables, on PostgreSQL a table with a GIN full-text index; migration 0003 creates it.
# Documents: one per caption (doc id = caption id), one per image file name (doc id = -image id).
KEYWORDS = "keywords"
STOPWORDS = frozenset("a an and are as at be by for from has in into is it its of on or the their to with".split())


def described_by_models(name: str | None, type_: str, _parent: object) -> bool:
    """Alembic's include_name: autogenerate compares the models' tables, not the keyword index's
    (made by hand in 0003; FTS5 adds shadow tables keywords_data, keywords_idx, ...)."""
    return not (type_ == "table" and (name == KEYWORDS or (name or "").startswith(KEYWORDS + "_")))


def path_keywords(path: str) -> str:
    """The words of a file's path ("dogs/rex_on_beach.jpg" -> "dogs rex on beach jpg")."""
    return " ".join(re.split(r"[\W_]+", path)).strip()


def query_words(text: str) -> list[str]:
    """A query's words for the keyword index: letters and digits only (nothing reaches it as syntax),
    no stopwords (BM25 barely weighs them, and they match nearly every caption)."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS]
    return list(dict.fromkeys(words))[:32]


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers keep reading while a build writes
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _available_memory() -> int:
    """Bytes of memory available to new page cache (Linux MemAvailable; 0 where unknown)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
            return int(line.split()[1]) * 1024
    return 0


def _sqlite_file(url: str) -> Path | None:
    database = make_url(url).database if url.startswith("sqlite") else None
    return Path(database) if database and database != ":memory:" else None


def create_db_engine(url: str, migrate: bool = True) -> Engine:
    """An engine for any SQLAlchemy URL, its schema at SCHEMA_REVISION; SQLite gets WAL and foreign keys."""
    if url.startswith("sqlite"):
        if database := _sqlite_file(url):
            database.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if migrate:
        migrate_schema(engine)
    return engine


def schema_revision(engine: Engine) -> str | None:
    """The database's schema revision; None for an empty database and for one made before
    migrations existed (wave 1, revision 0001 without the stamp)."""
    with engine.connect() as connection:
        return _revision(connection)


def _revision(connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def migrate_schema(engine: Engine) -> None:
    """Create or upgrade the schema in place, one process at a time; a no-op (one query) at head."""
    if schema_revision(engine) == SCHEMA_REVISION:
        return
    with _migration_lock(engine), engine.begin() as connection:
        current = _revision(connection)
        if current == SCHEMA_REVISION:
            return  # another process upgraded it while we waited
        _run_alembic(connection, current)


def _run_alembic(connection, current: str | None) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.attributes["connection"] = connection
    known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
    if current is not None and current not in known:
        raise SchemaError(f"the database is at schema revision {current}, which this crossmodal does not know "
                          f"(it knows up to {SCHEMA_REVISION}): it was written by a newer crossmodal; "
                          "upgrade this one (pip install -U crossmodal)")
    if current is None and inspect(connection).has_table("builds"):
        command.stamp(config, "0001")  # made before migrations existed: wave 1's schema
    try:
        command.upgrade(config, "head")
    except Exception as err:
        raise SchemaError(f"upgrading the database schema from revision {current or '0001'} to "
                          f"{SCHEMA_REVISION} failed ({type(err).__name__}: {err}); nothing was changed where the "
                          "database supports transactional DDL (PostgreSQL). Fix the cause, then run "
                          "`crossmodal migrate`") from err


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """PostgreSQL: an advisory lock; SQLite: a lock file beside the database (never the database
    file itself, whose POSIX locks any open and close in this process would drop)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _lock_key("migrate")})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key("migrate")})
        return
    database = _sqlite_file(str(engine.url))
    if database is None:
        yield
        return
    with open(database.with_name(f".{database.name}.migrate.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _lock_key(name: str) -> int:
    """A stable 32-bit advisory-lock key per purpose (PostgreSQL takes a bigint)."""
    return zlib.crc32(f"crossmodal:{name}".encode())


class Store:
    """The repository: sessions, and every query the indexer, search, eval and check run.

    Methods open their own session; the module's functions that take a `Session` run inside
    a transaction the caller holds (a batch of a build, the publish switch).
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = create_db_engine(url)
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def prefetch_into_page_cache(self, max_share_of_free_memory: float = 0.5) -> bool:
        """Ask the OS to read a SQLite database file into its page cache, in the background.

        Search reads rows at random places for every query: the hits' metadata, and for a
        build without ExactVectors files, the 100 re-rank candidates' vectors. On cold pages
        those vectors measured 19.7 ms per query at 100k against 14.2 ms warm. The kernel
        reads ahead on its own I/O; nothing is copied into this process. The files are opened in
        a child process only: this process's SQLite connections hold POSIX locks on them, which
        any open and close here would drop (see prefetch.read_ahead_in_child_process). Skipped where the file
        would take more than `max_share_of_free_memory` of available memory, for other
        databases, and where the OS has no posix_fadvise. True when a prefetch started.
        """
        database = make_url(self.url).database if self.url.startswith("sqlite") else None
        if not database or database == ":memory:" or not hasattr(os, "posix_fadvise"):
            return False
        files = [Path(database + suffix) for suffix in ("", "-wal") if Path(database + suffix).is_file()]
        size = sum(f.stat().st_size for f in files)
        if not files or size > max_share_of_free_memory * _available_memory():
            return False

        read_ahead_in_child_process(files)
        return True

    @contextlib.contextmanager
    def build_lock(self, index_dir: Path) -> Iterator[None]:
        """One build at a time, released automatically when its holder dies: on PostgreSQL an
        advisory lock (across every machine sharing the database), on SQLite a lock file in the
        index directory (across the processes of one machine)."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as connection:
                held = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": _lock_key("build")})
                if not held.scalar():
                    raise BuildInProgress("another build is running on this database")
                connection.commit()  # the lock is the session's; no transaction stays open meanwhile
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _lock_key("build")})
                    connection.commit()
            return
        index_dir.mkdir(parents=True, exist_ok=True)
        with open(index_dir / ".build.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise BuildInProgress(f"another build is running on {index_dir}") from err
            yield

    def published_build(self) -> Build | None:
        with self.session() as s:
            return s.scalars(select(Build).where(Build.status == "published").order_by(Build.id.desc())).first()

    def last_build(self) -> Build | None:
        with self.session() as s:
            return s.scalars(select(Build).order_by(Build.id.desc())).first()

    # -- builds ----------------------------------------------------------------------------------

    def start_build(self, root: str, captions_file: str | None, model: str) -> int:
        """A new build row; builds left 'building' by a killed process are over (their embeddings stay)."""
        with self.session() as s, s.begin():
            s.execute(update(Build).where(Build.status == "building").values(status="failed"))
            build = Build(model=model, collection_root=root, captions_file=captions_file)
            s.add(build)
            s.flush()
            return build.id

    def discard_build(self, build_id: int) -> None:
        """Forget a build that wrote nothing (a re-run that found nothing changed)."""
        with self.session() as s, s.begin():
            s.execute(delete(Build).where(Build.id == build_id, Build.status == "building"))

    def fail_build(self, build_id: int, error: str) -> None:
        with self.session() as s, s.begin():
            s.execute(update(Build).where(Build.id == build_id).values(
                status="failed", finished_at=utcnow(), report={"error": error}))

    def previous_published(self, build_id: int) -> list[int]:
        """The build that the published `build_id` superseded, if any (readers may still use it)."""
        with self.session() as s:
            return list(s.scalars(select(Build.id).where(Build.status == "superseded", Build.id < build_id)
                                  .order_by(Build.id.desc()).limit(1)))

    # -- rows --------------------------------------------------------------------------------------

    def image_rows_by_path(self, folder_ids: set[int]) -> dict[tuple[int, str], list]:
        """What tells a file unchanged, of the image rows of these folders, by (folder id, path): their id,
        content hash, bytes, mtime and taken_from (plain rows: ORM objects took 0.13 s at 7,000)."""
        with self.engine.connect() as connection:
            rows: dict[tuple[int, str], list] = {}
            for row in connection.execute(select(ImageRow.id, ImageRow.folder_id, ImageRow.path, ImageRow.content_hash,
                                                 ImageRow.bytes, ImageRow.mtime, ImageRow.taken_from)
                                          .where(ImageRow.folder_id.in_(folder_ids))):
                rows.setdefault((row.folder_id, row.path), []).append(row)
            return rows

    # -- folders -----------------------------------------------------------------------------------

    def folders(self) -> list[FolderRow]:
        """The folders of the index, in the order they were added."""
        with self.session() as s:
            return list(s.scalars(select(FolderRow).order_by(FolderRow.id)))

    def folder_rows(self, paths: Sequence[Path], captions_files: dict[Path, Path]) -> list[FolderRow]:
        """The rows of these folders (absolute paths), made for those new to the index, each with a name
        no other folder has; each remembers the captions file it was read with last (`captions_files`)."""
        with self.session() as s, s.begin():
            known = {row.path: row for row in s.scalars(select(FolderRow))}
            taken = {row.name for row in known.values()}
            rows = []
            for path in paths:
                row = known.get(str(path))
                if row is None:
                    row = known[str(path)] = FolderRow(path=str(path), name=unique_folder_name(path, taken))
                    taken.add(row.name)
                    s.add(row)
                if path in captions_files:
                    row.captions_file = str(captions_files[path])
                rows.append(row)
            s.flush()
            return rows

    def build_statuses(self) -> dict[int, str]:
        with self.session() as s:
            return dict(s.execute(select(Build.id, Build.status)).all())

    def image_keys(self) -> dict[int, str]:
        """{image row id: content hash} of every image row."""
        with self.session() as s:
            return dict(s.execute(select(ImageRow.id, ImageRow.content_hash)).all())

    def image_keys_in(self, ids: set[int], folder_ids: set[int]) -> dict[int, str]:
        """{image row id: content hash} of these rows that lie in these folders."""
        with self.session() as s:
            return {i: key for i, key in s.execute(select(ImageRow.id, ImageRow.content_hash)
                                                   .where(ImageRow.folder_id.in_(folder_ids))) if i in ids}

    def caption_keys(self) -> dict[int, str]:
        """{caption row id: caption key} of every caption row."""
        with self.session() as s:
            return dict(s.execute(select(CaptionRow.id, CaptionRow.key)).all())

    def image_paths(self) -> dict[int, str]:
        """{image row id: its path in its folder}."""
        with self.session() as s:
            return dict(s.execute(select(ImageRow.id, ImageRow.path)).all())

    def image_paths_in(self, folder_ids: set[int]) -> dict[int, str]:
        """{image row id: its path in its folder} of the rows in these folders."""
        with self.session() as s:
            return dict(s.execute(select(ImageRow.id, ImageRow.path).where(ImageRow.folder_id.in_(folder_ids))).all())

    def image_files(self) -> dict[int, Path]:
        """{image row id: its file (its folder's path / its path)}."""
        with self.session() as s:
            return {i: Path(folder) / path for i, folder, path in s.execute(
                select(ImageRow.id, FolderRow.path, ImageRow.path).join(FolderRow, ImageRow.folder_id == FolderRow.id))}

    def embeddings(self, model: str, kind: str, keys: list[str]) -> dict[str, bytes]:
        with self.session() as s:
            return load_embeddings(s, model, kind, keys)

    def captioned_images(self) -> list[tuple[int, int, str, str]]:
        """(caption id, image id, caption key, image content hash) of every caption."""
        with self.session() as s:
            return [tuple(row) for row in s.execute(
                select(CaptionRow.id, CaptionRow.image_id, CaptionRow.key, ImageRow.content_hash)
                .join(ImageRow, CaptionRow.image_id == ImageRow.id))]

    def image_hits(self, ids: list[int]) -> dict[int, tuple[int, str, int, int, list[str]]]:
        """Folder id, path, width, height and captions of each image id, in one query: ORM objects loaded
        with their captions took 0.65 ms more a search (1.55 against 0.91 ms at 100k)."""
        found: dict[int, tuple[int, str, int, int, list[str]]] = {}
        query = (select(ImageRow.id, ImageRow.folder_id, ImageRow.path, ImageRow.width, ImageRow.height,
                        CaptionRow.text)
                 .outerjoin(CaptionRow, CaptionRow.image_id == ImageRow.id)
                 .where(ImageRow.id.in_(ids)).order_by(CaptionRow.id))
        with self.engine.connect() as connection:
            for image_id, folder_id, path, width, height, text in connection.execute(query):
                captions = found.setdefault(image_id, (folder_id, path, width, height, []))[4]
                if text is not None:
                    captions.append(text)
        return found

    def caption_hits(self, ids: list[int]) -> dict[int, tuple[str, int, int, str]]:
        """Text, image id, image folder id and image path of each caption id, in one query."""
        query = (select(CaptionRow.id, CaptionRow.text, CaptionRow.image_id, ImageRow.folder_id, ImageRow.path)
                 .join(ImageRow, CaptionRow.image_id == ImageRow.id).where(CaptionRow.id.in_(ids)))
        with self.engine.connect() as connection:
            return {row[0]: tuple(row[1:]) for row in connection.execute(query)}

    def image(self, image_id: int) -> ImageRow | None:
        """An image row with its captions loaded."""
        with self.session() as s:
            return s.scalars(select(ImageRow).options(selectinload(ImageRow.captions))
                             .where(ImageRow.id == image_id)).first()

    def vectors_by_id(self, model: str, kind: str, ids: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of image (kind "image") or caption ("caption") rows, by row id.

        Rows name their vectors by content: an image by its file hash, a caption by its key (its
        text's hash). Two queries, the embeddings found by primary key (as one join, SQLite scanned
        them: 1.3 s at 100k).
        """
        with self.engine.connect() as connection:
            table = ImageRow if kind == "image" else CaptionRow
            key = ImageRow.content_hash if kind == "image" else CaptionRow.key
            keys = dict(connection.execute(select(table.id, key).where(table.id.in_(ids))).all())
            blobs = dict(connection.execute(select(Embedding.key, Embedding.vector).where(
                Embedding.model == model, Embedding.kind == ("image" if kind == "image" else "text"),
                Embedding.key.in_(set(keys.values())))).all())
        return {i: np.frombuffer(blobs[key], dtype=np.float32) for i, key in keys.items() if key in blobs}

    def photo_attributes(self, ids: set[int], caption_ids: set[int] | None = None) -> tuple[list[tuple], list[tuple]]:
        """((id, folder id, path, width, height, taken_at, taken_from, camera_make, camera_model) of these
        image rows, (caption id, image id) of their captions, of `caption_ids` where given): what
        attributes.py tabulates for filters."""
        with self.engine.connect() as connection:
            rows = [tuple(row) for row in connection.execute(
                select(ImageRow.id, ImageRow.folder_id, ImageRow.path, ImageRow.width, ImageRow.height, ImageRow.taken_at,
                       ImageRow.taken_from, ImageRow.camera_make, ImageRow.camera_model)) if row[0] in ids]
            captions = [(caption_id, image_id) for caption_id, image_id in connection.execute(
                select(CaptionRow.id, CaptionRow.image_id))
                if image_id in ids and (caption_ids is None or caption_id in caption_ids)]
        return rows, captions

    def keyword_search(self, query: str, limit: int, exclude_docs: Sequence[int] = ()) -> list[tuple[int, float]]:
        """(image id, score) of the images whose captions or file name best match `query`'s words,
        best first: BM25 on SQLite (FTS5), ts_rank on PostgreSQL. An image scores by its best document;
        `exclude_docs` leaves documents out (eval: the query's own caption, or all its photo's)."""
        words = query_words(query)
        if not words:
            return []
        excluded = ",".join(str(int(doc)) for doc in exclude_docs) or "0"  # doc ids are never 0
        params = {"limit": limit}
        if self.engine.dialect.name == "sqlite":
            params["match"] = " OR ".join(f'"{w}"' for w in words)
            sql = text("SELECT image_id, -min(bm) AS score FROM (SELECT image_id, bm25(keywords) AS bm "
                       f"FROM keywords WHERE keywords MATCH :match AND rowid NOT IN ({excluded}) ORDER BY bm "
                       "LIMIT :depth) GROUP BY image_id ORDER BY score DESC, image_id LIMIT :limit")
            params["depth"] = limit * 8
        else:
            params["match"] = " | ".join(words)
            sql = text("SELECT image_id, max(ts_rank(to_tsvector('english', text), q)) AS score "
                       "FROM keywords, to_tsquery('english', :match) AS q "
                       f"WHERE to_tsvector('english', text) @@ q AND doc_id NOT IN ({excluded}) "
                       "GROUP BY image_id ORDER BY score DESC, image_id LIMIT :limit")
        with self.engine.connect() as connection:
            return [(int(i), float(score)) for i, score in connection.execute(sql, params)]

    # -- rebuild jobs ------------------------------------------------------------------------------

    def add_job(self, job: JobRow, stale_before: datetime) -> bool:
        """Insert `job` unless another is queued or running (and heard from since `stale_before`).

        Jobs whose service went silent before `stale_before` are marked failed first: a
        service killed mid-rebuild never finishes its job itself.
        """
        with self.session() as s, s.begin():
            s.execute(update(JobRow).where(JobRow.state.in_(("queued", "running")), JobRow.updated_at < stale_before)
                      .values(state="failed", finished_at=utcnow(),
                              error="the service running this rebuild stopped before it finished"))
            if s.scalars(select(JobRow.id).where(JobRow.state.in_(("queued", "running")))).first():
                return False
            s.add(job)
        return True

    def update_job(self, job_id: str, **fields: Any) -> None:
        with self.session() as s, s.begin():
            s.execute(update(JobRow).where(JobRow.id == job_id).values(updated_at=utcnow(), **fields))

    def job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def jobs(self, limit: int = 100) -> list[JobRow]:
        """The newest jobs first."""
        with self.session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created_at.desc()).limit(limit)))

    def close(self) -> None:
        self.engine.dispose()


def caption_key(text: str) -> str:
    """The content key a caption's vector is stored under (the hash of its text)."""
    return hash_bytes(text.encode())


def vector_to_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def vectors_from_bytes(blobs: list[bytes], dim: int) -> np.ndarray:
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), dim)


def save_embeddings(session: Session, model: str, kind: str, keys: list[str], vectors: np.ndarray) -> None:
    """Vectors by content key, for load_embeddings to find on any later build (one bulk insert)."""
    session.execute(insert(Embedding), [{"model": model, "kind": kind, "key": key, "vector": vector_to_bytes(vector)}
                                        for key, vector in zip(keys, vectors)])


def load_embeddings(session: Session, model: str, kind: str, keys: list[str]) -> dict[str, bytes]:
    """Stored vectors for these keys (missing keys are simply absent)."""
    found: dict[str, bytes] = {}
    for chunk in _chunks(keys):
        rows = session.execute(select(Embedding.key, Embedding.vector).where(
            Embedding.model == model, Embedding.kind == kind, Embedding.key.in_(chunk)))
        found.update(dict(rows.all()))
    return found


def embedding_keys(session: Session, model: str, kind: str, keys: list[str]) -> set[str]:
    """Which of these keys have a stored vector, reading keys only: deciding what to embed needs no
    vectors (they are read once, where the index is written). Asked about most of the stored keys,
    one pass over them all is faster than lookups 900 at a time (35,000 captions: 0.16 s to 0.03 s)."""
    found: set[str] = set()
    stored = select(Embedding.key).where(Embedding.model == model, Embedding.kind == kind)
    if len(keys) > 2000 and 2 * len(keys) >= session.scalar(select(func.count()).select_from(stored.subquery())):
        wanted = set(keys)
        return {key for key in session.scalars(stored) if key in wanted}
    for chunk in _chunks(keys):
        found.update(session.scalars(select(Embedding.key).where(
            Embedding.model == model, Embedding.kind == kind, Embedding.key.in_(chunk))))
    return found


def image_row_ids(s: Session, files: list[dict[str, Any]]) -> list[int]:
    """Row ids of these files (path, content_hash, bytes, mtime, width, height, build_id and the
    photo facts taken_at, taken_from, camera_make, camera_model), in order.

    A file whose (path, content) has a row keeps it (its size and mtime updated); a changed
    file gets a new row. One query and one bulk insert of plain rows: with the vectors' single
    insert, database work in a build went from 0.13 ms a photo (ORM objects) to 0.05 ms.
    """
    existing = {(folder_id, path, content_hash): row_id for row_id, folder_id, path, content_hash in s.execute(
        select(ImageRow.id, ImageRow.folder_id, ImageRow.path, ImageRow.content_hash).where(
            ImageRow.path.in_({f["path"] for f in files})))}
    touched, new = {}, {}
    for f in files:
        key = (f["folder_id"], f["path"], f["content_hash"])
        if key in existing:
            touched[existing[key]] = {"id": existing[key], "bytes": f["bytes"], "mtime": f["mtime"],
                                      **{name: f[name] for name in _FACTS}}
        else:
            new[key] = f
    if touched:
        s.execute(update(ImageRow), list(touched.values()))
    if new:
        ids = list(s.scalars(insert(ImageRow).returning(ImageRow.id, sort_by_parameter_order=True),
                             list(new.values())))
        existing.update(zip(new, ids))
        add_keyword_docs(s, [(-i, i, path_keywords(path)) for (_, path, _), i in zip(new, ids)])
    return [existing[(f["folder_id"], f["path"], f["content_hash"])] for f in files]


_FACTS = ("taken_at", "taken_from", "camera_make", "camera_model")


def add_keyword_docs(s: Session, docs: list[tuple[int, int, str]]) -> None:
    """(doc id, image id, text) into the keyword index, in the caller's transaction with their rows."""
    if docs:
        column = "rowid" if s.get_bind().dialect.name == "sqlite" else "doc_id"
        s.execute(text(f"INSERT INTO {KEYWORDS} ({column}, image_id, text) VALUES (:doc, :image, :text)"),
                  [{"doc": doc, "image": image, "text": words} for doc, image, words in docs])


def _delete_keyword_docs(s: Session, docs: list[int]) -> None:
    column = "rowid" if s.get_bind().dialect.name == "sqlite" else "doc_id"
    for chunk in _chunks(docs):
        s.execute(text(f"DELETE FROM {KEYWORDS} WHERE {column} IN ({','.join(str(int(d)) for d in chunk)})"))


def image_sizes(s: Session, content_hashes: list[str]) -> dict[str, tuple[int, int]]:
    """{content hash: (width, height)} of the images with these contents that have rows."""
    found: dict[str, tuple[int, int]] = {}
    for chunk in _chunks(content_hashes):
        found.update({h: (w, ht) for h, w, ht in s.execute(
            select(ImageRow.content_hash, ImageRow.width, ImageRow.height).where(ImageRow.content_hash.in_(chunk)))})
    return found


def image_ids_by_path(s: Session, folder_id: int) -> dict[str, int]:
    """{path: image row id} of a folder's rows."""
    return dict(s.execute(select(ImageRow.path, ImageRow.id).where(ImageRow.folder_id == folder_id)).all())


def caption_row_ids(s: Session, wanted: list[tuple[int, str]]) -> dict[tuple[int, str], int]:
    """{(image id, text): caption row id}: rows that exist are kept, the others bulk-inserted."""
    existing = {(image_id, text): row_id for row_id, image_id, text in s.execute(
        select(CaptionRow.id, CaptionRow.image_id, CaptionRow.text))}
    new = [key for key in wanted if key not in existing]
    if new:
        rows = [{"image_id": image_id, "text": text, "key": caption_key(text)} for image_id, text in new]
        ids = list(s.scalars(insert(CaptionRow).returning(CaptionRow.id, sort_by_parameter_order=True), rows))
        existing.update(zip(new, ids))
        add_keyword_docs(s, [(caption_id, image_id, text) for (image_id, text), caption_id in zip(new, ids)])
    return {key: existing[key] for key in wanted}


def publish_build(s: Session, build_id: int, images: dict[int, str], captions: dict[int, str], model: str,
                  folder_ids: set[int], fields: dict[str, Any]) -> int:
    """The atomic switch, inside the caller's transaction: rows, folders and vectors the new build does
    not use go, the previous build is superseded, this one published with `fields`. Returns
    the number of image rows removed."""
    stale_images = [i for i in s.scalars(select(ImageRow.id)) if i not in images]
    stale_image_set = set(stale_images)
    stale_captions = [i for i, image_id in s.execute(select(CaptionRow.id, CaptionRow.image_id))
                      if i not in captions or image_id in stale_image_set]
    _delete_keyword_docs(s, stale_captions + [-i for i in stale_images])
    for chunk in _chunks(stale_captions):
        s.execute(delete(CaptionRow).where(CaptionRow.id.in_(chunk)))
    for chunk in _chunks(stale_images):
        s.execute(delete(CaptionRow).where(CaptionRow.image_id.in_(chunk)))
        s.execute(delete(ImageRow).where(ImageRow.id.in_(chunk)))
    s.execute(delete(FolderRow).where(FolderRow.id.not_in(folder_ids)))
    _drop_unused_embeddings(s, model, set(images.values()), set(captions.values()))
    s.execute(update(Build).where(Build.status == "published").values(status="superseded"))
    s.execute(update(Build).where(Build.id == build_id).values(status="published", finished_at=utcnow(), **fields))
    return len(stale_images)


def set_build_report(s: Session, build_id: int, report: dict[str, Any]) -> None:
    s.execute(update(Build).where(Build.id == build_id).values(report=report))


def _drop_unused_embeddings(s: Session, model: str, image_keys: set[str], text_keys: set[str]) -> None:
    """Keep the stored vectors the published build uses; other models' vectors go."""
    s.execute(delete(Embedding).where(Embedding.model != model))
    for kind, keep in (("image", image_keys), ("text", text_keys)):
        unused = [k for k in s.scalars(select(Embedding.key).where(Embedding.model == model,
                                                                    Embedding.kind == kind)) if k not in keep]
        for chunk in _chunks(unused):
            s.execute(delete(Embedding).where(Embedding.model == model, Embedding.kind == kind,
                                              Embedding.key.in_(chunk)))


def _chunks(items: list, size: int = 900) -> Iterator[list]:
    """Stay under SQLite's bound-parameter limit."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def dumps_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
