"""The metadata database: the one place the schema is defined (SQLAlchemy 2.0).

FAISS ids are the primary keys of `images` and `captions`. Rows are immutable once
written: a changed file gets a new row, and rows that the newly published build no
longer holds are deleted in the same transaction that publishes it, so a reader of the
previous build never sees a row change under it.
"""
from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text,
                        UniqueConstraint, create_engine, event, insert, select)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from crossmodal.indexer.collection import hash_bytes
from crossmodal.indexer.prefetch import read_ahead_in_child_process


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


class ImageRow(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("path", "content_hash"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, index=True)  # relative to the collection root, '/' separators
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mtime: Mapped[float] = mapped_column(Float)
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id"))
    captions: Mapped[list["CaptionRow"]] = relationship(
        back_populates="image", cascade="all, delete-orphan", order_by="CaptionRow.id")


class CaptionRow(Base):
    __tablename__ = "captions"
    __table_args__ = (UniqueConstraint("image_id", "text"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    image: Mapped[ImageRow] = relationship(back_populates="captions")


class Embedding(Base):
    """Vectors by content: an image's by its file hash, a text's by its text hash, per model."""

    __tablename__ = "embeddings"
    model: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)  # image|text
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


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


def create_db_engine(url: str) -> Engine:
    """An engine for any SQLAlchemy URL; SQLite gets WAL and foreign keys."""
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    return engine


class Store:
    """Sessions plus the few queries that both the indexer and search need."""

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

    def published_build(self) -> Build | None:
        with self.session() as s:
            return s.scalars(select(Build).where(Build.status == "published").order_by(Build.id.desc())).first()

    def last_build(self) -> Build | None:
        with self.session() as s:
            return s.scalars(select(Build).order_by(Build.id.desc())).first()

    def vectors_by_id(self, model: str, kind: str, ids: list[int]) -> dict[int, np.ndarray]:
        """The stored vectors of image (kind "image") or caption ("caption") rows, by row id.

        Rows name their vectors by content: an image by its file hash, a caption by its text's
        hash. Two queries, the embeddings found by primary key (as one join, SQLite scanned
        them: 1.3 s at 100k).
        """
        with self.engine.connect() as connection:
            if kind == "image":
                keys = dict(connection.execute(
                    select(ImageRow.id, ImageRow.content_hash).where(ImageRow.id.in_(ids))).all())
            else:
                keys = {i: caption_key(text) for i, text in
                        connection.execute(select(CaptionRow.id, CaptionRow.text).where(CaptionRow.id.in_(ids))).all()}
            blobs = dict(connection.execute(select(Embedding.key, Embedding.vector).where(
                Embedding.model == model, Embedding.kind == ("image" if kind == "image" else "text"),
                Embedding.key.in_(set(keys.values())))).all())
        return {i: np.frombuffer(blobs[key], dtype=np.float32) for i, key in keys.items() if key in blobs}

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
    for start in range(0, len(keys), 900):  # stay under SQLite's bound-parameter limit
        chunk = keys[start:start + 900]
        rows = session.execute(select(Embedding.key, Embedding.vector).where(
            Embedding.model == model, Embedding.kind == kind, Embedding.key.in_(chunk)))
        found.update(dict(rows.all()))
    return found


def dumps_report(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)
