"""Liveness, readiness, what is served, and the metrics."""
from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from crossmodal.search import schemas
from crossmodal.search.dependencies import EngineDep, ServiceDep
from crossmodal.search.options import wall_clock

router = APIRouter(tags=["service"])


@router.get("/health", response_model=schemas.Health)
def health():
    return {"status": "ok"}


@router.get("/ready", response_model=schemas.Ready)
def ready(service: ServiceDep, response: Response):
    is_ready, reason = service.ready
    response.status_code = 200 if is_ready else 503
    return {"ready": is_ready, "reason": reason}


@router.get("/v1/stats", response_model=schemas.Stats)
def stats(engine: EngineDep):
    snapshot = engine.snapshot
    build, manifest = snapshot.build, snapshot.manifest
    return schemas.Stats(images=manifest.n_images, captions=manifest.n_captions, model=manifest.model,
                         dim=manifest.dim, image_index_type=manifest.image_index_type,
                         caption_index_type=manifest.caption_index_type, build_id=build.id,
                         built_at=build.finished_at, collection_root=str(snapshot.collection_root),
                         folders=engine.folders(),
                         typical_best_score=manifest.score_scale.get("typical_best"),
                         weak_below_score=manifest.score_scale.get("weak_below"))


@router.get("/v1/facets", response_model=schemas.Facets)
def facets(engine: EngineDep):
    """What the filters can take: folders and cameras with their counts, the dates' range."""
    found = engine.facets()
    return schemas.Facets(**{**found, **{key: wall_clock(found[key]) for key in ("taken_first", "taken_last")}})


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
def metrics(service: ServiceDep):
    """Prometheus metrics: no token needed, no paths or query text in them (see search/metrics.py)."""
    return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
