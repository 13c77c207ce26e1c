"""What the endpoints depend on: the shared `Service`, and the checks on their parameters.

FastAPI's dependency injection hands each endpoint the engine (503 while loading), the admin
check, a text query and a page of results; the routers in `search/routes/` only declare them.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from crossmodal.indexer.settings import Settings
from crossmodal.indexer.store import Store
from crossmodal.search.engine import SearchEngine
from crossmodal.search.jobs import JobManager
from crossmodal.search.metrics import Metrics
from crossmodal.search.options import SearchOptions
from crossmodal.search.queries import InvalidQuery, clean_query


class Service:
    """What the endpoints share: settings, the engine (once loaded), the job manager, the metrics."""

    def __init__(self, settings: Settings, engine: "SearchEngine | None" = None):
        self.settings = settings
        self.engine = engine
        self.store: Store | None = None  # the engine opens its own where open_store() was not called
        self.jobs: JobManager | None = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self._closing = threading.Event()
        # Decoding an upload or a thumbnail takes memory and both cores for a moment: it runs on
        # its own few threads (never the request pool, never under the model lock), the rest
        # queue. Few threads also means few malloc arenas holding on to freed pixel buffers.
        self.decoder = ThreadPoolExecutor(max(1, settings.max_concurrent_decodes), thread_name_prefix="decode")

    async def decode(self, function, *args):
        """`function(*args)` on a decode thread, once one is free."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, function, *args)

    def open_store(self) -> None:
        """The database, its schema checked (and upgraded when due): quick, and fatal when it fails."""
        self.store = Store(self.settings.resolved_database_url())

    def load(self) -> None:
        try:
            self.engine = self.engine or SearchEngine(self.settings, store=self.store)
            self.engine.attach_metrics(self.metrics)
            if self.engine.has_index:
                self.engine.text_encoder  # text queries are answered from here on
                threading.Thread(target=self._load_model, name="load-model", daemon=True).start()
        except Exception as err:  # reported by /ready, the service stays up
            self.load_error = f"{type(err).__name__}: {err}"
            raise
        self.jobs = JobManager(self.settings, self.engine, self.metrics)
        if self.settings.reload_interval > 0:
            threading.Thread(target=self._follow_published_builds, name="build-follower", daemon=True).start()

    def _load_model(self) -> None:
        """The model itself (image queries, and text where no exported tower exists), loaded behind /ready:
        an upload waits for it at most once."""
        try:
            self.engine.encoder
        except Exception:
            logging.getLogger(__name__).exception("the model could not load: image queries will fail")

    def load_in_background(self) -> None:
        """load() on a thread of its own; a failure stays readable at /ready (a replica that cannot
        load is skipped by its load balancer, and says why), and is logged."""
        def run() -> None:
            try:
                self.load()
            except Exception:
                logging.getLogger(__name__).exception("the service could not load; /ready says why")

        threading.Thread(target=run, name="load", daemon=True).start()

    def close(self) -> None:
        self._closing.set()

    def _follow_published_builds(self) -> None:
        """Swap in builds published elsewhere: by the CLI, or by another replica on the same database."""
        while not self._closing.wait(self.settings.reload_interval):
            try:
                self.engine.reload()
            except Exception:  # a build not yet readable here (a shared disk catching up): next time
                logging.getLogger(__name__).exception("could not load the newly published build; retrying")

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


async def text_query(service: ServiceDep, q: Annotated[str, Query(
        description="Text query (at most CROSSMODAL_MAX_QUERY_CHARS characters, 500 by default).")]) -> str:
    try:
        return clean_query(q, service.settings.max_query_chars)
    except InvalidQuery as err:
        raise HTTPException(422, str(err)) from err


@dataclass(frozen=True)
class Page:
    k: int
    offset: int


async def page(service: ServiceDep,
               k: Annotated[int, Query(ge=1, description="Number of results (at most CROSSMODAL_MAX_K, 100).")] = 10,
               offset: Annotated[int, Query(ge=0, description="Results to skip, for paging (at most "
                                                              "CROSSMODAL_MAX_OFFSET, 1000).")] = 0) -> Page:
    """The bounds are settings, so they are checked here, per request, not in the route's signature."""
    return checked_page(service, k, offset)


def checked_page(service: Service, k: int, offset: int) -> Page:
    """A page within the service's bounds (query parameters, or a JSON body's fields)."""
    settings = service.settings
    if k > settings.max_k:
        raise HTTPException(422, f"k must be at most {settings.max_k}")
    if offset > settings.max_offset:
        raise HTTPException(422, f"offset must be at most {settings.max_offset}")
    return Page(k, offset)


TextQuery = Annotated[str, Depends(text_query)]
OptionsDep = Annotated[SearchOptions, Query()]  # filters, sort and mode, as query parameters
PageDep = Annotated[Page, Depends(page)]
ImageId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="Image id (from a search result).")]
