"""The search service (FastAPI): text-to-image, image-to-text and image-to-image over HTTP.

`create_app()` builds the app; the model and the published index are loaded once in the
lifespan, before `/ready` turns true. Endpoints are plain `def`s, so FastAPI runs them
on its thread pool: FAISS releases the GIL and queries do not queue behind each other.
"""

import asyncio
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, BinaryIO
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from crossmodal.indexer.collection import BadImage, decode_reduced
from crossmodal.indexer.settings import Settings, get_settings
from crossmodal.search import schemas
from crossmodal.search.engine import CaptionHit, ImageHit, NoIndex, NotFound, SearchEngine
from crossmodal.search.jobs import JobConflict, JobManager
from crossmodal.search.queries import InvalidQuery, clean_query

UPLOAD_PATHS = ("/v1/images/search", "/v1/captions/search")
JSON_BODY_LIMIT = 64 * 1024  # the only JSON body is a rebuild request
MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries around an upload




class Service:
    """What the endpoints share: settings, the engine (once loaded) and the job manager."""

    def __init__(self, settings: Settings, engine: "SearchEngine | None" = None):
        self.settings = settings
        self.engine = engine
        self.jobs: JobManager | None = None
        self.load_error: str | None = None
        # Decoding an upload or a thumbnail takes memory and both cores for a moment: it runs on
        # its own few threads (never the request pool, never under the model lock), the rest
        # queue. Few threads also means few malloc arenas holding on to freed pixel buffers.
        self.decoder = ThreadPoolExecutor(max(1, settings.max_concurrent_decodes), thread_name_prefix="decode")

    async def decode(self, function, *args):
        """`function(*args)` on a decode thread, once one is free."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, function, *args)

    def load(self) -> None:
        try:
            self.engine = self.engine or SearchEngine(self.settings)
            if self.engine.has_index:
                self.engine.encoder  # the model loads now, not on the first query
        except Exception as err:  # reported by /ready, the service stays up
            self.load_error = f"{type(err).__name__}: {err}"
            raise
        self.jobs = JobManager(self.settings, self.engine)

    @property
    def ready(self) -> tuple[bool, str | None]:
        if self.load_error:
            return False, self.load_error
        if self.engine is None or self.jobs is None:
            return False, "loading the model and the index"
        if not self.engine.has_index:
            return False, "no index published yet: POST /v1/index/jobs or run `crossmodal index FOLDER`"
        return True, None


# Dependencies that never block are `async def`: FastAPI runs them on the event loop, where a
# sync one costs a thread-pool hop each. Measured over HTTP at 100k vectors, the time outside
# the text-search endpoint went from 2.7-2.8 to 2.4-2.5 ms (p50).
async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_engine(service: Annotated[Service, Depends(get_service)]) -> SearchEngine:
    ready, reason = service.ready
    if not ready:
        raise HTTPException(503, reason)
    return service.engine


_bearer = HTTPBearer(auto_error=False, description="CROSSMODAL_ADMIN_TOKEN, when the service has one")


async def require_admin(service: Annotated[Service, Depends(get_service)],
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Rebuilds read folders on the server: with a token configured, only its holder may start or see them."""
    token = service.settings.admin_token
    if not token:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(401, "rebuilds need the admin token: send `Authorization: Bearer <token>`",
                            headers={"WWW-Authenticate": "Bearer"})


ServiceDep = Annotated[Service, Depends(get_service)]
EngineDep = Annotated[SearchEngine, Depends(get_engine)]


def create_app(settings: Settings | None = None, engine: SearchEngine | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(service.load)
        yield

    # Bodies are counted as they stream in (FastAPI's per-route max_body_size): an oversized
    # upload is refused at the limit, whatever Content-Length claims, and never read to its end.
    app = FastAPI(title="crossmodal search", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image, image-to-text and image-to-image search over an indexed collection.")
    app.state.service = service
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                       allow_headers=["*"])
    _add_body_limits(app, settings)
    app.add_middleware(HeadAsGet)
    app.add_middleware(AllowedHostsOnly, allowed=settings.answered_hosts())  # added last: runs first
    _add_error_handlers(app)
    _add_routes(app, settings)
    return app


def _body_limit(path: str, settings: Settings) -> int:
    return settings.max_upload_bytes if path in UPLOAD_PATHS else JSON_BODY_LIMIT


def _too_large(path: str, settings: Settings) -> str:
    return f"request body larger than the limit of {_body_limit(path, settings)} bytes"


def _add_body_limits(app: FastAPI, settings: Settings) -> None:
    @app.middleware("http")
    async def refuse_declared_oversize(request: Request, call_next):
        """A declared Content-Length over the limit is refused before a byte of the body is read;
        undeclared (chunked) bodies are cut off at the limit by FastAPI's max_body_size."""
        declared = request.headers.get("content-length", "")
        slack = MULTIPART_SLACK if request.url.path in UPLOAD_PATHS else 0
        if declared.isdigit() and int(declared) > _body_limit(request.url.path, settings) + slack:
            return JSONResponse({"detail": _too_large(request.url.path, settings)}, status_code=413)
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 413 and err.detail == "Content Too Large":  # the streaming limit's own message
            err = StarletteHTTPException(413, _too_large(request.url.path, settings))
        return await http_exception_handler(request, err)


def host_allowed(host: str | None, allowed: list[str]) -> bool:
    """Whether a Host header names one of `allowed` ("*" any; "*.example.com" its subdomains); port ignored."""
    if "*" in allowed:
        return True
    if not host:
        return False
    try:
        parts = urlsplit(f"//{host}")
        _ = parts.port  # raises on a malformed port
    except ValueError:
        return False
    if parts.username or parts.password or parts.path or not parts.hostname:
        return False
    name = parts.hostname.lower().rstrip(".")
    return any(name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
               for pattern in (a.lower().rstrip(".") for a in allowed))


class AllowedHostsOnly:
    """Against DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example.
    Plain ASGI, so the check costs microseconds on every request."""

    def __init__(self, app, allowed: list[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), None)
            if not host_allowed(host, self.allowed):
                response = JSONResponse({"detail": "this service does not answer to that host name; add it to "
                                                   "CROSSMODAL_ALLOWED_HOSTS"}, status_code=400)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:

    @app.exception_handler(NotFound)
    async def not_found(_request: Request, err: NotFound):
        return JSONResponse({"detail": err.args[0] if err.args else "not found"}, status_code=404)

    @app.exception_handler(NoIndex)
    async def no_index(_request: Request, err: NoIndex):
        return JSONResponse({"detail": str(err)}, status_code=503)


def _text_query(max_chars: int):
    async def query(q: Annotated[str, Query(description="Text query.", max_length=max_chars)]) -> str:
        try:
            return clean_query(q, max_chars)
        except InvalidQuery as err:
            raise HTTPException(422, str(err)) from err
    return query


class HeadAsGet:
    """HEAD answered as GET (FastAPI routes declare GET only, so HEAD got 405); uvicorn sends
    the headers, Content-Length included, and drops the body of a HEAD response itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


async def _uploaded_image(file: UploadFile, service: Service) -> Image.Image:
    settings = service.settings
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"upload larger than the limit of {settings.max_upload_bytes} bytes")
    try:
        return await service.decode(decode_reduced, data, settings.max_image_pixels, settings.max_upload_pixels)
    except BadImage as err:
        status = 413 if "too many pixels" in str(err) or "too large" in str(err) else 415
        raise HTTPException(status, f"not a usable image: {err}") from err
    except Exception as err:  # a decoder's own failure on odd input is the upload's fault, never a 500
        raise HTTPException(415, f"not a usable image: {type(err).__name__}") from err


def _image_result(hit: ImageHit) -> schemas.ImageResult:
    return schemas.ImageResult(**hit.__dict__, url=f"/v1/images/{hit.id}/file",
                               thumbnail_url=f"/v1/images/{hit.id}/thumbnail")


def _caption_result(hit: CaptionHit) -> schemas.CaptionResult:
    return schemas.CaptionResult(**hit.__dict__, thumbnail_url=f"/v1/images/{hit.image_id}/thumbnail")


def _images_response(hits: list[ImageHit], start: float) -> schemas.ImageSearchResponse:
    return schemas.ImageSearchResponse(results=[_image_result(h) for h in hits],
                                       took_ms=(time.perf_counter() - start) * 1000)


def _captions_response(hits: list[CaptionHit], start: float) -> schemas.CaptionSearchResponse:
    return schemas.CaptionSearchResponse(results=[_caption_result(h) for h in hits],
                                         took_ms=(time.perf_counter() - start) * 1000)


def _add_routes(app: FastAPI, settings: Settings) -> None:
    TextQuery = Annotated[str, Depends(_text_query(settings.max_query_chars))]
    K = Annotated[int, Query(ge=1, le=settings.max_k, description="Number of results.")]
    Offset = Annotated[int, Query(ge=0, le=settings.max_offset, description="Results to skip (paging).")]
    Upload = Annotated[UploadFile, File(description="An image file.")]
    ImageId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="Image id (from a search result).")]
    upload_limit = settings.max_upload_bytes + MULTIPART_SLACK
    admin = [Depends(require_admin)]

    @app.get("/health", response_model=schemas.Health, tags=["service"])
    def health():
        return {"status": "ok"}

    @app.get("/ready", response_model=schemas.Ready, tags=["service"])
    def ready(service: ServiceDep, response: Response):
        is_ready, reason = service.ready
        response.status_code = 200 if is_ready else 503
        return {"ready": is_ready, "reason": reason}

    @app.get("/v1/stats", response_model=schemas.Stats, tags=["service"])
    def stats(engine: EngineDep):
        snapshot = engine.snapshot
        build, manifest = snapshot.build, snapshot.manifest
        return schemas.Stats(images=manifest.n_images, captions=manifest.n_captions, model=manifest.model,
                             dim=manifest.dim, image_index_type=manifest.image_index_type,
                             caption_index_type=manifest.caption_index_type, build_id=build.id,
                             built_at=build.finished_at, collection_root=str(snapshot.collection_root))

    @app.get("/v1/images/search", response_model=schemas.ImageSearchResponse, tags=["search"])
    def images_by_text(engine: EngineDep, q: TextQuery, k: K = 10, offset: Offset = 0):
        """Text to images."""
        start = time.perf_counter()
        return _images_response(engine.images_by_text(q, k, offset), start)

    @app.post("/v1/images/search", response_model=schemas.ImageSearchResponse, tags=["search"],
              max_body_size=upload_limit)
    async def images_by_image(service: ServiceDep, engine: EngineDep, file: Upload, k: K = 10, offset: Offset = 0):
        """Image to images."""
        start = time.perf_counter()
        image = await _uploaded_image(file, service)
        return _images_response(await run_in_threadpool(engine.images_by_image, image, k, offset), start)

    @app.get("/v1/images/{image_id}/similar", response_model=schemas.ImageSearchResponse, tags=["search"])
    def similar_images(engine: EngineDep, image_id: ImageId, k: K = 10, offset: Offset = 0):
        """Indexed image to images (itself excluded)."""
        start = time.perf_counter()
        return _images_response(engine.similar_images(image_id, k, offset), start)

    @app.get("/v1/captions/search", response_model=schemas.CaptionSearchResponse, tags=["search"])
    def captions_by_text(engine: EngineDep, q: TextQuery, k: K = 10, offset: Offset = 0):
        """Text to captions."""
        start = time.perf_counter()
        return _captions_response(engine.captions_by_text(q, k, offset), start)

    @app.post("/v1/captions/search", response_model=schemas.CaptionSearchResponse, tags=["search"],
              max_body_size=upload_limit)
    async def captions_by_image(service: ServiceDep, engine: EngineDep, file: Upload, k: K = 10,
                                offset: Offset = 0):
        """Image to captions."""
        start = time.perf_counter()
        image = await _uploaded_image(file, service)
        return _captions_response(await run_in_threadpool(engine.captions_by_image, image, k, offset), start)

    @app.get("/v1/images/{image_id}/captions", response_model=schemas.CaptionSearchResponse, tags=["search"])
    def captions_for_image(engine: EngineDep, image_id: ImageId, k: K = 10, offset: Offset = 0):
        """Indexed image to captions (from the whole collection, its own included)."""
        start = time.perf_counter()
        return _captions_response(engine.captions_for_image(image_id, k, offset), start)

    @app.get("/v1/images/{image_id}", response_model=schemas.ImageDetail, tags=["images"])
    def image_detail(engine: EngineDep, image_id: ImageId):
        row = engine.image(image_id)
        return schemas.ImageDetail(id=row.id, path=row.path, width=row.width, height=row.height, bytes=row.bytes,
                                   content_hash=row.content_hash,
                                   captions=[schemas.CaptionOut(id=c.id, text=c.text) for c in row.captions],
                                   url=f"/v1/images/{row.id}/file", thumbnail_url=f"/v1/images/{row.id}/thumbnail")

    @app.get("/v1/images/{image_id}/file", tags=["images"], response_class=FileResponse)
    def image_file(engine: EngineDep, image_id: ImageId):
        return _file_response(engine.open_image_file(image_id))

    @app.get("/v1/images/{image_id}/thumbnail", tags=["images"], response_class=FileResponse)
    async def image_thumbnail(service: ServiceDep, engine: EngineDep, request: Request, image_id: ImageId):
        row = await run_in_threadpool(engine.image, image_id)
        etag = f'"{row.content_hash}-{settings.thumbnail_size}"'
        headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        path = _cached_thumbnail(row.content_hash, settings)
        if not path.is_file():
            path = await service.decode(_thumbnail, engine, image_id, row.content_hash, settings)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    @app.post("/v1/index/jobs", response_model=schemas.Job, status_code=202, tags=["index"], dependencies=admin,
              max_body_size=JSON_BODY_LIMIT)
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

    @app.get("/v1/index/jobs", response_model=list[schemas.Job], tags=["index"], dependencies=admin)
    def list_jobs(service: ServiceDep):
        """Rebuild jobs since the service started, newest first."""
        return service.jobs.all() if service.jobs else []

    @app.get("/v1/index/jobs/{job_id}", response_model=schemas.Job, tags=["index"], dependencies=admin)
    def get_job(service: ServiceDep, job_id: str):
        job = service.jobs.get(job_id) if service.jobs else None
        if job is None:
            raise HTTPException(404, f"job {job_id} not found")
        return job


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
