"""Read-only search over the published build: what the CLI and the service query.

The engine holds one immutable `Snapshot` (manifest + FAISS indexes) and swaps it for a
newer one in a single reference assignment, so a query in flight keeps using the
snapshot it started with and never sees a half-swapped state.
"""
from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from indexer import faiss_index, hubness
from indexer.collection import hash_bytes
from indexer.encoder import Encoder, load_encoder
from indexer.hubness import Penalties
from indexer.settings import Settings
from indexer.store import Build, CaptionRow, Embedding, ImageRow, Store, load_embeddings


T = TypeVar("T")


class NoIndex(RuntimeError):
    """Nothing has been published in this index directory yet."""


class NotFound(KeyError):
    pass


@dataclass(frozen=True)
class ImageHit:
    id: int
    score: float
    path: str
    width: int
    height: int
    captions: list[str]


@dataclass(frozen=True)
class CaptionHit:
    id: int
    score: float
    text: str
    image_id: int
    image_path: str


@dataclass(frozen=True)
class Snapshot:
    build: Build
    manifest: faiss_index.Manifest
    images: faiss.Index
    captions: faiss.Index
    collection_root: Path
    image_penalties: Penalties | None = None  # hubness correction of text -> image search
    caption_penalties: Penalties | None = None  # ... and of image -> caption search


@dataclass
class TextCache:
    """LRU of query text -> vector; repeated and paged queries skip the text encoder."""

    size: int = 4096
    _items: OrderedDict = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        with self._lock:
            vector = self._items.get(key)
            if vector is not None:
                self._items.move_to_end(key)
            return vector

    def put(self, key: tuple[str, str], vector: np.ndarray) -> None:
        with self._lock:
            self._items[key] = vector
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class ModelThread:
    """The one thread on which the service runs its model: loading, text and image encoding.

    torch's OpenMP runtime keeps a team of worker threads for each thread that calls it.
    With a second calling thread it manages more threads than there are cores and stops
    spinning between parallel regions, so every small op of a text query pays a wake-up:
    measured on 2 cores, a text encoding took 7.3 ms when the model was loaded on one thread
    and run on another, 5.6 ms with one thread for both; over HTTP at 100k vectors, p50 was
    14.3-14.4 ms against 15.4-17.9 ms with a text-only worker thread. One thread also means
    one pass at a time (torch already uses every core for each), and text queries that wait
    together are encoded as one batch: under load, N queries cost about one pass, not N.
    """

    _STOP = object()

    def __init__(self, max_batch: int = 32):
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="model", daemon=True).start()

    def call(self, fn: Callable[..., T], *args) -> T:
        """fn(*args), run on the model thread; its exception is raised here."""
        return self._submit("call", fn, args)

    def encode_text(self, encoder: Encoder, text: str) -> np.ndarray:
        return self._submit("text", encoder, text)

    def close(self) -> None:
        """Work already queued is still done; then the thread ends."""
        self._queue.put(self._STOP)

    def _submit(self, kind: str, target, payload):
        future: Future = Future()
        self._queue.put((kind, target, payload, future))
        return future.result()

    def _work(self) -> None:
        held = None  # taken from the queue while gathering a batch: handled next
        while True:
            item = held if held is not None else self._queue.get()
            held = None
            if item is self._STOP:
                return
            kind, target, payload, future = item
            if kind == "call":
                _settle(future, target, *payload)
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    queued = self._queue.get_nowait()
                except queue.Empty:
                    break
                if queued is self._STOP or queued[0] != "text" or queued[1] is not target:
                    held = queued
                    break
                batch.append(queued)
            self._encode_texts(target, batch)

    @staticmethod
    def _encode_texts(encoder: Encoder, batch: list[tuple]) -> None:
        try:
            vectors = encoder.encode_texts([text for _, _, text, _ in batch])
        except Exception as err:  # reported to every waiting query; the thread lives on
            for *_, future in batch:
                future.set_exception(err)
            return
        for (*_, future), vector in zip(batch, vectors):
            future.set_result(vector)


def _settle(future: Future, fn: Callable, *args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as err:  # noqa: BLE001 - handed to the caller, who raises it
        future.set_exception(err)


class SearchEngine:
    def __init__(self, settings: Settings, encoder: Encoder | None = None, store: Store | None = None):
        self.settings = settings
        self.store = store or Store(settings.resolved_database_url())
        self._encoder = encoder
        self._model = ModelThread()
        weakref.finalize(self, self._model.close)  # the thread ends with the engine
        self._snapshot: Snapshot | None = None
        self.text_cache = TextCache()
        self.reload()
        self.store.prefetch_into_page_cache()  # the re-rank reads exact vectors at random places

    # -- loading -----------------------------------------------------------------------------

    @property
    def has_index(self) -> bool:
        return self._snapshot is not None

    @property
    def snapshot(self) -> Snapshot:
        if self._snapshot is None:
            raise NoIndex(f"no published index in {self.settings.index_dir}: run `crossmodal index FOLDER` first")
        return self._snapshot

    @property
    def encoder(self) -> Encoder:
        snapshot = self.snapshot
        if self._encoder is None or self._encoder.name != snapshot.manifest.model:
            self._encoder = self._model.call(load_encoder, snapshot.manifest.model, self.settings.device)
        return self._encoder

    def reload(self) -> bool:
        """Load the newest published build if it is not the one in use; True when swapped."""
        build = self.store.published_build()
        if build is None or (self._snapshot is not None and self._snapshot.build.id == build.id):
            return False
        build_dir = faiss_index.build_dir_for(self.settings.index_dir, build.id)
        manifest = faiss_index.Manifest.read(build_dir)
        use_gpu = self.settings.use_gpu_faiss
        images, captions = (faiss_index.read_index(build_dir / name, manifest.search_params, use_gpu)
                            for name in (faiss_index.IMAGES_FILE, faiss_index.CAPTIONS_FILE))
        image_penalties, caption_penalties = hubness.load_build_penalties(build_dir, self.settings.hubness_correction)
        snapshot = Snapshot(build, manifest, images, captions, Path(build.collection_root),
                            image_penalties, caption_penalties)
        if self._encoder is not None and self._encoder.name != manifest.model:
            self._encoder = None  # the new build was made with another model
        self._snapshot = snapshot
        self.encoder  # load (or keep) the build's encoder before queries arrive
        self.text_cache = TextCache()
        logging.getLogger(__name__).info("serving build %d (%s)", build.id, manifest.model)
        return True

    # -- query vectors -----------------------------------------------------------------------

    def text_vector(self, text: str) -> np.ndarray:
        encoder = self.encoder
        key = (encoder.name, text)
        vector = self.text_cache.get(key)
        if vector is None:
            vector = self._model.encode_text(encoder, text)
            self.text_cache.put(key, vector)
        return vector

    def image_vector(self, image: Image.Image) -> np.ndarray:
        encoder = self.encoder
        return self._model.call(lambda: encoder.encode_images([image])[0])

    # -- searches ----------------------------------------------------------------------------

    def images_by_vector(self, vector: np.ndarray, k: int = 10, offset: int = 0,
                         exclude: int | None = None, from_text: bool = False) -> list[ImageHit]:
        """`from_text`: the vector is a text's, so the images' hubness penalties apply."""
        snapshot = self.snapshot
        extra = 1 if exclude is not None else 0
        ranked = self._ranked(snapshot.images, snapshot.manifest.image_index_type, vector, k + offset + extra,
                              self._stored_image_vectors, snapshot.image_penalties if from_text else None)
        page = [(i, s) for i, s in ranked if i != exclude][offset:offset + k]
        rows = self._images([i for i, _ in page])
        return [ImageHit(i, s, rows[i].path, rows[i].width, rows[i].height, [c.text for c in rows[i].captions])
                for i, s in page if i in rows]

    def captions_by_vector(self, vector: np.ndarray, k: int = 10, offset: int = 0,
                           from_image: bool = False) -> list[CaptionHit]:
        """`from_image`: the vector is an image's, so the captions' hubness penalties apply."""
        snapshot = self.snapshot
        ranked = self._ranked(snapshot.captions, snapshot.manifest.caption_index_type, vector, k + offset,
                              self._stored_caption_vectors, snapshot.caption_penalties if from_image else None)
        page = ranked[offset:offset + k]
        with self.store.session() as s:
            rows = {c.id: c for c in s.scalars(select(CaptionRow).options(selectinload(CaptionRow.image))
                                               .where(CaptionRow.id.in_([i for i, _ in page])))}
        return [CaptionHit(i, sc, rows[i].text, rows[i].image_id, rows[i].image.path) for i, sc in page if i in rows]

    def _ranked(self, index: faiss.Index, index_type: str, vector: np.ndarray, depth: int,
                stored_vectors, penalties: Penalties | None = None) -> list[tuple[int, float]]:
        """The top `depth` (id, score). A lossy index only proposes candidates: their exact
        vectors, stored in the database, decide the order and give the scores. With hubness
        penalties, the candidates' scores are corrected before they are ordered."""
        rerank = faiss_index.rerank_depth(index_type)
        candidates = max(depth, rerank, hubness.CANDIDATES if penalties is not None else 0)
        scores, ids = faiss_index.search(index, vector[None, :], candidates)
        found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        if rerank and found:
            exact = stored_vectors([i for i, _ in found])
            found = sorted(((i, float(exact[i] @ vector) if i in exact else s) for i, s in found),
                           key=lambda item: -item[1])
        return hubness.corrected(found, penalties)[:depth]

    def _stored_image_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        """One query, the embeddings found by primary key (as a join, SQLite scanned them: 1.3 s at 100k)."""
        hashes = select(ImageRow.content_hash).where(ImageRow.id.in_(ids)).scalar_subquery()
        with self.store.engine.connect() as connection:
            blobs = dict(connection.execute(
                select(Embedding.key, Embedding.vector).where(Embedding.model == self.snapshot.manifest.model,
                                                              Embedding.kind == "image", Embedding.key.in_(hashes))
            ).all())
            rows = connection.execute(select(ImageRow.id, ImageRow.content_hash).where(ImageRow.id.in_(ids)))
            return {i: np.frombuffer(blobs[key], dtype=np.float32) for i, key in rows if key in blobs}

    def _stored_caption_vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        with self.store.session() as s:
            texts = s.execute(select(CaptionRow.id, CaptionRow.text).where(CaptionRow.id.in_(ids)))
            keys = {i: hash_bytes(text.encode()) for i, text in texts}
        return self._stored_vectors("text", keys)

    def _stored_vectors(self, kind: str, keys: dict[int, str]) -> dict[int, np.ndarray]:
        with self.store.session() as s:
            blobs = load_embeddings(s, self.snapshot.manifest.model, kind, list(set(keys.values())))
        return {i: np.frombuffer(blobs[key], dtype=np.float32) for i, key in keys.items() if key in blobs}

    def images_by_text(self, text: str, k: int = 10, offset: int = 0) -> list[ImageHit]:
        return self.images_by_vector(self.text_vector(text), k, offset, from_text=True)

    def captions_by_text(self, text: str, k: int = 10, offset: int = 0) -> list[CaptionHit]:
        return self.captions_by_vector(self.text_vector(text), k, offset)

    def images_by_image(self, image: Image.Image, k: int = 10, offset: int = 0) -> list[ImageHit]:
        return self.images_by_vector(self.image_vector(image), k, offset)

    def captions_by_image(self, image: Image.Image, k: int = 10, offset: int = 0) -> list[CaptionHit]:
        return self.captions_by_vector(self.image_vector(image), k, offset, from_image=True)

    def indexed_vector(self, image_id: int) -> np.ndarray:
        """The exact stored vector of an indexed image: queries by id need no re-encoding."""
        try:
            self.snapshot.images.reconstruct(int(image_id))  # in the served index, not only in the database
        except (RuntimeError, OverflowError) as err:
            raise NotFound(f"image {image_id} is not in the index") from err
        stored = self._stored_image_vectors([int(image_id)])
        if int(image_id) not in stored:
            raise NotFound(f"image {image_id} has no stored embedding")
        return stored[int(image_id)]

    def similar_images(self, image_id: int, k: int = 10, offset: int = 0) -> list[ImageHit]:
        """Neighbours of an indexed image, itself excluded."""
        return self.images_by_vector(self.indexed_vector(image_id), k, offset, exclude=int(image_id))

    def captions_for_image(self, image_id: int, k: int = 10, offset: int = 0) -> list[CaptionHit]:
        """Captions that describe an indexed image, from the whole collection."""
        return self.captions_by_vector(self.indexed_vector(image_id), k, offset, from_image=True)

    # -- metadata ------------------------------------------------------------------------------

    def _images(self, ids: list[int]) -> dict[int, ImageRow]:
        with self.store.session() as s:
            rows = s.scalars(select(ImageRow).options(selectinload(ImageRow.captions)).where(ImageRow.id.in_(ids)))
            return {row.id: row for row in rows}

    def image(self, image_id: int) -> ImageRow:
        row = self._images([image_id]).get(image_id)
        if row is None:
            raise NotFound(f"image {image_id} not found")
        return row

    def image_file(self, image_id: int) -> Path:
        """The file of an indexed image; it must resolve inside the collection root."""
        row = self.image(image_id)
        root = self.snapshot.collection_root.resolve()
        path = (root / row.path).resolve()
        if root not in path.parents or not path.is_file():
            raise NotFound(f"file of image {image_id} is not available")
        return path
