"""`crossmodal check`: do the published index, the stored embeddings and the database agree?

Problems make the published build unservable or wrong (a missing index file, FAISS ids
that are not database rows, vectors that differ from the stored embeddings). Warnings
are states the next `crossmodal index` resolves by itself (an interrupted build, files
changed on disk since the build).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodal.indexer import faiss_index
from crossmodal.indexer.hubness import Penalties
from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import (Build, Store, vectors_from_bytes)

VECTOR_SAMPLE = 20_000  # vectors compared per index: enough to catch a mismatch, quick at 1M
EXACT_TOLERANCE = 1e-5
FLOAT16_TOLERANCE = 1e-3  # on-disk builds keep float16 exact vectors: 2^-12 of error below 1
LOSSY_SAMPLE = 2_000  # SQ and PQ store approximations: each decoded vector must be nearest its own
LOSSY_MARGIN = 0.02


@dataclass
class CheckReport:
    build_id: int | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_index(settings: Settings) -> CheckReport:
    report = CheckReport()
    store = Store(settings.resolved_database_url())
    try:
        build = store.published_build()
        if build is None:
            report.problems.append(f"no published build in {settings.index_dir}: run `crossmodal index FOLDER`")
            return report
        report.build_id = build.id
        pending = _check_other_builds(store, settings.index_dir, build.id, report)
        manifest = _check_manifest(build, settings.index_dir, report)
        if manifest is not None:
            _check_contents(store, build, manifest, settings.index_dir, pending, report)
        if not report.problems:
            _check_opens(settings, build.id, report)
    finally:
        store.close()
    return report


def _check_opens(settings: Settings, build_id: int, report: CheckReport) -> None:
    """The build opens as `crossmodal serve` and `eval` open it (faiss_index.open_build). The checks
    before read each file on its own, so that every fault is named rather than the first."""
    try:
        faiss_index.open_build(settings, build_id)
    except Exception as err:  # whatever the service would fail on, reported as a problem
        report.problems.append(f"build {build_id} does not open as the service opens it: {type(err).__name__}: {err}")


def _check_other_builds(store: Store, index_dir: Path, published: int, report: CheckReport) -> bool:
    """Warn of interrupted builds; True when one newer than the published build left pending rows."""
    statuses = store.build_statuses()
    for build_id, status in sorted(statuses.items()):
        if status == "building":
            report.warnings.append(f"build {build_id} was interrupted; the next `crossmodal index` reuses its work")
    builds_dir = index_dir / "builds"
    for child in sorted(builds_dir.iterdir()) if builds_dir.is_dir() else []:
        if child.name.isdigit() and statuses.get(int(child.name)) not in ("published", "superseded"):
            report.warnings.append(f"{child} holds an unpublished build; the next build removes it")
    return any(i > published and status in ("building", "failed") for i, status in statuses.items())


def _check_manifest(build: Build, index_dir: Path, report: CheckReport) -> faiss_index.Manifest | None:
    build_dir = faiss_index.build_dir_for(index_dir, build.id)
    try:
        manifest = faiss_index.Manifest.read(build_dir)
    except (OSError, ValueError, TypeError) as err:
        report.problems.append(f"build {build.id}: manifest unreadable in {build_dir}: {err}")
        return None
    expected = {"build_id": build.id, "model": build.model, "dim": build.dim, "n_images": build.n_images,
                "n_captions": build.n_captions, "image_index_type": build.image_index_type,
                "caption_index_type": build.caption_index_type}
    for key, value in expected.items():
        if getattr(manifest, key) != value:
            report.problems.append(f"manifest {key} is {getattr(manifest, key)!r}, the database says {value!r}")
    return manifest


def _check_contents(store: Store, build: Build, manifest: faiss_index.Manifest, index_dir: Path, pending: bool,
                    report: CheckReport) -> None:
    build_dir = faiss_index.build_dir_for(index_dir, build.id)
    images, captions = store.image_keys(), store.caption_keys()
    image_vectors = store.embeddings(manifest.model, "image", list(set(images.values())))
    text_vectors = store.embeddings(manifest.model, "text", list(set(captions.values())))
    files = store.image_files()
    report.counts = {"images": len(images), "captions": len(captions)}
    for kind, file_name, rows, stored, index_type in (
            ("image", faiss_index.IMAGES_FILE, images, image_vectors, manifest.image_index_type),
            ("caption", faiss_index.CAPTIONS_FILE, captions, text_vectors, manifest.caption_index_type)):
        _check_faiss_file(build_dir / file_name, kind, rows, stored, manifest, index_type, pending, report)
    _check_files_on_disk(files, report)


def _check_penalties(path: Path, ids: np.ndarray, manifest: faiss_index.Manifest, report: CheckReport) -> None:
    """With a hubness correction, every indexed id has exactly one penalty (see hubness.py)."""
    if not manifest.hubness:
        return
    penalty_path = path.parent / faiss_index.PENALTY_FILES[path.name]
    try:
        penalties = Penalties.load(penalty_path)
    except (OSError, ValueError, KeyError) as err:
        report.problems.append(f"{penalty_path.name} cannot be read: {err}")
        return
    if penalties is None:
        report.problems.append(f"{penalty_path.name} is missing: the manifest records a hubness correction")
    elif not np.array_equal(penalties.ids, np.sort(ids)):
        report.problems.append(f"{penalty_path.name}: its ids differ from {path.name}'s")


def _check_exact_vectors(path: Path, ids: np.ndarray, rows: dict[int, str], stored: dict[str, bytes],
                         manifest: faiss_index.Manifest, report: CheckReport) -> None:
    """A lossy index re-ranks with its build's ExactVectors: the same ids, the stored vectors."""
    try:
        exact = faiss_index.ExactVectors.open(path.parent, path.name)
    except (OSError, ValueError) as err:
        report.problems.append(f"the exact vectors of {path.name} cannot be read: {err}")
        return
    if exact is None:
        report.warnings.append(f"{path.name} has no exact-vector files beside it (a build from an older version): "
                               "search re-ranks from the database, more slowly, until the next `crossmodal index`")
    elif not np.array_equal(exact.ids, np.sort(ids)) or exact.vectors.shape != (len(ids), manifest.dim):
        report.problems.append(f"the exact vectors beside {path.name} do not match its ids")
    else:
        sample = [i for i in exact.ids[:VECTOR_SAMPLE].tolist() if i in rows and rows[i] in stored]
        found, expected = exact.get(sample), vectors_from_bytes([stored[rows[i]] for i in sample], manifest.dim)
        tolerance = EXACT_TOLERANCE if exact.vectors.dtype == np.float32 else FLOAT16_TOLERANCE
        if sample and np.abs(np.stack([found[i] for i in sample]) - expected).max() > tolerance:
            report.problems.append(f"the exact vectors beside {path.name} differ from the stored embeddings")


def _check_faiss_file(path: Path, kind: str, rows: dict[int, str], stored: dict[str, bytes],
                      manifest: faiss_index.Manifest, index_type: str, pending: bool, report: CheckReport) -> None:
    try:
        index = faiss_index.read_index(path, {}, use_gpu=False)
    except (OSError, RuntimeError) as err:
        report.problems.append(f"{path} cannot be read: {str(err).splitlines()[0]}")
        return
    if index.d != manifest.dim:
        report.problems.append(f"{path}: dimension {index.d}, the manifest says {manifest.dim}")
        return
    ondisk = faiss_index.is_ondisk(path.parent, path.name)
    try:
        ids = faiss_index.indexed_ids(index, faiss_index.ExactVectors.open(path.parent, path.name) if ondisk else None)
    except (OSError, ValueError) as err:
        report.problems.append(f"the exact vectors of {path.name} cannot be read: {err}")
        return
    if ondisk and len(ids) != index.ntotal:
        report.problems.append(f"{path.name} holds {index.ntotal} vectors, its exact-vector files {len(ids)}")
    _check_penalties(path, ids, manifest, report)
    if faiss_index.is_lossy(index_type):
        _check_exact_vectors(path, ids, rows, stored, manifest, report)
    in_index, in_db = set(ids.tolist()), set(rows)
    # Only served rows must have their vectors: an interrupted build writes caption rows when its
    # captions phase starts and their vectors as it goes, and the next build completes them.
    missing = sorted(i for i in in_index & in_db if rows[i] not in stored)
    if missing:
        report.problems.append(f"{len(missing)} {kind} rows in {path.name} have no stored embedding "
                               f"(e.g. id {missing[0]})")
    if in_index - in_db:
        report.problems.append(f"{path.name}: {len(in_index - in_db)} ids are not {kind} rows in the database "
                               f"(e.g. {min(in_index - in_db)})")
    if in_db - in_index and pending:  # written by an interrupted build, never served
        report.warnings.append(f"{len(in_db - in_index)} {kind} rows from an interrupted build are not served yet; "
                               "the next `crossmodal index` publishes them")
    elif in_db - in_index:
        report.problems.append(f"{len(in_db - in_index)} {kind} rows are missing from {path.name} "
                               f"(e.g. id {min(in_db - in_index)})")
    sample = [i for i in ids[:VECTOR_SAMPLE].tolist() if i in rows and rows[i] in stored]
    if not sample or ondisk:  # on-disk lists keep no id -> code map: their exact vectors were compared above
        return
    expected = vectors_from_bytes([stored[rows[i]] for i in sample], manifest.dim)
    found = np.stack([index.reconstruct(int(i)) for i in sample])
    if faiss_index.is_lossy(index_type):  # compressed codes: each must still point at its own vector
        found, expected, sample = found[:LOSSY_SAMPLE], expected[:LOSSY_SAMPLE], sample[:LOSSY_SAMPLE]
        similarity = found @ expected.T
        own = np.diag(similarity)
        bad = [i for i, o, best in zip(sample, own, similarity.max(axis=1)) if o < best - LOSSY_MARGIN]
        how = "closer to another row's vector than to its own"
    else:
        worst = np.abs(found - expected).max(axis=1)
        bad = [i for i, err in zip(sample, worst) if err > EXACT_TOLERANCE]
        how = f"by up to {worst.max():.3g}"
    if bad:
        report.problems.append(f"{len(bad)} of {len(sample)} {kind} vectors in {path.name} differ from the stored "
                               f"embeddings (e.g. id {bad[0]}; {how})")


def _check_files_on_disk(files: dict[int, Path], report: CheckReport) -> None:
    gone = [str(f) for f in files.values() if not f.is_file()]
    if gone:
        report.warnings.append(f"{len(gone)} indexed files are no longer on disk (e.g. {gone[0]}); "
                               "they are served as 404 until the next `crossmodal index`")
