"""Rebuild jobs: over a folder on the server, or adding, removing or rescanning one of the index's
folders; follow their progress (admin token when set)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException

from crossmodal.search import schemas
from crossmodal.search.dependencies import EngineDep, ServiceDep, require_admin
from crossmodal.search.jobs import JobConflict

router = APIRouter(tags=["index"], dependencies=[Depends(require_admin)])


@router.post("/v1/index/jobs", response_model=schemas.Job, status_code=202)
def start_job(service: ServiceDep, body: schemas.JobRequest):
    """Rebuild the index over a folder on the server, alone (any other folder is removed); poll the job."""
    return _start(service, Path(body.collection), Path(body.captions) if body.captions else None, "replace",
                  body.model)


@router.get("/v1/folders", response_model=list[schemas.Folder])
def list_folders(engine: EngineDep):
    """The folders the served index holds, with their counts."""
    return engine.folders()


@router.post("/v1/folders", response_model=schemas.Job, status_code=202)
def add_folder(service: ServiceDep, body: schemas.FolderRequest):
    """Add a folder to the index: only it is read; the other folders keep their photos."""
    return _start(service, Path(body.path), Path(body.captions) if body.captions else None, "add")


@router.post("/v1/folders/{folder_id}/rescan", response_model=schemas.Job, status_code=202)
def rescan_folder(service: ServiceDep, folder_id: int):
    """Read one folder again (new, changed and deleted files); the others are kept as they are."""
    return _start(service, _folder(service, folder_id), None, "rescan")


@router.delete("/v1/folders/{folder_id}", response_model=schemas.Job, status_code=202)
def remove_folder(service: ServiceDep, folder_id: int):
    """Remove a folder and its photos from the index (its files are not touched)."""
    return _start(service, _folder(service, folder_id), None, "remove")


def _folder(service, folder_id: int) -> Path:
    if service.jobs is None:
        raise HTTPException(503, "the service is still starting")
    try:
        return service.jobs.folder(folder_id)
    except LookupError as err:
        raise HTTPException(404, str(err)) from err


def _start(service, folder: Path, captions: Path | None, action: str, model: str | None = None) -> schemas.Job:
    if service.jobs is None:
        raise HTTPException(503, "the service is still starting")
    try:
        return service.jobs.start(folder, captions, model, action)
    except (FileNotFoundError, ValueError) as err:
        raise HTTPException(400, str(err)) from err
    except JobConflict as err:
        raise HTTPException(409, str(err)) from err


@router.get("/v1/index/preview", response_model=schemas.RebuildPreview)
def preview_rebuild(service: ServiceDep, collection: str, action: Literal["replace", "rescan"] = "replace"):
    """How many indexed photos a rebuild over `collection` alone (or a rescan of that folder of the index)
    would remove, before starting it (the UI asks)."""
    if service.jobs is None:
        raise HTTPException(503, "the service is still starting")
    try:
        return service.jobs.preview(Path(collection), action)
    except FileNotFoundError as err:
        raise HTTPException(400, str(err)) from err


@router.get("/v1/index/jobs", response_model=list[schemas.Job])
def list_jobs(service: ServiceDep):
    """Rebuild jobs since the service started, newest first."""
    return service.jobs.all() if service.jobs else []


@router.get("/v1/index/jobs/{job_id}", response_model=schemas.Job)
def get_job(service: ServiceDep, job_id: str):
    job = service.jobs.get(job_id) if service.jobs else None
    if job is None:
        raise HTTPException(404, f"job {job_id} not found")
    return job
