"""The search service (FastAPI): text-to-image, image-to-text and image-to-image over HTTP.

`create_app()` builds the app: its middleware (allowed hosts, HEAD, CORS, body limits), its
error handlers and the routers of `search/routes/`. The model and the published index load
once, behind an open port: until they have, `/ready` (and every search) answers 503 "loading
the model and the index", so a UI or a load balancer sees a loading service, not a dead one.
What endpoints share and check is in `search/dependencies.py`. Endpoints are plain `def`s, so FastAPI runs them on its thread
pool: FAISS and ONNX Runtime release the GIL and queries do not queue behind each other. The pool
has Settings.request_threads threads (cores + 1), not anyio's 40: a search is CPU work, and 40 of
them at once fought over the GIL and the caches (issue 18: 117-139 against 140-162 QPS at 100k
vectors and 32 clients, on 2 cores).
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from crossmodal.indexer.settings import Settings, get_settings
from crossmodal.search.dependencies import Service
from crossmodal.search.engine import NoIndex, NotFound, SearchEngine
from crossmodal.search.metrics import RequestMetrics
from crossmodal.search.routes import images, index_jobs, searches, status

UPLOAD_PATHS = ("/v1/images/search", "/v1/captions/search")
JSON_BODY_LIMIT = 64 * 1024  # rebuild requests and query expressions
MULTIPART_SLACK = 64 * 1024  # multipart headers and boundaries around an upload


def create_app(settings: Settings | None = None, engine: SearchEngine | None = None) -> FastAPI:
    settings = settings or get_settings()
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        to_thread.current_default_thread_limiter().total_tokens = settings.resolved_request_threads()
        if engine is None:
            await run_in_threadpool(service.open_store)  # a database it cannot use stops the start, as before
            service.load_in_background()
        else:  # an engine handed in has its model already
            await run_in_threadpool(service.load)
        yield
        service.close()

    # Bodies are counted as they stream in (FastAPI's per-route max_body_size): an oversized
    # upload is refused at the limit, whatever Content-Length claims, and never read to its end.
    app = FastAPI(title="crossmodal search", version="0.1.0", lifespan=lifespan,
                  description="Text-to-image, image-to-text and image-to-image search over an indexed collection.")
    app.state.service = service
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # added first: right around the routes
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                       allow_headers=["*"])
    _add_body_limits(app, settings)
    app.add_middleware(JsonQueriesOnSearchPath)
    app.add_middleware(HeadAsGet)
    app.add_middleware(AllowedHostsOnly, allowed=settings.answered_hosts())  # added last: runs first
    _add_error_handlers(app)
    upload_limit = settings.max_upload_bytes + MULTIPART_SLACK
    app.include_router(status.router)
    app.include_router(searches.router, max_body_size=upload_limit)
    app.include_router(searches.query_router, max_body_size=JSON_BODY_LIMIT)
    app.include_router(images.router)
    app.include_router(index_jobs.router, max_body_size=JSON_BODY_LIMIT)
    return app


def _body_limit(path: str, settings: Settings) -> int:
    return settings.max_upload_bytes if path in UPLOAD_PATHS else JSON_BODY_LIMIT


def _too_large(path: str, settings: Settings) -> str:
    return f"request body larger than the limit of {_body_limit(path, settings)} bytes"


def _add_body_limits(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(DeclaredOversizeRefused, settings=settings)

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


class DeclaredOversizeRefused:
    """A declared Content-Length over the limit is refused before a byte of the body is read;
    undeclared (chunked) bodies are cut off at the limit by FastAPI's max_body_size. Plain ASGI:
    as an `@app.middleware("http")` function it cost every request a task and a stream wrapper."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            path = scope["path"]
            slack = MULTIPART_SLACK if path in UPLOAD_PATHS else 0
            if declared.isdigit() and int(declared) > _body_limit(path, self.settings) + slack:
                response = JSONResponse({"detail": _too_large(path, self.settings)}, status_code=413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class JsonQueriesOnSearchPath:
    """A JSON POST to /v1/images/search is a query expression: it is answered by /v1/images/query,
    while a multipart POST there stays an image upload. FastAPI parses one body kind per route."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/images/search"
                and dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip() == b"application/json"):
            scope = {**scope, "path": "/v1/images/query", "raw_path": b"/v1/images/query"}
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD answered as GET (FastAPI routes declare GET only, so HEAD got 405); uvicorn sends
    the headers, Content-Length included, and drops the body of a HEAD response itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


