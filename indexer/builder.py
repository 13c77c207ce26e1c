"""Build or update the index of a collection, incrementally.

A re-run reads only files whose size or mtime changed, embeds only content it has not
embedded before with this model (looked up by content hash), and drops deleted files.
Embeddings are committed batch by batch, so a killed build resumes where it stopped.
The new FAISS indexes are written to a fresh build directory and published in one
database transaction (see faiss_index.py for the layout).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.orm import Session

from crossmodal.indexer import batch_size, faiss_index, hubness, onnx_text, ranking
from crossmodal.indexer.attributes import Attributes
from crossmodal.indexer.batch_size import BatchTuner
from crossmodal.indexer.collection import (BadImage, Captions, FileEntry, LoadedImage, PhotoFacts, SkippedFile,
                                           find_captions_file, hash_bytes, load_image, nfc, photo_facts, read_captions,
                                           read_regular_file, scan)
from crossmodal.indexer.folders import Change, FolderNames
from crossmodal.indexer.hubness import HubnessBank, Penalties, load_bank
from crossmodal.indexer.model_names import check_model_name, default_model_version, resolve_model_name
from crossmodal.indexer.prefetch import prefetched_batches, read_ahead
from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import (Build, Store, caption_key, caption_row_ids, image_ids_by_path,
                                      embedding_keys, image_row_ids, image_sizes, load_embeddings, publish_build,
                                      save_embeddings, set_build_report, vectors_from_bytes)

if TYPE_CHECKING:  # the encoder (torch, open_clip) is imported when something needs embedding
    import torch

    from crossmodal.indexer.encoder import Encoder

log = logging.getLogger(__name__)


TRANSACTION_IMAGES = 64  # images embedded and committed per transaction: a killed build loses at most these


LARGE_FILE_BYTES = 500_000  # a JPEG this large holds about 1.5 megapixels or more: decoding costs like the model


def decode_threads(configured: int, encoder: Encoder, entries: list[FileEntry] = ()) -> int:
    """Beside a GPU, decoding runs ahead on threads so the GPU never waits. On a CPU the model
    already uses every core, and small photos gain nothing from decoding beside it (2 cores, 224 px
    Flickr8k photos: 68.7 images/s inline, 66.7 with two threads). Camera-sized photos do, even
    decoded at reduced scale: 12 MP 36.4 -> 46.1 images/s, 24 MP 24.9 -> 37.5, phone photos 26.4
    -> 39.4 (one thread gained nothing). So on a CPU, two threads when most files are large."""
    if configured >= 0:
        return configured
    if encoder.device.type == "cuda":
        return min(8, max(2, (os.cpu_count() or 2) - 2))
    sizes = sorted(entry.bytes for entry in entries)
    return 2 if sizes and sizes[len(sizes) // 2] >= LARGE_FILE_BYTES and (os.cpu_count() or 1) >= 2 else 0


@dataclass
class Progress:
    """What a build is doing now; handed to the progress callback after every batch."""

    phase: str  # scanning | images | captions | indexing | done
    done: int = 0
    total: int = 0
    rate: float = 0.0  # items per second in this phase
    eta_seconds: float | None = None
    overall: float = 0.0  # the whole build's share done (all phases), 0..1
    overall_eta_seconds: float | None = None  # time left for the whole build


ProgressCallback = Callable[[Progress], None]


@dataclass
class BuildReport:
    build_id: int
    model: str
    previous_model: str | None
    model_changed: bool
    n_images: int = 0
    n_captions: int = 0
    n_embedded: int = 0  # images whose vectors were computed in this build
    n_reused: int = 0  # images whose stored vectors were reused
    n_removed: int = 0
    unchanged: bool = False  # nothing changed: the published build (build_id) stays, nothing was written
    skipped: list[SkippedFile] = field(default_factory=list)
    bad_caption_rows: list[SkippedFile] = field(default_factory=list)
    captions_for_unknown_images: int = 0
    image_index_type: str = ""
    caption_index_type: str = ""
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["images_per_second"] = self.images_per_second
        return data


class _BuildProgress:
    """One progress over the whole build. Each phase's time is estimated from its item count and a cost
    per item: measured once the phase has done some, a prior until then. So the bar does not start
    again at each phase, and the time left covers every phase still to come (a bar per phase said
    "about 0 s left" 20 s before the end, issue 20 item 11)."""

    PHASES = ("images", "captions", "indexing")
    PRIOR_SECONDS = {"images": 1 / 60, "captions": 1 / 300, "indexing": 2e-4}  # per item, on a 2-core CPU

    def __init__(self, callback: ProgressCallback | None):
        self.callback, self.start = callback, time.perf_counter()
        self.items = dict.fromkeys(self.PHASES, 0)
        self.meters: dict[str, _Meter] = {}

    def expect(self, phase: str, items: int) -> None:
        """The items a later phase will have, as far as known now (its meter gives the exact count)."""
        self.items[phase] = items

    def meter(self, phase: str, total: int) -> "_Meter":
        self.items[phase] = total
        meter = self.meters[phase] = _Meter(phase, total, self)
        meter.report()
        return meter

    def report(self, meter: "_Meter") -> None:
        if self.callback is None:
            return
        elapsed = time.perf_counter() - meter.start
        rate = meter.done / elapsed if elapsed > 0 and meter.done else 0.0
        eta = (meter.total - meter.done) / rate if rate else None
        left = self.seconds_left()
        spent = time.perf_counter() - self.start
        overall = 1.0 if meter.phase == "done" else spent / (spent + left) if spent + left > 0 else 0.0
        self.callback(Progress(meter.phase, meter.done, meter.total, rate, eta, overall,
                               None if meter.phase == "done" else left))

    def seconds_left(self) -> float:
        left = 0.0
        for phase in self.PHASES:
            meter = self.meters.get(phase)
            if meter is None:
                left += self.items[phase] * self.PRIOR_SECONDS[phase]
            else:
                per_item = (time.perf_counter() - meter.start) / meter.done if meter.done \
                    else self.PRIOR_SECONDS[phase]
                left += (meter.total - meter.done) * per_item
        return left


class _Meter:
    """Rate and ETA for one phase, reported with the whole build's (_BuildProgress)."""

    def __init__(self, phase: str, total: int, build: _BuildProgress):
        self.phase, self.total, self.build = phase, total, build
        self.done, self.start = 0, time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        self.report()

    def report(self) -> None:
        self.build.report(self)


class IndexBuilder:
    def __init__(self, settings: Settings, store: Store | None = None, encoder: Encoder | None = None):
        self.settings = settings
        self.store = store or Store(settings.resolved_database_url())
        self._encoder = encoder

    def encoder(self, model: str) -> Encoder:
        from crossmodal.indexer.encoder import keep_freed_memory, load_encoder

        if self._encoder is None or self._encoder.name != model:
            keep_freed_memory()
            self._encoder = load_encoder(model, self.settings.device, self.settings.compressed_tower_dir)
        return self._encoder

    def build(self, collection: Path | list[Path] | Change, captions_file: Path | None = None,
              model: str | None = None, progress: ProgressCallback | None = None) -> BuildReport:
        """Index a folder, several, or a change to the index's folders (folders.Change: add, remove,
        rescan one); a folder or a list makes the index exactly those folders. Returns the report of
        the published build."""
        model = resolve_model_name(model or self.settings.model)  # the build records a version, never the alias
        check_model_name(model)
        if not isinstance(collection, Change):
            collection = Change.replace([collection] if isinstance(collection, Path) else list(collection))
        with self.store.build_lock(self.settings.index_dir):
            return self._build(collection, captions_file, model, progress)

    def _build(self, change: Change, captions_file: Path | None, model: str,
               progress: ProgressCallback | None) -> BuildReport:
        start = time.perf_counter()
        previous = self.store.published_build()
        rescan, kept = self._plan(previous, model, change)
        parsed, sources = self._read_captions(rescan, captions_file)  # a bad captions file fails here, before any work
        folders = self.store.folder_rows(change.folders, sources)
        names = self._names = FolderNames({f.id: f.name for f in folders})
        first = sources.get(change.folders[0])
        build_id = self.store.start_build(str(change.folders[0]), str(first) if first else None, model)
        report = BuildReport(build_id, model, previous.model if previous else None,
                             model_changed=bool(previous and previous.model != model))
        if report.model_changed:
            log.warning("model changed from %s to %s: every image and caption is embedded again",
                        previous.model, model)
        # The encoder is loaded only when something needs embedding: an unchanged re-run takes seconds.
        known_dim = previous.dim if previous and previous.model == model else None
        lazy = _LazyEncoder(self, model, known_dim)
        try:
            tracker = _BuildProgress(progress)
            tracker.meter("scanning", 0)
            by_path = {Path(f.path): f for f in folders}
            entries = self._scan([by_path[folder] for folder in rescan], names, report)
            kept_images, kept_captions = self._kept_of(kept, {f.id for f in folders if Path(f.path) not in rescan})
            captions_expected = sum(len(c.rows) for c in parsed.values())
            tracker.expect("captions", captions_expected)
            tracker.expect("indexing", len(entries) + len(kept_images) + captions_expected + len(kept_captions))
            images = self._index_images(entries, lazy, build_id, report, tracker)
            images.update(kept_images)
            report.n_reused += len(kept_images)
            report.n_images = len(images)
            captions = self._index_captions({by_path[f].id: c for f, c in parsed.items()}, images, lazy, report,
                                            tracker)
            captions.update(kept_captions)
            report.n_captions = len(captions)
            if self._same_as_published(previous, images, captions, folders, lazy):
                self._keep_published(build_id, previous, report, tracker, start)
            else:
                self._write_and_publish(build_id, lazy, images, captions, folders, report, tracker, start)
        except BaseException as err:
            self._fail(build_id, err)
            raise
        self._export_text_tower(lazy)
        return report

    def _export_text_tower(self, lazy: "_LazyEncoder") -> None:
        """The text tower for searches that start without torch (onnx_text.py), written once per model. The
        model is loaded for it only where its tower is known to export (crossmodal-lite's); other models
        are tried when the build loaded them anyway (open_clip's BPE towers are not exported)."""
        if not self.settings.export_text_tower:
            return
        if onnx_text.exported(self.settings.index_dir, lazy.name):
            onnx_text.quantize_queries(self.settings.index_dir, lazy.name)  # once; towers exported before it existed
            return
        if not lazy.loaded and default_model_version(lazy.name) is None:
            return
        try:
            onnx_text.export(lazy.get(), self.settings.index_dir)
        except Exception as err:  # the build is published; searches then load the model
            log.warning("the text tower was not exported (%s: %s)", type(err).__name__, err)

    # -- nothing changed -----------------------------------------------------------------------

    def _same_as_published(self, previous: Build | None, images: dict[int, str], captions: dict[int, str],
                           folders: list, lazy: "_LazyEncoder") -> bool:
        """Whether the new build would equal the published one: no file was read (so no photo's facts
        changed), the same image and caption rows, folders, model and index types. Then the published
        build stays (issue 18: an unchanged re-run wrote every index again, 3 of its 4.5 s at 7,000 photos)."""
        if previous is None or previous.model != lazy.name or self._files_read:
            return False
        table, manifest = self._published(previous)
        if table is None or manifest is None or manifest.folders != [[f.id, f.name, f.path] for f in folders]:
            return False
        return (len(table.ids) == len(images) and set(images) == set(np.asarray(table.ids).tolist())
                and len(table.captions) == len(captions)
                and set(captions) == set(np.asarray(table.captions[:, 0]).tolist())
                and (manifest.image_index_type, manifest.caption_index_type)
                == (self._index_type(len(images), lazy.dim), self._index_type(len(captions), lazy.dim)))

    def _keep_published(self, build_id: int, previous: Build, report: BuildReport, tracker: _BuildProgress,
                        start: float) -> None:
        self.store.discard_build(build_id)  # it wrote no row: nothing refers to it
        report.build_id, report.unchanged = previous.id, True
        report.image_index_type, report.caption_index_type = previous.image_index_type, previous.caption_index_type
        report.seconds = time.perf_counter() - start
        tracker.meter("done", 0)

    def _index_type(self, n: int, dim: int) -> str:
        """The FAISS index type a build gives `n` vectors: on disk past `ondisk_min_vectors`."""
        if n >= max(1, self.settings.ondisk_min_vectors):
            return faiss_index.ondisk_index_type(n, dim, self.settings.index_factory)
        return faiss_index.choose_index_type(n, dim, self.settings.index_factory, self.settings.exact_search_max)

    # -- setup -----------------------------------------------------------------------------

    def _plan(self, previous: Build | None, model: str, change: Change) -> tuple[list[Path], Attributes | None]:
        """(the folders to read, the published build's table to keep the other folders' rows from).

        A folder is kept as published when the change does not name it, the published build holds it,
        the model is the same, and that build wrote its table (attributes.py); else it is read again."""
        if previous is None or previous.model != model:
            return change.folders, None
        table, manifest = self._published(previous)
        published = {Path(path) for _, _, path in manifest.folders} if manifest else set()
        rescan = [f for f in change.folders if table is None or f in change.rescan or f not in published]
        return rescan, table if len(rescan) < len(change.folders) else None

    def _published(self, previous: Build) -> tuple[Attributes | None, faiss_index.Manifest | None]:
        """The published build's attribute table and manifest, each None where it cannot be read."""
        build_dir = faiss_index.build_dir_for(self.settings.index_dir, previous.id)
        try:
            manifest = faiss_index.Manifest.read(build_dir)
        except (OSError, ValueError, TypeError):
            manifest = None
        return Attributes.open(build_dir), manifest

    def _kept_of(self, table: Attributes | None, folder_ids: set[int]) -> tuple[dict[int, str], dict[int, str]]:
        """({image id: content hash}, {caption id: key}) of the published rows in these folders."""
        if table is None or not folder_ids:
            return {}, {}
        images = self.store.image_keys_in(set(np.asarray(table.ids).tolist()), folder_ids)
        caption_ids = {int(c) for c, image in np.asarray(table.captions).tolist() if image in images}
        return images, {i: key for i, key in self.store.caption_keys().items() if i in caption_ids}

    def _read_captions(self, folders: list[Path], given: Path | None) -> tuple[dict[Path, Captions], dict[Path, Path]]:
        """({folder: its parsed captions}, {folder: the captions file read}). A folder's captions are the
        file given (with one folder), else captions.{tsv,csv,jsonl} in it, else the file it had before."""
        if given is not None:
            if len(folders) != 1:
                raise ValueError("a captions file goes with one folder; put a captions.tsv in each folder instead")
            if not given.is_file():
                raise FileNotFoundError(f"captions file not found: {given}")
        remembered = {Path(f.path): f.captions_file for f in self.store.folders()}
        sources = {}
        for folder in folders:
            if not folder.is_dir():
                raise NotADirectoryError(f"collection folder not found: {folder}")
            source = given.resolve() if given is not None else find_captions_file(folder)
            if source is None and remembered.get(folder) and Path(remembered[folder]).is_file():
                source = Path(remembered[folder])
            if source is not None:
                sources[folder] = source
        return {f: read_captions(path, self.settings.max_captions_bytes) for f, path in sources.items()}, sources

    def _scan(self, folders: list, names: FolderNames, report: BuildReport) -> list[FileEntry]:
        entries = []
        for folder in folders:
            found, skipped = scan(Path(folder.path), folder.id)
            entries += found
            report.skipped += [SkippedFile(names.shown(folder.id, s.path), s.reason) for s in skipped]
        return entries

    def _fail(self, build_id: int, err: BaseException) -> None:
        with contextlib.suppress(Exception):
            self.store.fail_build(build_id, f"{type(err).__name__}: {err}")

    # -- images ----------------------------------------------------------------------------

    def _index_images(self, entries: list[FileEntry], lazy: "_LazyEncoder", build_id: int,
                      report: BuildReport, tracker: _BuildProgress) -> dict[int, str]:
        """Returns {image row id: content hash} of every image found in the folders read."""
        known = self.store.image_rows_by_path({e.folder_id for e in entries})
        with self.store.session() as s:
            unchanged = {}
            for entry in entries:
                row = next((r for r in known.get((entry.folder_id, entry.path), ()) if r.bytes == entry.bytes
                            and abs(r.mtime - entry.mtime) < 1e-6 and r.taken_from is not None), None)
                if row is not None:
                    unchanged[entry] = row
            have = embedding_keys(s, lazy.name, "image", list({r.content_hash for r in unchanged.values()}))
        live = {row.id: row.content_hash for row in unchanged.values() if row.content_hash in have}
        report.n_reused = len(live)
        todo = [e for e in entries if not (e in unchanged and unchanged[e].id in live)]
        meter = tracker.meter("images", len(todo))
        self._files_read = len(todo)
        if not todo:
            return live
        if self.settings.ray_address:
            self._embed_images_on_ray(todo, lazy, build_id, report, meter, live)
            return live
        encoder = lazy.get()
        tuner = self._batch_tuner(encoder, len(todo))
        limits = (self.settings.max_file_bytes, self.settings.max_image_pixels)
        for batch in prefetched_batches(todo, lambda e: self._load(e, encoder, *limits), TRANSACTION_IMAGES,
                                        threads=decode_threads(self.settings.decode_threads, encoder, todo),
                                        read=lambda entries: read_ahead(e.abs_path for e in entries)):
            loaded = []
            for entry, result in batch:
                if isinstance(result, Exception):
                    reason = str(result) if isinstance(result, BadImage) else f"{type(result).__name__}: {result}"
                    report.skipped.append(self._skipped(entry, reason))
                else:
                    loaded.append(result)
            before = meter.done
            live.update(self._store_images(loaded, encoder, build_id, report, meter, tuner))
            meter.advance(len(batch) - (meter.done - before))  # the skipped and the already embedded
        return live

    def _skipped(self, entry: FileEntry, reason: str) -> SkippedFile:
        return SkippedFile(self._names.shown(entry.folder_id, entry.path), reason)

    @staticmethod
    def _load(entry: FileEntry, encoder: Encoder, max_bytes: int, max_pixels: int):
        """Runs on decode threads: read, hash, decode and prepare (resize, crop) one file."""
        image = load_image(entry, max_bytes, max_pixels, encoder.preparer.decode_side)
        return image, encoder.prepare(image.pixels)

    def _batch_tuner(self, encoder: Encoder, new_images: int) -> BatchTuner | None:
        """On a CPU: the batch size measured before for this model, else a tuner measuring it on this
        build's first photos, where there are enough of them (batch_size.py)."""
        if encoder.device.type != "cpu":
            return None
        encoder.cpu_batch_size = encoder.cpu_batch_size or batch_size.known(self.settings.index_dir, encoder.name)
        if encoder.cpu_batch_size or new_images < batch_size.MIN_NEW_IMAGES:
            return None
        return BatchTuner(self.settings.index_dir, encoder.name)

    def _store_images(self, loaded: list[tuple[LoadedImage, torch.Tensor]], encoder: Encoder, build_id: int,
                      report: BuildReport, meter: _Meter, tuner: BatchTuner | None = None) -> dict[int, str]:
        """Embed what is new, write rows and vectors in one transaction (a resumable step); the meter moves
        with each encoder pass, so a build of fewer photos than a transaction still shows progress."""
        from crossmodal.indexer import pixels

        if not loaded:
            return {}
        with self.store.session() as s, s.begin():
            hashes = list({item.content_hash for item, _ in loaded})
            have = embedding_keys(s, encoder.name, "image", hashes)
            new = {}
            for item, prepared in loaded:
                if item.content_hash not in have and item.content_hash not in new:
                    new[item.content_hash] = prepared
            if new:
                keys, vectors, start = list(new), [], 0
                while start < len(keys):
                    tuning = tuner is not None and not tuner.done
                    chunk = keys[start:start + (tuner.size() if tuning else encoder.image_batch_size)]
                    began = time.perf_counter()
                    vectors.append(encoder.encode_image_tensors(pixels.stack([new[k] for k in chunk])))
                    if tuning:
                        tuner.observe(len(chunk), time.perf_counter() - began)
                        encoder.cpu_batch_size = tuner.best() if tuner.done else None
                    meter.advance(len(chunk))
                    start += len(chunk)
                save_embeddings(s, encoder.name, "image", keys, np.concatenate(vectors))  # one insert
            report.n_embedded += len(new)
            report.n_reused += sum(1 for item, _ in loaded if item.content_hash in have)
            return self._image_rows(s, [(item.entry, item.content_hash, item.width, item.height, item.facts)
                                        for item, _ in loaded], build_id)

    @staticmethod
    def _image_rows(s: Session, items: list[tuple[FileEntry, str, int, int, PhotoFacts]],
                    build_id: int) -> dict[int, str]:
        """{row id: content hash} of these (file, content hash, width, height, facts) (store.image_row_ids)."""
        ids = image_row_ids(s, [{"folder_id": entry.folder_id, "path": entry.path, "content_hash": key,
                                 "build_id": build_id, "bytes": entry.bytes,
                                 "width": width, "height": height, "mtime": entry.mtime, **asdict(facts)}
                                for entry, key, width, height, facts in items])
        return {row_id: item[1] for row_id, item in zip(ids, items)}

    # -- images on a Ray cluster ---------------------------------------------------------------

    def _embed_images_on_ray(self, todo: list[FileEntry], lazy: "_LazyEncoder", build_id: int,
                             report: BuildReport, meter: "_Meter", live: dict[int, str]) -> None:
        """`--ray`: the files are hashed here, and what is new by content goes to the cluster
        (ray_embedding); files whose content is known only get their rows."""
        from crossmodal.indexer import ray_embedding
        from crossmodal.indexer.encoder import preparer_from_config

        ray_embedding.connect(self.settings.ray_address)
        hashed = self._hash_files(todo, report)
        # The driver needs only the image preparer: the default model's comes from its config, an open_clip
        # model is loaded for it.
        preparer = preparer_from_config(lazy.name) or lazy.get().preparer
        meter.advance(len(todo) - len(hashed))
        with self.store.session() as s:
            keys = list({key for _, key, _ in hashed})
            have = embedding_keys(s, lazy.name, "image", keys)
            sizes = image_sizes(s, [key for key in keys if key in have])
        known = [(entry, key, *sizes[key], facts) for entry, key, facts in hashed if key in sizes]
        for start in range(0, len(known), TRANSACTION_IMAGES):
            with self.store.session() as s, s.begin():
                live.update(self._image_rows(s, known[start:start + TRANSACTION_IMAGES], build_id))
            report.n_reused += len(known[start:start + TRANSACTION_IMAGES])
            meter.advance(len(known[start:start + TRANSACTION_IMAGES]))
        new = {str(entry.abs_path): (entry, key, facts) for entry, key, facts in hashed if key not in sizes}
        for batch in ray_embedding.embed_on_ray([(path, key) for path, (_, key, _) in new.items()], lazy.name, preparer,
                                                self.settings.max_file_bytes, self.settings.max_image_pixels,
                                                self.settings.ray_encoder_threads):
            live.update(self._store_embedded(batch, new, lazy.name, build_id, report))
            meter.advance(len(batch))

    def _hash_files(self, entries: list[FileEntry], report: BuildReport) -> list[tuple[FileEntry, str, PhotoFacts]]:
        """(file, content hash, photo facts) of each readable file, read on a few threads (I/O, and hashing
        frees the GIL)."""
        def content_hash(entry: FileEntry) -> tuple[str, PhotoFacts] | SkippedFile:
            if entry.bytes > self.settings.max_file_bytes:
                return self._skipped(entry, f"file too large: {entry.bytes} bytes exceeds the limit of "
                                            f"{self.settings.max_file_bytes}")
            try:
                data = read_regular_file(entry.abs_path, self.settings.max_file_bytes)
                return hash_bytes(data), photo_facts(data, entry.mtime)
            except OSError as err:
                return self._skipped(entry, f"unreadable: {err.strerror or err}")

        hashed = []
        with ThreadPoolExecutor(8, thread_name_prefix="hash") as pool:
            for entry, result in zip(entries, pool.map(content_hash, entries)):
                if isinstance(result, SkippedFile):
                    report.skipped.append(result)
                else:
                    hashed.append((entry, *result))
        return hashed

    def _store_embedded(self, batch: list, new: dict[str, tuple[FileEntry, str, PhotoFacts]], model: str, build_id: int,
                        report: BuildReport) -> dict[int, str]:
        """Write one batch back from the cluster: vectors not stored yet, and rows (a resumable step)."""
        done = []
        for item in batch:
            entry, _, facts = new[item.path]
            if item.vector is None:
                report.skipped.append(self._skipped(entry, item.error))
            else:
                done.append((entry, item.key, item.width, item.height, facts, item.vector))
        if not done:
            return {}
        with self.store.session() as s, s.begin():
            have = embedding_keys(s, model, "image", list({key for _, key, *_ in done}))
            vectors = {key: vector for _, key, *_, vector in done if key not in have}
            if vectors:
                save_embeddings(s, model, "image", list(vectors), np.stack(list(vectors.values())))
            report.n_embedded += len(vectors)
            return self._image_rows(s, [item[:5] for item in done], build_id)

    # -- captions --------------------------------------------------------------------------

    def _index_captions(self, parsed: dict[int, Captions], images: dict[int, str], lazy: "_LazyEncoder",
                        report: BuildReport, tracker: _BuildProgress) -> dict[int, str]:
        """Returns {caption row id: text hash} of the captions of the folders read ({folder id: captions}).

        The phase starts before the caption rows are written, so writing them is timed (and
        shown) as caption work, not as the tail of the image phase.
        """
        if not parsed:
            return {}
        wanted: dict[tuple[int, str], str] = {}
        with self.store.session() as s:
            for folder_id, captions in parsed.items():
                report.bad_caption_rows += captions.bad_rows
                wanted.update(self._wanted_captions(s, captions, folder_id, images, report))
            have = embedding_keys(s, lazy.name, "text", list(set(wanted.values())))
        todo = {key: text for (_, text), key in wanted.items() if key not in have}
        meter = tracker.meter("captions", len(todo))
        with self.store.session() as s, s.begin():
            live = self._caption_rows(s, wanted)
        self._embed_texts(todo, lazy, meter)
        return live

    @staticmethod
    def _wanted_captions(s: Session, parsed: Captions, folder_id: int, images: dict[int, str],
                         report: BuildReport) -> dict[tuple[int, str], str]:
        """{(image row id, caption): text hash} of a folder's captions whose image is in the build; an
        image is named by its path in the folder, or by its file name where that is unique there."""
        ids = set(images)
        paths = {nfc(p): i for p, i in image_ids_by_path(s, folder_id).items() if i in ids}
        by_name = defaultdict(list)
        for path, image_id in paths.items():
            by_name[path.rsplit("/", 1)[-1]].append(image_id)
        wanted: dict[tuple[int, str], str] = {}
        for ref, text in parsed.rows:
            image_id = paths.get(ref) or (by_name[ref][0] if len(by_name.get(ref, ())) == 1 else None)
            if image_id is None:
                report.captions_for_unknown_images += 1
            else:
                wanted[(image_id, text)] = caption_key(text)
        return wanted

    @staticmethod
    def _caption_rows(s: Session, wanted: dict[tuple[int, str], str]) -> dict[int, str]:
        """{caption row id: text hash} (store.caption_row_ids)."""
        ids = caption_row_ids(s, list(wanted))
        return {ids[key]: text_hash for key, text_hash in wanted.items()}

    def _embed_texts(self, todo: dict[str, str], lazy: "_LazyEncoder", meter: _Meter) -> None:
        """Embed {text hash: text}, committing each 1,024 (a resumable step)."""
        keys = list(todo)
        for start in range(0, len(keys), 1024):
            chunk = keys[start:start + 1024]
            encoder = lazy.get()
            vectors = encoder.encode_texts([todo[k] for k in chunk])
            with self.store.session() as s, s.begin():
                save_embeddings(s, encoder.name, "text", chunk, vectors)
            meter.advance(len(chunk))

    # -- index files and publishing ----------------------------------------------------------

    def _vectors(self, model: str, kind: str, rows: dict[int, str], dim: int,
                 ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, their stored vectors): of every row, or of the rows `ids`."""
        if ids is None:
            ids = np.fromiter(rows, dtype=np.int64, count=len(rows))
        with self.store.session() as s:
            blobs = load_embeddings(s, model, kind, list({rows[i] for i in ids.tolist()}))
        return ids, vectors_from_bytes([blobs[rows[i]] for i in ids.tolist()], dim)

    def _write_index(self, build_dir: Path, file_name: str, kind: str, rows: dict[int, str], model: str, dim: int,
                     bank) -> str:
        """An index built in memory (with its exact vectors and penalties); returns its type."""
        ids, vectors = self._vectors(model, kind, rows, dim)
        vectors = vectors.reshape(-1, dim)
        index_type = self._index_type(len(ids), dim)
        index = faiss_index.build_index(vectors, ids, index_type, self.settings.use_gpu_faiss)
        faiss_index.write_build_index(build_dir, file_name, index, index_type, ids, vectors)
        if bank is not None:
            penalties = Penalties.of(ids, bank.penalties(vectors, kind))
            penalties.save(build_dir / faiss_index.PENALTY_FILES[file_name])
            if kind == "image" and len(ids):
                self._score_scale = ranking.score_scale(index, index_type, bank.text,
                                                        _lookup(ids, vectors) if faiss_index.is_lossy(index_type)
                                                        else None, penalties)
        return index_type

    def _write_ondisk_index(self, build_dir: Path, file_name: str, kind: str, rows: dict[int, str], model: str,
                            dim: int, bank) -> str:
        """An index of more than `ondisk_min_vectors`: its vectors read from the database shard by shard."""
        ids = np.sort(np.fromiter(rows, dtype=np.int64, count=len(rows)))
        index_type = self._index_type(len(ids), dim)
        sample_ids = np.random.default_rng(0).choice(ids, faiss_index.training_size(index_type, len(ids)),
                                                     replace=False)
        shard = self.settings.ondisk_shard_vectors
        shards = (self._vectors(model, kind, rows, dim, ids[start:start + shard]) for start in range(0, len(ids), shard))
        write_ondisk_index(build_dir, file_name, index_type, ids, self._vectors(model, kind, rows, dim, sample_ids)[1],
                           shards, self.settings, bank, kind)
        return index_type

    def _write_and_publish(self, build_id: int, encoder: "_LazyEncoder", images: dict[int, str],
                           captions: dict[int, str], folders: list, report: BuildReport, tracker: _BuildProgress,
                           start: float) -> None:
        indexing = tracker.meter("indexing", len(images) + len(captions))  # counted in vectors indexed
        settings = self.settings
        build_dir = faiss_index.build_dir_for(settings.index_dir, build_id)
        build_dir.mkdir(parents=True, exist_ok=True)
        params = {}
        self._score_scale: dict[str, float] = {}  # set with the image index, where the model has a bank
        bank = self._collection_bank(load_bank(encoder.name), images, encoder)  # a small file: no model loaded
        for kind, rows, file_name in (("image", images, faiss_index.IMAGES_FILE),
                                      ("text", captions, faiss_index.CAPTIONS_FILE)):
            if len(rows) >= max(1, settings.ondisk_min_vectors):
                index_type = self._write_ondisk_index(build_dir, file_name, kind, rows, encoder.name, encoder.dim, bank)
            else:
                index_type = self._write_index(build_dir, file_name, kind, rows, encoder.name, encoder.dim, bank)
            log.info("%s index: %d vectors, type %s", kind, len(rows), index_type)
            indexing.advance(len(rows))
            params.update(faiss_index.default_search_params(index_type))
            if kind == "image":
                report.image_index_type = index_type
            else:
                report.caption_index_type = index_type
        names = FolderNames({f.id: f.name for f in folders})
        Attributes.tabulate(*self.store.photo_attributes(set(images), set(captions)), names).write(build_dir)
        faiss_index.Manifest(build_id, encoder.name, encoder.dim, report.image_index_type,
                             report.caption_index_type, len(images), len(captions), params,
                             bank.describe() if bank else {}, self._score_scale,
                             [[f.id, f.name, f.path] for f in folders]).write(build_dir)
        report.seconds = time.perf_counter() - start
        self._publish(build_id, encoder, images, captions, {f.id for f in folders}, report)
        # Keep the new build and the one it replaced (readers may still be mid-swap); drop older ones.
        faiss_index.remove_unpublished(settings.index_dir, keep={build_id, *self._previous_published(build_id)})
        tracker.meter("done", 0)

    def _collection_bank(self, bank: "HubnessBank | None", images: dict[int, str],
                         encoder: "_LazyEncoder") -> "HubnessBank | None":
        if bank is None or len(images) < hubness.COLLECTION_BANK_MIN_IMAGES:
            return bank
        ids = np.sort(np.fromiter(images, dtype=np.int64, count=len(images)))
        sample = np.sort(np.random.default_rng(0).choice(ids, min(hubness.COLLECTION_BANK_SIZE, len(ids)),
                                                         replace=False))
        return bank.with_collection_images(self._vectors(encoder.name, "image", images, encoder.dim, sample)[1])

    def _previous_published(self, build_id: int) -> list[int]:
        return self.store.previous_published(build_id)

    def _publish(self, build_id: int, encoder: "_LazyEncoder", images: dict[int, str], captions: dict[int, str],
                 folder_ids: set[int], report: BuildReport) -> None:
        """The atomic switch: one transaction makes the new build current and drops stale rows and folders."""
        with self.store.session() as s, s.begin():
            report.n_removed = publish_build(s, build_id, images, captions, encoder.name, folder_ids, {
                "dim": encoder.dim, "image_index_type": report.image_index_type,
                "caption_index_type": report.caption_index_type, "n_images": report.n_images,
                "n_captions": report.n_captions, "n_embedded": report.n_embedded, "n_reused": report.n_reused,
                "n_skipped": len(report.skipped), "seconds": report.seconds})
            set_build_report(s, build_id, report.to_dict())  # with n_removed, known only now


def _lookup(ids: np.ndarray, vectors: np.ndarray):
    """An exact-vector lookup (ranking.ExactLookup) over vectors in memory."""
    rows = dict(zip(ids.tolist(), vectors))
    return lambda wanted: {i: rows[i] for i in wanted if i in rows}


def write_ondisk_index(build_dir: Path, file_name: str, index_type: str, ids: np.ndarray, sample: np.ndarray,
                       shards: Iterable[tuple[np.ndarray, np.ndarray]], settings: Settings, bank=None,
                       kind: str = "image") -> None:
    """An index never held in memory whole: IVF-PQ trained on `sample`, each (ids, vectors) shard
    added to a copy of it (in parallel Ray tasks with --ray), the shards merged into inverted lists
    on disk (faiss_index.merge_ondisk_shards); exact vectors (float16) and hubness penalties
    written as the shards go. `ids` are all the index's ids, sorted."""
    trained = faiss_index.trained_index(index_type, sample.shape[1], sample, settings.use_gpu_faiss)
    trained_path = build_dir / f"{file_name}.trained"
    faiss_index.write_index(trained, trained_path)
    exact = faiss_index.ExactVectorsWriter(build_dir, file_name, ids, sample.shape[1])
    add_shard = _shard_runner(settings.ray_address)
    paths, pending, penalties = [], [], np.zeros(len(ids), dtype=np.float32)
    for number, (shard_ids, vectors) in enumerate(shards):
        exact.put(shard_ids, vectors)
        if bank is not None:
            penalties[faiss_index.find_sorted(ids, shard_ids)[0]] = bank.penalties(vectors, kind)
        paths.append(build_dir / f"{file_name}.shard{number:04d}")
        pending.append(add_shard(str(trained_path), shard_ids, vectors, str(paths[-1])))
    _wait_for_shards(pending)
    exact.close()
    faiss_index.merge_ondisk_shards(build_dir, file_name, trained_path, paths)
    if bank is not None:
        Penalties.of(ids, penalties).save(build_dir / faiss_index.PENALTY_FILES[file_name])


def _shard_runner(ray_address: str):
    """faiss_index.add_shard run here, or as a Ray task (its result a reference) with --ray."""
    if not ray_address:
        return faiss_index.add_shard
    import ray

    from crossmodal.indexer import ray_embedding

    ray_embedding.connect(ray_address)
    remote = ray.remote(num_cpus=1)(faiss_index.add_shard)
    return remote.remote


def _wait_for_shards(pending: list) -> None:
    if pending and not isinstance(pending[0], int):
        import ray

        ray.get(pending)


class _LazyEncoder:
    """The build's encoder, loaded on first use; `dim` comes from the previous build when it can."""

    def __init__(self, builder: IndexBuilder, name: str, known_dim: int | None):
        self.builder, self.name, self._dim = builder, name, known_dim

    def get(self) -> Encoder:
        return self.builder.encoder(self.name)

    @property
    def loaded(self) -> bool:
        return self.builder._encoder is not None and self.builder._encoder.name == self.name

    @property
    def dim(self) -> int:
        return self._dim or self.get().dim
