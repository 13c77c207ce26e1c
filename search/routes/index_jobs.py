"""Rebuild jobs: start one over a folder on the server, follow its progress (admin token when set)."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException

from crossmodal.search import schemas
from crossmodal.search.dependencies import ServiceDep, require_admin
from crossmodal.search.jobs import JobConflict

router = APIRouter(tags=["index"], dependencies=[Depends(require_admin)])


@router.post("/v1/index/jobs", response_model=schemas.Job, status_code=202)
def start_job(service: ServiceDep, body: schemas.JobRequest):
    """Start a rebuild over a folder on the server; poll the job for progress."""
    if service.jobs is None:
        raise HTTPException(503, "the service is still starting")
    try:
        return service.jobs.start(Path(body.collection), Path(body.captions) if body.captions else None,
                                  body.model)
    except (FileNotFoundError, ValueError) as err:
        raise HTTPException(400, str(err)) from err
    except JobConflict as err:
        raise HTTPException(409, str(err)) from err


@router.get("/v1/index/preview", response_model=schemas.RebuildPreview)
def preview_rebuild(service: ServiceDep, collection: str):
    """How many indexed photos a rebuild over `collection` would remove, before starting it (the UI asks)."""
    if service.jobs is None:
        raise HTTPException(503, "the service is still starting")
    try:
        return service.jobs.preview(Path(collection))
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
