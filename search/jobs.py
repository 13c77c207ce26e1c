"""Rebuild jobs for the service: one at a time, run by the indexer on a worker thread.

The service never writes an index itself: a job calls `crossmodal.indexer.builder.IndexBuilder`,
which publishes a new build; the job then asks the engine to swap to it. Queries keep
running on the old snapshot until that swap, which is a single reference assignment.

Jobs and their progress live in the database (`store.JobRow`), so that every replica
sharing it answers for a job that any of them runs. The running service writes a heartbeat
every few seconds; a job silent for longer than `STALE_SECONDS` belonged to a service that
died, and is reported failed.
"""
from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from crossmodal.indexer.builder import IndexBuilder, Progress
from crossmodal.indexer.collection import scan
from crossmodal.indexer.folders import Change
from crossmodal.indexer.model_names import check_model_name
from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import JobRow, Store
from crossmodal.search.engine import SearchEngine
from crossmodal.search.metrics import Metrics
from crossmodal.search.schemas import Job, JobAction, JobProgress, RebuildPreview, SkippedItem

HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 60.0
PROGRESS_EVERY_SECONDS = 0.5  # progress rows written at most this often (a build reports every batch)


class JobConflict(RuntimeError):
    """A rebuild is already queued or running."""


class JobManager:
    def __init__(self, settings: Settings, engine: SearchEngine, metrics: Metrics | None = None):
        self.settings = settings
        self.engine = engine
        self.store: Store = engine.store
        self.metrics = metrics
        self._thread: threading.Thread | None = None

    def start(self, collection: Path, captions: Path | None, model: str | None, action: JobAction = "replace") -> Job:
        """A rebuild: over `collection` alone ("replace"), or adding, removing or rescanning that folder
        of the served index (the others keep their rows)."""
        if model is not None:
            if model not in self.settings.rebuild_models():
                raise ValueError(f"model {model!r} is not allowed here; this service rebuilds with "
                                 f"{', '.join(self.settings.rebuild_models())} (CROSSMODAL_ALLOWED_MODELS)")
            check_model_name(model)
        collection = collection.resolve()
        if action != "remove" and not collection.is_dir():
            raise FileNotFoundError(f"collection folder not found: {collection}")
        if captions is not None and not captions.is_file():
            raise FileNotFoundError(f"captions file not found: {captions}")
        change = self._change(action, collection)
        row = JobRow(id=uuid.uuid4().hex[:12], state="queued", action=action, collection=str(collection),
                     captions=str(captions) if captions else None, model=model)
        stale_before = datetime.now(timezone.utc) - timedelta(seconds=STALE_SECONDS)
        if not self.store.add_job(row, stale_before):
            raise JobConflict("a rebuild is already running; wait for it to finish")
        self._thread = threading.Thread(target=self._run, args=(row.id, change, captions, model),
                                        name=f"rebuild-{row.id}", daemon=True)
        self._thread.start()
        return self.get(row.id)

    def _change(self, action: JobAction, folder: Path) -> Change:
        current = list(self.engine.snapshot.folders.values()) if self.engine.has_index else []
        if action == "replace":
            return Change.replace([folder])
        if action == "add":
            return Change.add(current, folder)
        return Change.remove(current, folder) if action == "remove" else Change.rescan_one(current, folder)

    def folder(self, folder_id: int) -> Path:
        """A folder of the served index, by id."""
        folder = self.engine.snapshot.folders.get(folder_id) if self.engine.has_index else None
        if folder is None:
            raise LookupError(f"folder {folder_id} is not in the served index")
        return folder

    def preview(self, collection: Path, action: JobAction = "replace") -> RebuildPreview:
        """What a rebuild over `collection` alone ("replace"), or a rescan of that folder of the index, would
        do to the served index, before it starts: a scan of the folder's file names (0.13 s for 7,000
        photos), no file read. A photo counts as kept when it is in that folder and the folder still holds a
        file at its path; a changed file is re-read, not removed. A replace removes the photos of the
        index's other folders too; a rescan keeps them."""
        if not collection.is_dir():
            raise FileNotFoundError(f"collection folder not found: {collection}")
        collection = collection.resolve()
        entries, _ = scan(collection)
        found = {entry.path for entry in entries}
        if not self.engine.has_index:
            return RebuildPreview(collection=str(collection), indexed_from=[], indexed=0, found=len(found),
                                  would_remove=0)
        snapshot = self.engine.snapshot
        same = {i for i, path in snapshot.folders.items() if path == collection}
        served = set(np.asarray(snapshot.attributes.ids).tolist())
        in_folder = [path for i, path in self.store.image_paths_in(same).items() if i in served]
        at_stake = len(in_folder) if action == "rescan" else len(served)
        kept = sum(1 for path in in_folder if path in found)
        return RebuildPreview(collection=str(collection), indexed_from=[str(f) for f in snapshot.folders.values()],
                              indexed=at_stake, found=len(found), would_remove=at_stake - kept)

    def get(self, job_id: str) -> Job | None:
        row = self.store.job(job_id)
        return _job(row) if row else None

    def all(self) -> list[Job]:
        return [_job(row) for row in self.store.jobs()]

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, job_id: str, change: Change, captions: Path | None, model: str | None) -> None:
        self.store.update_job(job_id, state="running")
        done = threading.Event()
        heartbeat = threading.Thread(target=self._beat, args=(job_id, done), name=f"heartbeat-{job_id}", daemon=True)
        heartbeat.start()
        last_write = [0.0, ""]

        def on_progress(p: Progress) -> None:
            if self.metrics is not None:
                self.metrics.rebuild_done.labels(p.phase).set(p.done)
                self.metrics.rebuild_total.labels(p.phase).set(p.total)
            now = time.monotonic()
            if p.phase == last_write[1] and now - last_write[0] < PROGRESS_EVERY_SECONDS and p.done < p.total:
                return
            last_write[:] = [now, p.phase]
            self.store.update_job(job_id, progress=JobProgress(
                phase=p.phase, done=p.done, total=p.total, rate=p.rate, eta_seconds=p.eta_seconds, overall=p.overall,
                overall_eta_seconds=p.overall_eta_seconds).model_dump())

        # Reuse the service's loaded model when the build uses the same one.
        encoder = self.engine.encoder if self.engine.has_index else None
        started = time.perf_counter()
        try:
            report = IndexBuilder(self.settings, store=self.store,
                                  encoder=encoder).build(change, captions, model=model, progress=on_progress)
        except Exception as err:  # reported on the job, never raised into the server
            done.set()
            self._finished("failed", started)
            self.store.update_job(job_id, state="failed", error=f"{type(err).__name__}: {err}",
                                  finished_at=datetime.now(timezone.utc))
            return
        done.set()
        self._finished("done", started)
        self.engine.reload()
        self.store.update_job(job_id, state="done", finished_at=datetime.now(timezone.utc), result={
            "build_id": report.build_id, "images": report.n_images, "captions_indexed": report.n_captions,
            "removed": report.n_removed, "unchanged": report.unchanged,
            "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
            "bad_caption_rows": [{"path": s.path, "reason": s.reason} for s in report.bad_caption_rows]})

    def _finished(self, outcome: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.rebuilds.labels(outcome).inc()
            self.metrics.rebuild_seconds.observe(time.perf_counter() - started)

    def _beat(self, job_id: str, done: threading.Event) -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            self.store.update_job(job_id)


def _utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every moment stored is UTC."""
    return moment.replace(tzinfo=timezone.utc) if moment and moment.tzinfo is None else moment


def _job(row: JobRow) -> Job:
    result = row.result or {}
    state, error = row.state, row.error
    if state in ("queued", "running") and datetime.now(timezone.utc) - _utc(row.updated_at) > timedelta(
            seconds=STALE_SECONDS):
        state, error = "failed", "the service running this rebuild stopped before it finished"
    return Job(id=row.id, state=state, action=row.action or "replace", collection=row.collection, captions=row.captions,
               created_at=_utc(row.created_at), finished_at=_utc(row.finished_at), error=error,
               progress=JobProgress(**row.progress) if row.progress else None,
               build_id=result.get("build_id"), images=result.get("images"),
               captions_indexed=result.get("captions_indexed"), removed=result.get("removed"),
               unchanged=result.get("unchanged", False),
               skipped=[SkippedItem(**s) for s in result.get("skipped", [])],
               bad_caption_rows=[SkippedItem(**s) for s in result.get("bad_caption_rows", [])])
