"""Indexed images: their metadata, their files and cached thumbnails.

A file is served from a descriptor opened once and checked where it really points (see
SearchEngine.open_image_file), never by path again.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from PIL import Image

from crossmodal.indexer.collection import BadImage, decode_reduced
from crossmodal.indexer.settings import Settings
from crossmodal.search import schemas
from crossmodal.search.dependencies import EngineDep, ImageId, ServiceDep
from crossmodal.search.engine import NotFound, SearchEngine

router = APIRouter(tags=["images"])


@router.get("/v1/images/{image_id}", response_model=schemas.ImageDetail)
def image_detail(engine: EngineDep, image_id: ImageId):
    row = engine.image(image_id)
    return schemas.ImageDetail(id=row.id, path=engine.shown_path(row), width=row.width, height=row.height, bytes=row.bytes,
                               content_hash=row.content_hash,
                               captions=[schemas.CaptionOut(id=c.id, text=c.text) for c in row.captions],
                               url=f"/v1/images/{row.id}/file", thumbnail_url=f"/v1/images/{row.id}/thumbnail")


@router.get("/v1/images/{image_id}/file", response_class=FileResponse)
def image_file(engine: EngineDep, image_id: ImageId):
    return _file_response(engine.open_image_file(image_id))


@router.get("/v1/images/{image_id}/thumbnail", response_class=FileResponse)
async def image_thumbnail(service: ServiceDep, engine: EngineDep, request: Request, image_id: ImageId):
    settings = service.settings
    row = await run_in_threadpool(engine.image, image_id)
    etag = f'"{row.content_hash}-{settings.thumbnail_size}"'
    headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    path = _cached_thumbnail(row.content_hash, settings)
    if not path.is_file():
        path = await service.decode(_thumbnail, engine, image_id, row.content_hash, settings)
    return FileResponse(path, media_type="image/jpeg", headers=headers)


FILE_CHUNK = 256 * 1024


def _file_response(handle: BinaryIO) -> StreamingResponse:
    """Serve an already opened (and checked) file from its descriptor, never by path again."""
    size = os.fstat(handle.fileno()).st_size
    media_type = _media_type(handle)

    def chunks() -> Iterator[bytes]:
        with handle:
            handle.seek(0)
            while data := handle.read(FILE_CHUNK):
                yield data

    return StreamingResponse(chunks(), media_type=media_type, headers={"Content-Length": str(size)})


def _media_type(handle: BinaryIO) -> str:
    """By the file's bytes (a lying extension does not matter)."""
    try:
        with Image.open(handle) as image:
            return Image.MIME.get(image.format, "application/octet-stream")
    except Exception:  # not an image Pillow knows, or odd metadata: still served, as bytes
        return "application/octet-stream"


def _cached_thumbnail(content_hash: str, settings: Settings) -> Path:
    return settings.index_dir / "thumbnails" / f"{content_hash}-{settings.thumbnail_size}.jpg"


def _thumbnail(engine: SearchEngine, image_id: int, content_hash: str, settings: Settings) -> Path:
    """A JPEG thumbnail cached by content hash; each writer renames its own temporary file into place."""
    target = _cached_thumbnail(content_hash, settings)
    with engine.open_image_file(image_id) as handle:
        data = handle.read(settings.max_file_bytes + 1)
    try:
        if len(data) > settings.max_file_bytes:
            raise BadImage("file too large")
        image = decode_reduced(data, settings.max_image_pixels, settings.max_image_pixels)
    except (BadImage, OSError) as err:
        raise NotFound(f"image {image_id} can no longer be read: {err}") from err
    image.thumbnail((settings.thumbnail_size, settings.thumbnail_size))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            image.save(out, format="JPEG", quality=85)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
