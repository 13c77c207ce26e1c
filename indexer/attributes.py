"""What search filters look at: a columnar table of a build's image attributes, and selections of ids.

A build writes the table beside its index, so a filter always describes exactly the images the
served index holds, and runs over numpy arrays instead of the database (at 100k images a filter
takes well under a millisecond; the matching ids out of SQL took tens). Files in a build directory:

    images.attributes.npy   one row per image, sorted by id (ROW_TYPE): its folder's id, date taken, size,
                              camera, captions
    images.paths.npy        the images' paths as shown (folders.FolderNames), sorted (UTF-8 bytes): a
                              folder is a range, found by bisection
    images.path_rows.npy    for each sorted path, its row in images.attributes.npy
    images.cameras.json     camera names; a row's `camera` is an index into them (-1: none recorded)
    captions.images.npy     [caption id, image id] of every caption, sorted by caption id: caption
                              searches are filtered by their image's attributes

All are memory-mapped when opened: an index larger than memory keeps its table on disk too.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from crossmodal.indexer.faiss_index import find_sorted
from crossmodal.indexer.folders import FolderNames

ROW_TYPE = np.dtype([("id", "<i8"), ("folder", "<i4"), ("taken_at", "<f8"), ("taken_from_exif", "?"),
                     ("width", "<i4"), ("height", "<i4"), ("camera", "<i4"), ("captioned", "?")])
FILES = {"rows": "images.attributes.npy", "paths": "images.paths.npy", "path_rows": "images.path_rows.npy",
         "cameras": "images.cameras.json", "captions": "captions.images.npy"}


def camera_name(make: str | None, model: str | None) -> str | None:
    """One name per camera: the model where it already names the maker ("Canon EOS 5D"), else both."""
    make, model = (make or "").strip(), (model or "").strip()
    if model and make and not model.lower().startswith(make.split()[0].lower()):
        return f"{make} {model}"
    return model or make or None


@dataclass(frozen=True)
class Attributes:
    rows: np.ndarray  # ROW_TYPE, sorted by id
    paths: np.ndarray  # bytes (S), sorted
    path_rows: np.ndarray  # int64
    cameras: list[str]
    captions: np.ndarray  # int64 [n, 2]: caption id, its image id; sorted by caption id

    @classmethod
    def tabulate(cls, images: list[tuple], captions: list[tuple[int, int]], names: FolderNames) -> "Attributes":
        """From (id, folder id, path, width, height, taken_at, taken_from, camera_make, camera_model) rows
        and (caption id, image id) pairs (store.photo_attributes); paths are tabulated as `names` shows them."""
        images = sorted(images)
        captioned = {image_id for _, image_id in captions}
        cameras_of = [camera_name(make, model) for *_, make, model in images]
        cameras = sorted({name for name in cameras_of if name})
        camera_ids = {name: i for i, name in enumerate(cameras)}
        rows = np.zeros(len(images), dtype=ROW_TYPE)
        for row, (image_id, folder_id, _, width, height, taken_at, taken_from, *_), name in zip(rows, images, cameras_of):
            row["id"], row["folder"], row["width"], row["height"] = image_id, folder_id, width, height
            row["taken_at"] = taken_at if taken_at is not None else np.nan
            row["taken_from_exif"] = taken_from == "exif"
            row["camera"], row["captioned"] = camera_ids.get(name, -1), image_id in captioned
        paths = np.array([names.shown(folder_id, path).encode() for _, folder_id, path, *_ in images],
                         dtype=bytes) if images else np.zeros(0, "S1")
        order = np.argsort(paths, kind="stable")
        pairs = np.array(sorted(captions), dtype=np.int64).reshape(-1, 2)
        return cls(rows, paths[order], order.astype(np.int64), cameras, pairs)

    def write(self, build_dir: Path) -> None:
        np.save(build_dir / FILES["rows"], self.rows)
        np.save(build_dir / FILES["paths"], self.paths)
        np.save(build_dir / FILES["path_rows"], self.path_rows)
        np.save(build_dir / FILES["captions"], self.captions)
        (build_dir / FILES["cameras"]).write_text(json.dumps(self.cameras, ensure_ascii=False))

    @classmethod
    def open(cls, build_dir: Path) -> "Attributes | None":
        """None for a build written before filters existed, or before folders (the engine tabulates it from
        the database)."""
        if not all((build_dir / name).is_file() for name in FILES.values()):
            return None
        rows, paths, path_rows, captions = (np.load(build_dir / FILES[name], mmap_mode="r")
                                            for name in ("rows", "paths", "path_rows", "captions"))
        if rows.dtype != ROW_TYPE:
            return None
        return cls(rows, paths, path_rows, json.loads((build_dir / FILES["cameras"]).read_text()), captions)

    @property
    def ids(self) -> np.ndarray:
        return self.rows["id"]

    def folder_rows(self, folder: str) -> np.ndarray:
        """Rows of the images under `folder` (a path prefix ending at a '/'), found by bisection (unsorted)."""
        prefix = folder.strip("/").encode() + b"/"
        start = np.searchsorted(self.paths, prefix, side="left")
        end = np.searchsorted(self.paths, prefix[:-1] + b"0", side="left")  # '0' is the byte after '/'
        return self.path_rows[start:end]

    def folder_counts(self) -> tuple[Counter, Counter]:
        """(photos, captions) per folder id."""
        rows, found = self.positions(np.asarray(self.captions[:, 1]))
        folders = np.asarray(self.rows["folder"])
        return Counter(folders.tolist()), Counter(folders[rows[found]].tolist())

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) of these ids in the table."""
        if not len(self.rows):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        return find_sorted(self.ids, np.asarray(ids, dtype=np.int64))

    def selection(self, mask: np.ndarray) -> "Selection":
        return Selection.of(np.asarray(self.ids[mask]), len(self.rows))

    def caption_selection(self, images: "Selection") -> "Selection":
        """The captions of the selected images: a caption search filtered by its images' attributes."""
        return Selection.of(np.asarray(self.captions[images.contains(self.captions[:, 1]), 0]), len(self.captions))


@dataclass(frozen=True)
class Selection:
    """A set of image ids a query is restricted to: a FAISS selector (pre-filtering inside the index)
    and a membership test (post-filtering candidates), both over one bitmap, bit i for id i."""

    ids: np.ndarray  # int64, sorted
    total: int  # images in the build: the selection's share decides pre- or post-filtering
    bitmap: np.ndarray  # uint8, little-endian bit order: FAISS IDSelectorBitmap's layout

    @classmethod
    def of(cls, ids: np.ndarray, total: int) -> "Selection":
        ids = np.asarray(ids, dtype=np.int64)
        bits = np.zeros(int(ids.max()) + 1 if len(ids) else 1, dtype=bool)
        bits[ids] = True
        return cls(ids, total, np.packbits(bits, bitorder="little"))

    @property
    def share(self) -> float:
        return len(self.ids) / max(1, self.total)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < len(self.bitmap) * 8)
        safe = np.where(inside, ids, 0)
        return inside & ((self.bitmap[safe >> 3] >> (safe & 7)) & 1).astype(bool)

    def selector(self) -> faiss.IDSelector:
        """A FAISS selector over the bitmap; it points into `self.bitmap`, so it lives no longer than this."""
        return faiss.IDSelectorBitmap(len(self.bitmap), faiss.swig_ptr(self.bitmap))
