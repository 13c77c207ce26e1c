"""FAISS indexes and the on-disk index format: the one place both are defined.

Layout of an index directory:

    INDEX_DIR/
      metadata.db                 SQLite metadata (unless CROSSMODAL_DATABASE_URL points elsewhere)
      builds/000007/
        images.faiss              image vectors, ids = images.id
        captions.faiss            caption vectors, ids = captions.id
        images.ids.npy            lossy index types only: the image ids, sorted, and
        images.vectors.npy          their full float32 vectors, row for row (ExactVectors)
        captions.ids.npy          ... the same for a lossy caption index
        captions.vectors.npy
        images.ivfdata            past CROSSMODAL_ONDISK_MIN_VECTORS: the IVF-PQ index's inverted lists, on
                                    disk and memory-mapped (images.faiss then holds only the quantizers),
                                    and the exact vectors beside it are float16
        images.attributes.npy     what filters look at: date taken, size, camera, captions per image id,
        images.paths.npy ...        and the sorted paths for folder filters (see attributes.py)
        images.penalty.npz        hubness penalty per image id (models with a hubness bank only)
        captions.penalty.npz      hubness penalty per caption id (see hubness.py)
        manifest.json             model, dim, index types, counts, search parameters, hubness, score scale

A build writes its directory completely, then the indexer marks it `published` in the
database in one transaction. Readers only open published builds, so they never see a
half-written index, and the previous build stays usable until the switch.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np

from crossmodal.indexer.prefetch import read_ahead_in_background

if TYPE_CHECKING:
    from crossmodal.indexer.attributes import Selection
    from crossmodal.indexer.hubness import Penalties
    from crossmodal.indexer.settings import Settings

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
IMAGES_FILE = "images.faiss"
CAPTIONS_FILE = "captions.faiss"
PENALTY_FILES = {IMAGES_FILE: "images.penalty.npz", CAPTIONS_FILE: "captions.penalty.npz"}
EXACT_FILES = {IMAGES_FILE: ("images.ids.npy", "images.vectors.npy"),
               CAPTIONS_FILE: ("captions.ids.npy", "captions.vectors.npy")}
ONDISK_FILES = {IMAGES_FILE: "images.ivfdata", CAPTIONS_FILE: "captions.ivfdata"}


@dataclass
class Manifest:
    build_id: int
    model: str
    dim: int
    image_index_type: str
    caption_index_type: str
    n_images: int
    n_captions: int
    search_params: dict[str, int] = field(default_factory=dict)  # e.g. {"nprobe": 32, "efSearch": 64}
    hubness: dict = field(default_factory=dict)  # the correction's settings; empty: none
    score_scale: dict = field(default_factory=dict)  # text->image best scores of typical queries (ranking.score_scale)
    folders: list = field(default_factory=list)  # [id, name, path] of the folders the build holds (folders.py)

    def write(self, build_dir: Path) -> None:
        (build_dir / MANIFEST).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, build_dir: Path) -> "Manifest":
        return cls(**json.loads((build_dir / MANIFEST).read_text()))


def build_dir_for(index_dir: Path, build_id: int) -> Path:
    return index_dir / "builds" / f"{build_id:06d}"


RERANK_CANDIDATES = 100  # candidates a lossy index proposes; their exact vectors decide the order
LONG_SCAN_CODES = 100_000  # codes one query scans past which it is split over the cores (split_long_scans)


def choose_index_type(n: int, dim: int, forced: str = "", exact_max: int = 50_000) -> str:
    """A FAISS index-factory string: exact search while it is fast enough, then IVF-PQ.

    IVF with ~sqrt(n) lists keeps k-means to minutes on a small CPU; PQ with 4 dimensions
    per byte keeps a vector under 256 bytes in memory (128 of code at 512-d). PQ alone
    ranks neighbours loosely, so search re-scores its top RERANK_CANDIDATES with the exact
    vectors the database stores anyway (measured: Recall@10 0.71 -> 0.98 at 200k).
    """
    if forced:
        return forced
    if n <= exact_max:
        return "Flat"
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return f"IVF{nlist},PQ{dim // 4}" if dim % 4 == 0 else f"IVF{nlist},SQ8"


def is_lossy(index_type: str) -> bool:
    """Whether the index stores compressed vectors (its scores are approximate)."""
    return any(codec in index_type for codec in ("PQ", "SQ", "LSH", "RaBitQ"))


def rerank_depth(index_type: str) -> int:
    return RERANK_CANDIDATES if is_lossy(index_type) else 0


def default_search_params(index_type: str) -> dict[str, int]:
    """IVF probes 1/16 of its lists, at least 16 and at most 64. A query's time grows with the
    codes it scans: at 10M vectors (IVF4096), nprobe 64 gave Recall@10 0.976 at 24.5 ms p50 over
    HTTP, and 256 gave 0.987 at 43 ms (tests/benchmarks/ondisk_scale.py); up to 1M, 1/16 is at most 64."""
    if index_type.startswith("IVF"):
        nlist = int(index_type[3:].split(",")[0].split("_")[0])
        return {"nprobe": max(16, min(64, nlist // 16))}
    if "HNSW" in index_type:
        return {"efSearch": 128}
    return {}


def find_sorted(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions, found) of `wanted` ids in `sorted_ids` (non-empty): one binary search each.
    The lookup of per-id arrays stored sorted by id (exact vectors, hubness penalties)."""
    pos = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == wanted


@dataclass(frozen=True)
class ExactVectors:
    """The full vectors of a lossy index, memory-mapped from the build directory, for re-ranking.

    A query re-scores its 100 candidates, rows at random places. Read from the database,
    those rows took 2.8 ms a query at 100k right after a text encoding (as when serving);
    from these two arrays, sorted by id, a binary search and one gather took 0.2-0.3 ms.
    They stay on disk: the kernel's page cache, not the process, holds what queries touch.
    """

    ids: np.ndarray  # int64, sorted
    vectors: np.ndarray  # float32 [n, dim] (float16 beside an on-disk index), row i is the vector of ids[i]
    reader: "_RowReader | None" = None  # float16 files: rows read with pread, not through the mapping

    @staticmethod
    def write(build_dir: Path, index_file: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if np.any(ids[1:] < ids[:-1]):
            order = np.argsort(ids, kind="stable")
            ids, vectors = ids[order], vectors[order]
        ids_file, vectors_file = EXACT_FILES[index_file]
        np.save(build_dir / ids_file, ids)
        np.save(build_dir / vectors_file, np.ascontiguousarray(vectors, dtype=np.float32))

    @classmethod
    def open(cls, build_dir: Path, index_file: str) -> "ExactVectors | None":
        """None where the build has no such files (a Flat index, or a build from before them)."""
        paths = [build_dir / name for name in EXACT_FILES[index_file]]
        if not all(path.is_file() for path in paths):
            return None
        read_ahead_in_background(paths)  # cold pages cost a disk read each: 17 ms a query at 1M
        ids, vectors = (np.load(path, mmap_mode="r") for path in paths)
        return cls(ids, vectors, _RowReader(vectors) if vectors.dtype == np.float16 else None)

    def get(self, ids: list[int]) -> dict[int, np.ndarray]:
        """The vectors of these ids (an id without one is absent)."""
        wanted = np.asarray(ids, dtype=np.int64)
        if not len(self.ids) or not len(wanted):
            return {}
        pos, found = find_sorted(self.ids, wanted)
        rows = self.reader.rows(pos[found]) if self.reader else self.vectors[pos[found]]  # a copy, not the mapping
        return dict(zip(wanted[found].tolist(), rows.astype(np.float32, copy=False)))

    def __contains__(self, item_id: int) -> bool:
        return bool(len(self.ids)) and bool(find_sorted(self.ids, np.array([item_id], dtype=np.int64))[1][0])


class _RowReader:
    """Rows of a memory-mapped .npy file read with pread. Beside an on-disk index the exact vectors
    run to gigabytes, read ahead into the page cache in large folios, and a fault on the mapping
    maps a whole folio: 1.3 MB of resident memory a row, measured at 10M (9.3 GiB of RSS after 320
    queries). pread copies just the rows; the page cache still serves them."""

    def __init__(self, mapped: np.memmap):
        self.fd = os.open(mapped.filename, os.O_RDONLY)
        self.offset, self.dtype, self.dim = mapped.offset, mapped.dtype, mapped.shape[1]
        self.row_bytes = self.dim * mapped.dtype.itemsize

    def rows(self, positions: np.ndarray) -> np.ndarray:
        data = b"".join(os.pread(self.fd, self.row_bytes, self.offset + int(p) * self.row_bytes) for p in positions)
        return np.frombuffer(data, dtype=self.dtype).reshape(len(positions), self.dim)

    def __del__(self):
        os.close(self.fd)


def gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources = None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """Move an index to GPU 0 when GPU FAISS is installed and a GPU is present; else unchanged."""
    global _gpu_resources
    if not gpu_available():
        return index
    try:
        _gpu_resources = _gpu_resources or faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
    except RuntimeError as err:  # index types without a GPU implementation stay on CPU
        log.warning("FAISS index stays on CPU: %s", err)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if gpu_available() and "Gpu" in type(index).__name__ else index


def training_size(index_type: str, n: int) -> int:
    """64 points per IVF list (at least 65,536, enough for PQ's 256 centroids per sub-space), not
    FAISS's up-to-256: training time is what limits a 1M build on a small CPU."""
    if not index_type.startswith("IVF"):
        return n
    nlist = int(index_type[3:].split(",")[0].split("_")[0])
    return min(n, max(2**16, 64 * nlist))


def trained_index(index_type: str, dim: int, sample: np.ndarray, use_gpu: bool = True) -> faiss.Index:
    """An empty inner-product index of `index_type`, trained on `sample` (on the GPU where there is one)."""
    inner = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    if len(sample) and not inner.is_trained:
        trainer = to_gpu(inner) if use_gpu else inner
        trainer.train(np.ascontiguousarray(sample, dtype=np.float32))
        inner = to_cpu(trainer)
    return inner


def build_index(vectors: np.ndarray, ids: np.ndarray, index_type: str, use_gpu: bool = True) -> faiss.Index:
    """Inner-product index over L2-normalised vectors, ids mapped to database rows."""
    dim = vectors.shape[1] if vectors.ndim == 2 and vectors.shape[1] else 1
    n_train = training_size(index_type, len(vectors))
    sample = vectors[np.random.default_rng(0).choice(len(vectors), n_train, replace=False)] if len(vectors) else vectors
    inner = trained_index(index_type, dim, sample, use_gpu)
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    if index_type.startswith("IVF"):
        # Queries by indexed id (similar images, captions of an image) reconstruct stored vectors,
        # which IVF can only do with a direct map; it is saved with the index.
        faiss.extract_index_ivf(index).make_direct_map()
    return index


def apply_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    """Set each parameter the index has: the manifest's parameters serve both indexes of a
    build, and an IVF image index often sits beside a Flat caption index (no nprobe there)."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError:
            log.debug("search parameter %s does not apply to %s", name, type(index).__name__)
    split_long_scans(index)  # follows nprobe


def write_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(to_cpu(index), str(path))


def write_build_index(build_dir: Path, index_file: str, index: faiss.Index, index_type: str,
                      ids: np.ndarray, vectors: np.ndarray) -> None:
    """An index file of a build, and beside a lossy one the ExactVectors that re-rank its candidates."""
    write_index(index, build_dir / index_file)
    if is_lossy(index_type):
        ExactVectors.write(build_dir, index_file, ids, vectors)


def read_index(path: Path, params: dict[str, int], use_gpu: bool = True) -> faiss.Index:
    """An index file of a build; one with on-disk inverted lists maps them from beside it and stays on the CPU."""
    ondisk = (path.parent / ONDISK_FILES.get(path.name, "-")).is_file()
    index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0)
    apply_search_params(index, params)
    return to_gpu(index) if use_gpu and not ondisk else index


def is_ondisk(build_dir: Path, index_file: str) -> bool:
    return (build_dir / ONDISK_FILES[index_file]).is_file()


def indexed_ids(index: faiss.Index, exact: ExactVectors | None) -> np.ndarray:
    """The row ids an index holds: its id map, or for an on-disk IVF index (ids in its lists,
    no map in memory) the ids of its exact vectors, which are the same rows."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map)
    if exact is not None:
        return np.asarray(exact.ids)
    return np.arange(index.ntotal)


# -- indexes larger than memory --------------------------------------------------------------

def ondisk_index_type(n: int, dim: int, forced: str = "") -> str:
    """On-disk lists need IVF: a forced IVF type is kept, anything else becomes the automatic IVF-PQ."""
    if forced.startswith("IVF"):
        return forced
    nlist = 2 ** round(math.log2(math.sqrt(n)))
    return f"IVF{nlist},PQ{dim // 4}" if dim % 4 == 0 else f"IVF{nlist},SQ8"


def add_shard(trained_path: str, ids: np.ndarray, vectors: np.ndarray, shard_path: str) -> int:
    """One shard: the trained empty index, these vectors added, written to `shard_path`. A plain
    function of files and arrays, so that Ray tasks can run shards in parallel."""
    index = faiss.read_index(trained_path)
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))
    faiss.write_index(index, shard_path)
    return index.ntotal


def merge_ondisk_shards(build_dir: Path, index_file: str, trained_path: Path, shard_paths: list[Path]) -> None:
    """Merge the shards' inverted lists into one on-disk file (FAISS OnDiskInvertedLists) beside
    `index_file`, which then holds only the trained quantizers; the shards are removed."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.read_index(str(trained_path))
    merge_ondisk(index, [str(p) for p in shard_paths], str(build_dir / ONDISK_FILES[index_file]))
    faiss.write_index(index, str(build_dir / index_file))
    for path in (trained_path, *shard_paths):
        path.unlink()


class ExactVectorsWriter:
    """ExactVectors written row by row into float16 files (an on-disk build cannot hold them all)."""

    def __init__(self, build_dir: Path, index_file: str, ids: np.ndarray, dim: int):
        ids_file, vectors_file = EXACT_FILES[index_file]
        self.ids = np.sort(np.asarray(ids, dtype=np.int64))
        np.save(build_dir / ids_file, self.ids)
        self.vectors = np.lib.format.open_memmap(build_dir / vectors_file, mode="w+", dtype=np.float16,
                                                 shape=(len(self.ids), dim))

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        pos, _ = find_sorted(self.ids, np.asarray(ids, dtype=np.int64))
        self.vectors[pos] = vectors.astype(np.float16)

    def close(self) -> None:
        self.vectors.flush()
        del self.vectors


PREFILTER_MAX_SHARE = 0.2  # exhaustive indexes: selections of at most this share are searched with a selector


def search_selected(index: faiss.Index, queries: np.ndarray, k: int,
                    selection: "Selection") -> tuple[np.ndarray, np.ndarray]:
    """Top-k among the selected ids only: k results whenever k selected ids are indexed.

    A selective filter pre-filters inside FAISS: an IDSelector over the selection, and for IVF every
    list probed (the selected ids may lie in any list; codes outside the selection cost a bit test).
    A broad one post-filters: the plain search asks for k / share candidates (twice that, for luck),
    keeps the selected, and goes 4x deeper while a row is short, up to the whole index. A GPU index,
    which takes no selector, always post-filters. Rows are padded with id -1.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, len(selection.ids)))
    if not len(selection.ids):
        return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
    if prefilters(index, selection, k):
        return search(index, queries, k, _selector_params(index, selection))
    depth = min(index.ntotal, max(k, math.ceil(2 * k / max(selection.share, 1e-9))))
    while True:
        scores, ids = search(index, queries, depth)
        kept = selection.contains(ids)
        if kept.sum(axis=1).min() >= k or depth >= index.ntotal:
            break
        depth = min(index.ntotal, depth * 4)
    if kept.sum(axis=1).min() < k and _takes_selectors(index):  # IVF's probed lists held too few
        return search(index, queries, k, _selector_params(index, selection))
    order = np.argsort(~kept, axis=1, kind="stable")[:, :k]  # the kept ones first, in rank order
    kept = np.take_along_axis(kept, order, 1)
    return (np.where(kept, np.take_along_axis(scores, order, 1), -np.inf),
            np.where(kept, np.take_along_axis(ids, order, 1), -1))


def prefilters(index: faiss.Index, selection: "Selection", k: int) -> bool:
    """Whether a selection is searched with a selector (else post-filtered). IVF: when the lists a
    plain search probes would hold fewer than 2k selected codes, since the selector search probes
    every list (at 100k, IVF256 at nprobe 16: below 3.2 % of the collection for k = 100; a 10 %
    filter took 5.3 ms in the engine with the selector, 1.9 ms post-filtered). Exhaustive indexes:
    up to PREFILTER_MAX_SHARE, where skipping the unselected saves more than it costs."""
    if not _takes_selectors(index):
        return False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return selection.share <= PREFILTER_MAX_SHARE
    probed = ivf.ntotal * min(ivf.nprobe, ivf.nlist) / max(1, ivf.nlist)
    return selection.share * probed < 2 * k


def _takes_selectors(index: faiss.Index) -> bool:
    return "Gpu" not in type(faiss.downcast_index(index)).__name__


def _selector_params(index: faiss.Index, selection: "Selection") -> faiss.SearchParameters:
    ivf = faiss.try_extract_index_ivf(index)
    params = faiss.SearchParametersIVF() if ivf is not None else faiss.SearchParameters()
    if ivf is not None:
        params.nprobe = ivf.nlist
    params.sel = selection.selector()
    params.referenced = selection  # the selector points into the selection's bitmap
    return params


def search(index: faiss.Index, queries: np.ndarray, k: int,
           params: faiss.SearchParameters | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids); ids of -1 (fewer than k vectors) are dropped by callers.

    One query runs on the calling thread alone. FAISS's OpenMP team gains nothing on a single
    short query, and its threads spin after each search: back to back, they took 2.3 ms a query
    from the text encoding that followed (engine p50 13.9 -> 11.4 ms at 100k). The thread
    count is an OpenMP setting of the calling thread, restored at once, so batch searches,
    training and adding on any thread keep every core. A long scan (split_long_scans) keeps
    every core for one query too.
    """
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) != 1 or _splits_scans(index):
        return index.search(queries, k, params=params)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(queries, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


def split_long_scans(index: faiss.Index) -> None:
    """An IVF index whose query scans at least LONG_SCAN_CODES codes splits its lists over the cores
    (FAISS parallel_mode 1), even for one query. At 2M IVF-PQ vectors and ~125k codes a query, one
    query took 3.9 ms on 2 cores against 7.6 ms on one. In-memory builds up to 2M (IVF1024 or
    IVF2048 at nprobe 64: ~62k codes a query) keep one core a query, as search_scale measured them."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # both ways: parameters applied again with a smaller nprobe go back to one core
        ivf.parallel_mode = int(ivf.nprobe * ivf.ntotal >= LONG_SCAN_CODES * max(1, ivf.nlist))


def _splits_scans(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and ivf.parallel_mode == 1


@dataclass(frozen=True)
class OpenedBuild:
    """Everything search needs from a published build directory, opened once."""

    build_dir: Path
    manifest: Manifest
    images: faiss.Index
    captions: faiss.Index
    image_penalties: "Penalties | None"  # hubness correction of text -> image search
    caption_penalties: "Penalties | None"  # ... and of image -> caption search
    image_vectors: ExactVectors | None  # a lossy index's re-rank vectors
    caption_vectors: ExactVectors | None


def open_build(settings: "Settings", build_id: int) -> OpenedBuild:
    """Open a published build: the one place the engine, `eval` and `check` do it (so they rank alike).
    `settings.search_nprobe`, when set, overrides the nprobe the build chose."""
    from crossmodal.indexer.hubness import load_build_penalties

    build_dir = build_dir_for(settings.index_dir, build_id)
    manifest = Manifest.read(build_dir)
    params = {**manifest.search_params, **({"nprobe": settings.search_nprobe} if settings.search_nprobe else {})}
    images, captions = (read_index(build_dir / name, params, settings.use_gpu_faiss)
                        for name in (IMAGES_FILE, CAPTIONS_FILE))
    image_penalties, caption_penalties = load_build_penalties(build_dir, settings.hubness_correction)
    return OpenedBuild(build_dir, manifest, images, captions, image_penalties, caption_penalties,
                       ExactVectors.open(build_dir, IMAGES_FILE), ExactVectors.open(build_dir, CAPTIONS_FILE))


def remove_unpublished(index_dir: Path, keep: set[int]) -> None:
    """Delete build directories that are neither published nor kept (crashed or superseded builds)."""
    builds = index_dir / "builds"
    if not builds.is_dir():
        return
    for child in builds.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) not in keep:
            shutil.rmtree(child, ignore_errors=True)
