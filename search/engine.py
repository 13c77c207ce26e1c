"""Read-only search over the published build: what the CLI and the service query.

The engine holds one immutable `Snapshot` (manifest + FAISS indexes) and swaps it for a
newer one in a single reference assignment, so a query in flight keeps using the
snapshot it started with and never sees a half-swapped state.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import faiss
import numpy as np
from PIL import Image

from crossmodal.indexer import faiss_index, onnx_text, ranking
from crossmodal.indexer.attributes import Attributes, Selection
from crossmodal.indexer.collection import open_regular_file
from crossmodal.indexer.folders import FolderNames, summaries
from crossmodal.indexer.hubness import Penalties
from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import Build, ImageRow, Store
from crossmodal.search import expressions
from crossmodal.search import filters
from crossmodal.search.expressions import Term
from crossmodal.search.options import FILTERS, SearchOptions
from crossmodal.search.queries import InvalidQuery
from crossmodal.search.metrics import Metrics

if TYPE_CHECKING:  # torch and open_clip are imported with the model, so the service's port opens first
    from crossmodal.indexer.encoder import Encoder
    from crossmodal.indexer.onnx_text import OnnxTextEncoder


MAX_FACETS = 2000  # folders and cameras listed by facets(), each
SELECTIONS_KEPT = 64  # filters whose selections the engine keeps (an LRU)


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
    taken_at: float | None = None  # wall-clock seconds (options.py), from EXIF or else the file's mtime
    taken_from: str | None = None  # exif|mtime
    camera: str | None = None


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
    folders: dict[int, Path]  # the folders the build holds, by id
    names: FolderNames  # how its photos' paths are shown
    image_penalties: Penalties | None = None  # hubness correction of text -> image search
    caption_penalties: Penalties | None = None  # ... and of image -> caption search
    image_vectors: faiss_index.ExactVectors | None = None  # a lossy index's re-rank vectors
    caption_vectors: faiss_index.ExactVectors | None = None
    attributes: Attributes | None = None  # what filters and the date sort look at

    @property
    def collection_root(self) -> Path:
        """The first folder (the only one, in an index of one)."""
        return next(iter(self.folders.values()))


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


class TextBatcher:
    """Concurrent text queries share one forward pass of the text tower.

    One worker thread takes whatever queries are waiting (up to `max_batch`) and encodes
    them together: a lone query is encoded at once, and under load N waiting queries cost
    about one batch instead of N passes (torch already uses every core for each pass).
    """

    def __init__(self, encoder: Encoder, max_batch: int = 32, metrics: Metrics | None = None):
        self.encoder, self.max_batch, self.metrics = encoder, max_batch, metrics
        self._queue: queue.SimpleQueue[tuple[str, Future, float] | None] = queue.SimpleQueue()
        threading.Thread(target=self._work, name=f"text-batcher-{encoder.name}", daemon=True).start()

    def encode(self, text: str) -> np.ndarray:
        future: Future = Future()
        self._queue.put((text, future, time.perf_counter()))
        return future.result()

    def close(self) -> None:
        """Queries already queued are still answered; then the worker ends."""
        self._queue.put(None)

    def _work(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            if self.metrics is not None:
                now = time.perf_counter()
                self.metrics.text_batch.observe(len(batch))
                for _, _, queued in batch:
                    self.metrics.text_wait.observe(now - queued)
            try:
                vectors = self.encoder.encode_texts([text for text, _, _ in batch])
            except Exception as err:  # reported to every waiting query, the worker lives on
                for _, future, _ in batch:
                    future.set_exception(err)
                continue
            for (_, future, _), vector in zip(batch, vectors):
                future.set_result(vector)


class SearchEngine:
    def __init__(self, settings: Settings, encoder: Encoder | None = None, store: Store | None = None):
        self.settings = settings
        self.store = store or Store(settings.resolved_database_url())
        self.metrics: Metrics | None = None  # the service's (attach_metrics); none for the CLI
        self._encoder = encoder
        self._encoder_given = encoder is not None  # tests and benchmarks hand one in: it encodes text too
        self._text_encoder: "OnnxTextEncoder | None" = None
        self._text_looked_up: int | None = None  # the build whose exported tower was looked for
        self._encoder_lock = threading.Lock()
        self._batcher: TextBatcher | None = None
        self._batcher_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self.text_cache = TextCache()
        self._facets: tuple[int, dict] | None = None
        self._selections: OrderedDict[tuple[int, str], Selection | None] = OrderedDict()
        self._selections_lock = threading.Lock()
        self.reload()
        self.store.prefetch_into_page_cache()  # each query reads rows at random places

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
        from crossmodal.indexer.encoder import load_encoder

        model = self.snapshot.manifest.model
        with self._encoder_lock:  # the service loads it behind /ready while an upload may ask for it
            if self._encoder is None or self._encoder.name != model:
                self._encoder = load_encoder(model, self.settings.device, self.settings.compressed_tower_dir)
            return self._encoder

    @property
    def text_encoder(self) -> "Encoder | OnnxTextEncoder":
        """What encodes text queries: the build's text tower exported to ONNX by the indexer
        (indexer/onnx_text.py), where it exists and no model was handed in, else the model. The export
        needs no torch, so a one-shot search starts in about a second, and it is faster per query too
        (Flickr8k captions on 2 CPUs: 3.3 against 8.0 ms one at a time, 2.9 against 3.2 in batches of 32);
        its int8 query tower (Settings.text_query_precision) costs 3.4 instead of 5.5 ms of CPU a query."""
        snapshot = self.snapshot
        if not self._encoder_given and self._text_looked_up != snapshot.build.id:  # once a build, not per query
            if self._text_encoder is None or self._text_encoder.name != snapshot.manifest.model:
                self._text_encoder = onnx_text.load(self.settings.index_dir, snapshot.manifest.model,
                                                    self.settings.text_query_precision)
            self._text_looked_up = snapshot.build.id
        return self._text_encoder or self.encoder

    def reload(self) -> bool:
        """Load the newest published build if it is not the one in use; True when swapped.

        Called after a rebuild job and, by the service, every `reload_interval` seconds for builds
        published elsewhere (the CLI, another replica): one cheap query when nothing changed.
        """
        with self._reload_lock:
            return self._reload()

    def _reload(self) -> bool:
        build = self.store.published_build()
        if build is None or (self._snapshot is not None and self._snapshot.build.id == build.id):
            return False
        opened = faiss_index.open_build(self.settings, build.id)
        manifest = opened.manifest
        folders = manifest.folders or [[f.id, f.name, f.path] for f in self.store.folders()]  # a build from before
        names = FolderNames({i: name for i, name, _ in folders})
        attributes = Attributes.open(opened.build_dir) or Attributes.tabulate(*self.store.photo_attributes(
            set(faiss_index.indexed_ids(opened.images, opened.image_vectors).tolist()),
            set(faiss_index.indexed_ids(opened.captions, opened.caption_vectors).tolist())), names)
        snapshot = Snapshot(build, manifest, opened.images, opened.captions,
                            {i: Path(path) for i, _, path in folders} or {0: Path(build.collection_root)}, names,
                            opened.image_penalties, opened.caption_penalties, opened.image_vectors,
                            opened.caption_vectors, attributes)
        if self._encoder is not None and self._encoder.name != manifest.model:
            self._encoder = None  # the new build was made with another model
        swapped = self._snapshot is not None
        self._snapshot = snapshot
        self.text_encoder  # ready (or kept) before queries arrive; the model itself loads when needed
        self.text_cache = TextCache()
        logging.getLogger(__name__).info("serving build %d (%s)", build.id, manifest.model)
        self._report_served()
        if swapped and self.metrics is not None:
            self.metrics.swaps.inc()
        return True

    def attach_metrics(self, metrics: Metrics) -> None:
        """Report to the service's metrics from now on (the engine may be made before the service)."""
        self.metrics = metrics
        if self._batcher is not None:
            self._batcher.metrics = metrics
        self._report_served()

    def _report_served(self) -> None:
        snapshot = self._snapshot
        if self.metrics is not None and snapshot is not None:
            self.metrics.served_build.set(snapshot.build.id)
            self.metrics.index_vectors.labels("images").set(snapshot.images.ntotal)
            self.metrics.index_vectors.labels("captions").set(snapshot.captions.ntotal)

    # -- query vectors -----------------------------------------------------------------------

    def text_vector(self, text: str) -> np.ndarray:
        encoder = self.text_encoder
        key = (encoder.name, text)
        vector = self.text_cache.get(key)
        if vector is None:
            if getattr(encoder, "shares_passes", True):
                vector = self._text_batcher(encoder).encode(text)
            else:  # the int8 query tower: alone, in this request's thread (onnx_text.OnnxTextEncoder)
                vector = encoder.encode_texts([text])[0]
            self.text_cache.put(key, vector)
        return vector

    def _text_batcher(self, encoder: "Encoder | OnnxTextEncoder") -> TextBatcher:
        batcher = self._batcher
        if batcher is None or batcher.encoder is not encoder:
            with self._batcher_lock:
                if self._batcher is None or self._batcher.encoder is not encoder:
                    if self._batcher is not None:
                        self._batcher.close()  # the build's model changed
                    self._batcher = TextBatcher(encoder, metrics=self.metrics)
                batcher = self._batcher
        return batcher

    def image_vector(self, image: Image.Image) -> np.ndarray:
        """Resizing runs outside the model's lock: other queries wait for the model, never for a resize."""
        from crossmodal.indexer import pixels

        encoder = self.encoder
        return encoder.encode_image_tensors(pixels.stack([encoder.prepare(image)]))[0]

    # -- searches ----------------------------------------------------------------------------

    def images_by_vector(self, vector: np.ndarray | None, k: int = 10, offset: int = 0, exclude: int | None = None,
                         from_text: bool = False, options: SearchOptions | None = None,
                         keywords: str | None = None) -> list[ImageHit]:
        """A page of images for a query vector, narrowed and ordered by `options` (options.py).

        `from_text`: the vector is a text's, so the images' hubness penalties apply. `keywords`: the
        query's text, for the keyword and hybrid modes. Every page of one query is cut from one ranking
        of a fixed depth, so paging never repeats or skips a result: offset + k for plain relevance,
        `top` for a date sort, and the service's deepest page for a fusion.
        """
        options = options or SearchOptions()
        snapshot = self.snapshot
        selection = self.selection(options)
        extra = 1 if exclude is not None else 0
        if options.mode != "vector" and not keywords:
            raise InvalidQuery(f"mode={options.mode} needs words to look for: a text term")
        if options.mode == "hybrid":
            depth = ranking.fusion_depth(self.settings) + extra
        else:
            depth = (options.top if options.sort != "relevance" else k + offset) + extra
        ranked = [] if options.mode == "keyword" else self._ranked_images(vector, depth, from_text, selection)
        if options.mode != "vector":
            found = self._keyword_ranking(keywords, depth, selection)
            ranked = found if options.mode == "keyword" else ranking.fused([ranked, found])[:depth]
        ranked = filters.ordered([(i, s) for i, s in ranked if i != exclude], options, snapshot.attributes)
        return self._image_hits(ranked[offset:offset + k])

    def selection(self, options: SearchOptions) -> Selection | None:
        """The served images `options` filters to (None: no filter). Kept per build for the last
        SELECTIONS_KEPT filters: paging and browsing one folder repeat a filter, and a broad one
        took 0.5 ms to select at 100k."""
        if not options.has_filters():
            return None
        snapshot = self.snapshot
        key = (snapshot.build.id, options.model_dump_json(include=set(FILTERS)))
        with self._selections_lock:
            if key in self._selections:
                self._selections.move_to_end(key)
                return self._selections[key]
        selection = filters.select(options, snapshot.attributes)
        with self._selections_lock:
            self._selections[key] = selection
            while len(self._selections) > SELECTIONS_KEPT:
                self._selections.popitem(last=False)
        return selection

    def _ranked_images(self, vector: np.ndarray, depth: int, from_text: bool,
                       selection: Selection | None) -> list[tuple[int, float]]:
        snapshot = self.snapshot
        exact = ranking.exact_lookup(snapshot.image_vectors, self.store, snapshot.manifest.model, "image")
        timings: dict[str, float] = {}
        ranked = ranking.ranked(snapshot.images, snapshot.manifest.image_index_type, vector[None, :], depth, exact,
                                snapshot.image_penalties if from_text else None, timings, selection)[0]
        self._observe(timings)
        return ranked

    def _keyword_ranking(self, text: str, depth: int, selection: Selection | None) -> list[tuple[int, float]]:
        """BM25 over captions and file names, kept to the served build's images (the keyword index may
        already hold a newer build's rows) and to the selection."""
        found = self.store.keyword_search(text, depth * 2)
        if not found:
            return []
        ids = np.array([i for i, _ in found], dtype=np.int64)
        keep = self.snapshot.attributes.positions(ids)[1]
        if selection is not None:
            keep &= selection.contains(ids)
        return [item for item, kept in zip(found, keep) if kept][:depth]

    def _image_hits(self, page: list[tuple[int, float]]) -> list[ImageHit]:
        attributes = self.snapshot.attributes
        rows = self.store.image_hits([i for i, _ in page])
        positions, found = attributes.positions(np.array([i for i, _ in page], dtype=np.int64))
        hits = []
        for (i, score), row, known in zip(page, positions.tolist(), found.tolist()):
            if i not in rows:
                continue
            facts = attributes.rows[row] if known else None
            taken = float(facts["taken_at"]) if facts is not None and not np.isnan(facts["taken_at"]) else None
            camera = attributes.cameras[facts["camera"]] if facts is not None and facts["camera"] >= 0 else None
            source = None if taken is None else "exif" if facts["taken_from_exif"] else "mtime"
            folder_id, path, *rest = rows[i]
            hits.append(ImageHit(i, score, self.snapshot.names.shown(folder_id, path), *rest, taken_at=taken,
                                 taken_from=source, camera=camera))
        return hits

    def captions_by_vector(self, vector: np.ndarray, k: int = 10, offset: int = 0, from_image: bool = False,
                           options: SearchOptions | None = None) -> list[CaptionHit]:
        """`from_image`: the vector is an image's, so the captions' hubness penalties apply. `options`:
        the filters keep captions whose image passes them, and `min_score` cuts; captions are ranked
        by relevance only."""
        snapshot = self.snapshot
        options = options or SearchOptions()
        if options.sort != "relevance" or options.mode != "vector":
            raise InvalidQuery("captions are ranked by relevance to the query: sort and mode apply to image searches")
        images = self.selection(options)
        selection = snapshot.attributes.caption_selection(images) if images is not None else None
        exact = ranking.exact_lookup(snapshot.caption_vectors, self.store, snapshot.manifest.model, "caption")
        timings: dict[str, float] = {}
        ranked = ranking.ranked(snapshot.captions, snapshot.manifest.caption_index_type, vector[None, :], k + offset,
                                exact, snapshot.caption_penalties if from_image else None, timings, selection)[0]
        self._observe(timings)
        page = filters.ordered(ranked, options, snapshot.attributes)[offset:offset + k]
        rows = self.store.caption_hits([i for i, _ in page])
        return [CaptionHit(i, score, text, image_id, snapshot.names.shown(folder_id, path))
                for i, score in page if i in rows for text, image_id, folder_id, path in [rows[i]]]

    def _observe(self, timings: dict[str, float]) -> None:
        if self.metrics is not None:
            for stage, seconds in timings.items():
                self.metrics.search_stage.labels(stage).observe(seconds)

    def images_by_text(self, text: str, k: int = 10, offset: int = 0,
                       options: SearchOptions | None = None) -> list[ImageHit]:
        return self.images_by_terms([Term(1.0, text=text)], k, offset, options=options)

    def captions_by_text(self, text: str, k: int = 10, offset: int = 0,
                         options: SearchOptions | None = None) -> list[CaptionHit]:
        self.selection(options or SearchOptions())  # a bad filter value fails before the encoder
        return self.captions_by_vector(self.text_vector(text), k, offset, options=options)

    def images_by_image(self, image: Image.Image, k: int = 10, offset: int = 0,
                        options: SearchOptions | None = None) -> list[ImageHit]:
        _vector_mode(options)
        return self.images_by_vector(self.image_vector(image), k, offset, options=options)

    def captions_by_image(self, image: Image.Image, k: int = 10, offset: int = 0,
                          options: SearchOptions | None = None) -> list[CaptionHit]:
        self.selection(options or SearchOptions())
        return self.captions_by_vector(self.image_vector(image), k, offset, from_image=True, options=options)

    def images_by_terms(self, terms: list[Term], k: int = 10, offset: int = 0, more_like: Sequence[int] = (),
                        less_like: Sequence[int] = (), uploads: Sequence[tuple[float, Image.Image]] = (),
                        options: SearchOptions | None = None) -> list[ImageHit]:
        """Images for a query expression with relevance feedback (expressions.py).

        Every image id is looked up, and the filters checked, before any text or upload is encoded,
        so a wrong id or filter value costs no model time; `uploads` are (weight, image) terms from
        uploaded files. The keyword mode reads the positive text terms and encodes nothing.
        """
        options = options or SearchOptions()
        self.selection(options)  # a bad filter value fails first
        keywords = " ".join(t.text for t in terms if t.text is not None and t.weight > 0)
        if options.mode == "keyword":
            return self.images_by_vector(None, k, offset, options=options, keywords=keywords)
        ids = [t.image_id for t in terms if t.image_id is not None]
        stored = {i: self.indexed_vector(i) for i in dict.fromkeys([*ids, *more_like, *less_like])}
        weighted = [(t.weight, stored[t.image_id] if t.image_id is not None else self.text_vector(t.text))
                    for t in terms]
        weighted += [(weight, self.image_vector(image)) for weight, image in uploads]
        query = expressions.combine(weighted, [stored[i] for i in more_like], [stored[i] for i in less_like])
        return self.images_by_vector(query, k, offset, from_text=expressions.from_text(terms), options=options,
                                     keywords=keywords)

    def indexed_vector(self, image_id: int) -> np.ndarray:
        """The exact stored vector of an indexed image: queries by id need no re-encoding."""
        snapshot = self.snapshot
        if snapshot.image_vectors is not None:  # a lossy index (on-disk ones keep no id map in memory)
            if int(image_id) not in snapshot.image_vectors:
                raise NotFound(f"image {image_id} is not in the index")
        else:
            try:
                snapshot.images.reconstruct(int(image_id))  # in the served index, not only in the database
            except (RuntimeError, OverflowError) as err:
                raise NotFound(f"image {image_id} is not in the index") from err
        stored = self.store.vectors_by_id(snapshot.manifest.model, "image", [int(image_id)])
        if int(image_id) not in stored:
            raise NotFound(f"image {image_id} has no stored embedding")
        return stored[int(image_id)]

    def similar_images(self, image_id: int, k: int = 10, offset: int = 0,
                       options: SearchOptions | None = None) -> list[ImageHit]:
        """Neighbours of an indexed image, itself excluded."""
        _vector_mode(options)
        return self.images_by_vector(self.indexed_vector(image_id), k, offset, exclude=int(image_id), options=options)

    def captions_for_image(self, image_id: int, k: int = 10, offset: int = 0,
                           options: SearchOptions | None = None) -> list[CaptionHit]:
        """Captions that describe an indexed image, from the whole collection (or the filtered part)."""
        return self.captions_by_vector(self.indexed_vector(image_id), k, offset, from_image=True, options=options)

    # -- metadata ------------------------------------------------------------------------------

    def facets(self) -> dict:
        """What the filters can take in the served build: folders (every depth) and cameras with their
        image counts, the range of dates, how many are dated by EXIF and have captions. Counted once a build."""
        snapshot = self.snapshot
        cached = self._facets
        if cached is not None and cached[0] == snapshot.build.id:
            return cached[1]
        attributes = snapshot.attributes
        folders: Counter[str] = Counter()
        for path in attributes.paths.tolist():
            parts = path.decode().split("/")[:-1]
            folders.update("/".join(parts[:depth]) for depth in range(1, len(parts) + 1))
        rows = attributes.rows
        cameras = Counter(rows["camera"][rows["camera"] >= 0].tolist())
        taken = rows["taken_at"][~np.isnan(rows["taken_at"])]
        facets = {
            "folders": [{"folder": f, "images": n} for f, n in sorted(folders.items())][:MAX_FACETS],
            "cameras": [{"camera": attributes.cameras[c], "images": n} for c, n in cameras.most_common(MAX_FACETS)],
            "taken_first": float(taken.min()) if len(taken) else None,
            "taken_last": float(taken.max()) if len(taken) else None,
            "taken_from_exif": int(rows["taken_from_exif"].sum()), "with_captions": int(rows["captioned"].sum()),
            "images": len(rows)}
        self._facets = (snapshot.build.id, facets)
        return facets

    def folders(self) -> list[dict]:
        """The served build's folders with their photo and caption counts (the attribute table's)."""
        snapshot = self.snapshot
        return summaries([(i, snapshot.names.names.get(i, path.name), str(path))
                          for i, path in snapshot.folders.items()], snapshot.attributes.folder_counts())

    def image(self, image_id: int) -> ImageRow:
        row = self.store.image(image_id)
        if row is None:
            raise NotFound(f"image {image_id} not found")
        return row

    def shown_path(self, row: ImageRow) -> str:
        """An image's path as results show it (folders.FolderNames)."""
        return self.snapshot.names.shown(row.folder_id, row.path)

    def image_file(self, image_id: int) -> tuple[Path, Path]:
        """(its folder, its file) of an indexed image."""
        row = self.image(image_id)
        folder = self.snapshot.folders.get(row.folder_id)
        if folder is None:
            raise NotFound(f"image {image_id} is not in the served index")
        return folder, folder / row.path

    def open_image_file(self, image_id: int) -> BinaryIO:
        """The file of an indexed image, opened for reading; it must lie inside its folder.

        Where the opened descriptor really points is checked, not the path before opening: a
        file swapped for a symlink to elsewhere between a check and an open (a race that
        served outside files) is refused, while symlinks that stay inside the folder still work.
        """
        folder, path = self.image_file(image_id)
        root = folder.resolve()
        try:
            handle = open_regular_file(path)  # NotRegularFile is an OSError
        except OSError as err:
            raise NotFound(f"file of image {image_id} is not available") from err
        if root not in _opened_path(handle.fileno(), path).parents:
            handle.close()
            raise NotFound(f"file of image {image_id} is not available")
        return handle


def _vector_mode(options: SearchOptions | None) -> None:
    if options is not None and options.mode != "vector":
        raise InvalidQuery(f"mode={options.mode} needs words to look for; an image query is ranked by vector only")


def _opened_path(fd: int, path: Path) -> Path:
    """Where an open descriptor points (Linux: /proc/self/fd; elsewhere, the path resolved now)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return path.resolve()
