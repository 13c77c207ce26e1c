"""The UI's only way to the search engine: HTTP calls to the search service.

Every failure becomes a `ServiceError` whose message a person can act on (the service
is down, still starting, refused the upload, is already rebuilding), so the app shows
a message instead of a traceback. Responses are parsed into the API's own pydantic
models (`search.schemas`), which import nothing but pydantic.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx
from pydantic import TypeAdapter

from crossmodal.search import schemas
from crossmodal.search.options import SearchOptions


class ServiceError(Exception):
    """A request the service could not answer; `str()` is the message to show."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServiceDown(ServiceError):
    """Nothing answers at the API URL."""


class ServiceNotReady(ServiceError):
    """The service answers but is loading, or has no index yet (HTTP 503)."""


class Rejected(ServiceError):
    """The service refused the request (HTTP 4xx); the message is its reason."""


class RebuildRunning(Rejected):
    """A rebuild is already running (HTTP 409)."""


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes
    content_type: str = "application/octet-stream"


class SearchClient:
    def __init__(self, api_url: str, timeout: float = 30.0):
        self.api_url = api_url.rstrip("/")
        self._http = httpx.Client(base_url=self.api_url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    # -- transport ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as err:
            raise ServiceDown(f"The search service at {self.api_url} is not reachable. "
                              "Start it with `crossmodal serve`, or point the UI at it with `--api URL`.") from err
        if response.status_code < 400:
            return response
        detail = _detail(response)
        if response.status_code == 503:
            raise ServiceNotReady(detail, 503)
        if response.status_code == 409:
            raise RebuildRunning(detail, 409)
        if response.status_code < 500:
            raise Rejected(detail, response.status_code)
        raise ServiceError(f"The search service failed ({response.status_code}): {detail}", response.status_code)

    def _json(self, method: str, path: str, model, **kwargs):
        return TypeAdapter(model).validate_python(self._request(method, path, **kwargs).json())

    # -- service -----------------------------------------------------------------------------

    def ready(self) -> schemas.Ready:
        """Never raises ServiceNotReady: a 503 here is an answer, not an error."""
        try:
            response = self._http.get("/ready")
        except httpx.TransportError as err:
            raise ServiceDown(f"The search service at {self.api_url} is not reachable. "
                              "Start it with `crossmodal serve`.") from err
        return schemas.Ready.model_validate(response.json())

    def stats(self) -> schemas.Stats:
        return self._json("GET", "/v1/stats", schemas.Stats)

    # -- searches ----------------------------------------------------------------------------

    def facets(self) -> schemas.Facets:
        return self._json("GET", "/v1/facets", schemas.Facets)

    def images_by_text(self, query: str, k: int = 12, offset: int = 0,
                       options: SearchOptions | None = None) -> schemas.ImageSearchResponse:
        return self._json("GET", "/v1/images/search", schemas.ImageSearchResponse,
                          params={"q": query, "k": k, "offset": offset, **_params(options)})

    def images_by_query(self, query: str, k: int = 12, offset: int = 0, more_like: list[int] = (),
                        less_like: list[int] = (), options: SearchOptions | None = None) -> schemas.ImageSearchResponse:
        """A query expression refined by relevance feedback (the JSON body of POST /v1/images/search)."""
        body = schemas.ImageQuery(q=query, k=k, offset=offset, more_like=list(more_like), less_like=list(less_like),
                                  **(options.model_dump() if options else {}))
        return self._json("POST", "/v1/images/search", schemas.ImageSearchResponse,
                          json=body.model_dump(mode="json", exclude_defaults=True))

    def images_by_image(self, upload: Upload, k: int = 12) -> schemas.ImageSearchResponse:
        return self._json("POST", "/v1/images/search", schemas.ImageSearchResponse, params={"k": k},
                          files={"file": (upload.name, upload.data, upload.content_type)})

    def captions_by_image(self, upload: Upload, k: int = 10) -> schemas.CaptionSearchResponse:
        return self._json("POST", "/v1/captions/search", schemas.CaptionSearchResponse, params={"k": k},
                          files={"file": (upload.name, upload.data, upload.content_type)})

    def similar_images(self, image_id: int, k: int = 12, offset: int = 0,
                       options: SearchOptions | None = None) -> schemas.ImageSearchResponse:
        return self._json("GET", f"/v1/images/{image_id}/similar", schemas.ImageSearchResponse,
                          params={"k": k, "offset": offset, **_params(options, vector_only=True)})

    def captions_for_image(self, image_id: int, k: int = 10) -> schemas.CaptionSearchResponse:
        return self._json("GET", f"/v1/images/{image_id}/captions", schemas.CaptionSearchResponse, params={"k": k})

    # -- images ------------------------------------------------------------------------------

    def image(self, image_id: int) -> schemas.ImageDetail:
        return self._json("GET", f"/v1/images/{image_id}", schemas.ImageDetail)

    def thumbnail(self, image_id: int) -> bytes:
        return self._request("GET", f"/v1/images/{image_id}/thumbnail").content

    def image_file(self, image_id: int) -> bytes:
        return self._request("GET", f"/v1/images/{image_id}/file").content

    # -- rebuilds ----------------------------------------------------------------------------

    # The admin token is the caller's, per call: a UI shared by many browsers must not hold
    # one itself, or everyone who reaches the UI could rebuild over any folder on the server.

    def start_rebuild(self, collection: str, captions: str | None = None, token: str = "") -> schemas.Job:
        body = schemas.JobRequest(collection=collection, captions=captions or None)
        return self._json("POST", "/v1/index/jobs", schemas.Job, json=body.model_dump(exclude_none=True),
                          headers=_bearer(token))

    def add_folder(self, path: str, captions: str | None = None, token: str = "") -> schemas.Job:
        body = schemas.FolderRequest(path=path, captions=captions or None)
        return self._json("POST", "/v1/folders", schemas.Job, json=body.model_dump(exclude_none=True),
                          headers=_bearer(token))

    def rescan_folder(self, folder_id: int, token: str = "") -> schemas.Job:
        return self._json("POST", f"/v1/folders/{folder_id}/rescan", schemas.Job, headers=_bearer(token))

    def remove_folder(self, folder_id: int, token: str = "") -> schemas.Job:
        return self._json("DELETE", f"/v1/folders/{folder_id}", schemas.Job, headers=_bearer(token))

    def preview_rebuild(self, collection: str, token: str = "", action: str = "replace") -> schemas.RebuildPreview:
        return self._json("GET", "/v1/index/preview", schemas.RebuildPreview,
                          params={"collection": collection, "action": action}, headers=_bearer(token))

    def job(self, job_id: str, token: str = "") -> schemas.Job:
        return self._json("GET", f"/v1/index/jobs/{job_id}", schemas.Job, headers=_bearer(token))

    def jobs(self, token: str = "") -> list[schemas.Job]:
        return self._json("GET", "/v1/index/jobs", list[schemas.Job], headers=_bearer(token))


def _params(options: SearchOptions | None, vector_only: bool = False) -> dict[str, str]:
    """Filters, sort and mode as query parameters (only those not at their default)."""
    if options is None:
        return {}
    params = options.model_dump(mode="json", exclude_defaults=True)
    if vector_only:
        params.pop("mode", None)
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in params.items()}


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _detail(response: httpx.Response) -> str:
    """The service's `{"detail": ...}` as one readable sentence (422s carry a list of errors)."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(detail, list):
        return "; ".join(dict.fromkeys(_plain_error(d) for d in detail))  # one sentence per distinct mistake
    return str(detail)


FIELD_NAMES = {"q": "The query", "k": "The number of results", "offset": "The page", "file": "The upload"}


def _plain_error(error: dict) -> str:
    """A validation error as a sentence: "The query is too long: at most 500 characters", not
    "q: String should have at most 500 characters"."""
    loc = [str(part) for part in error.get("loc", [])[1:2]]
    field = FIELD_NAMES.get(loc[0], loc[0].replace("_", " ").capitalize()) if loc else "The request"
    context = error.get("ctx") or {}
    kind = error.get("type", "")
    if kind == "string_too_long":
        return f"{field} is too long: at most {context.get('max_length')} characters"
    if kind == "string_too_short":
        return f"{field} is empty"
    if kind in ("less_than_equal", "greater_than_equal"):
        bound = "at most" if kind == "less_than_equal" else "at least"
        return f"{field} must be {bound} {context.get('le', context.get('ge'))}"
    if kind == "literal_error":
        return f"{field} must be one of {context.get('expected')}"
    return f"{field}: {str(error.get('msg', '')).lower()}"
