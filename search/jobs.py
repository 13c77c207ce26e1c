"""Rebuild jobs for the service: one at a time, run by the indexer on a worker thread.

The service never writes an index itself: a job calls `crossmodal.indexer.builder.IndexBuilder`,
which publishes a new build; the job then asks the engine to swap to it. Queries keep
running on the old snapshot until that swap, which is a single reference assignment.
"""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from crossmodal.indexer.builder import BuildInProgress, IndexBuilder, Progress
from crossmodal.indexer.encoder import check_model_name
from crossmodal.indexer.settings import Settings
from crossmodal.search.engine import SearchEngine
from crossmodal.search.schemas import Job, JobProgress, SkippedItem


class JobConflict(RuntimeError):
    """A rebuild is already queued or running."""


class JobManager:
    def __init__(self, settings: Settings, engine: SearchEngine):
        self.settings = settings
        self.engine = engine
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, collection: Path, captions: Path | None, model: str | None) -> Job:
        if model is not None:
            if model not in self.settings.rebuild_models():
                raise ValueError(f"model {model!r} is not allowed here; this service rebuilds with "
                                 f"{', '.join(self.settings.rebuild_models())} (CROSSMODAL_ALLOWED_MODELS)")
            check_model_name(model)
        if not collection.is_dir():
            raise FileNotFoundError(f"collection folder not found: {collection}")
        if captions is not None and not captions.is_file():
            raise FileNotFoundError(f"captions file not found: {captions}")
        with self._lock:
            if any(job.state in ("queued", "running") for job in self._jobs.values()):
                raise JobConflict("a rebuild is already running; wait for it to finish")
            job = Job(id=uuid.uuid4().hex[:12], state="queued", collection=str(collection),
                      captions=str(captions) if captions else None, created_at=datetime.now(timezone.utc))
            self._jobs[job.id] = job
            self._thread = threading.Thread(target=self._run, args=(job.id, collection, captions, model),
                                            name=f"rebuild-{job.id}", daemon=True)
            self._thread.start()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return job.model_copy(deep=True) if job else None

    def all(self) -> list[Job]:
        with self._lock:
            return [job.model_copy(deep=True) for job in reversed(self._jobs.values())]

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _update(self, job_id: str, **fields) -> None:
        with self._lock:
            job = self._jobs[job_id]
            self._jobs[job_id] = job.model_copy(update=fields)

    def _run(self, job_id: str, collection: Path, captions: Path | None, model: str | None) -> None:
        self._update(job_id, state="running")

        def on_progress(p: Progress) -> None:
            self._update(job_id, progress=JobProgress(phase=p.phase, done=p.done, total=p.total, rate=p.rate,
                                                      eta_seconds=p.eta_seconds))

        # Reuse the service's loaded model when the build uses the same one.
        encoder = self.engine.encoder if self.engine.has_index else None
        try:
            report = IndexBuilder(self.settings, store=self.engine.store,
                                  encoder=encoder).build(collection, captions, model=model, progress=on_progress)
        except (BuildInProgress, Exception) as err:  # reported on the job, never raised into the server
            self._update(job_id, state="failed", error=f"{type(err).__name__}: {err}",
                         finished_at=datetime.now(timezone.utc))
            return
        self.engine.reload()
        self._update(job_id, state="done", finished_at=datetime.now(timezone.utc), build_id=report.build_id,
                     images=report.n_images, captions_indexed=report.n_captions,
                     skipped=[SkippedItem(path=s.path, reason=s.reason) for s in report.skipped],
                     bad_caption_rows=[SkippedItem(path=s.path, reason=s.reason) for s in report.bad_caption_rows])
