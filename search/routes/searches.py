"""The searches: text or an uploaded image in, ranked images or captions out.

Uploads are decoded on the service's decode threads in bounded memory (see
collection.decode_reduced); the app includes this router with the upload body limit.
"""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from crossmodal.indexer.collection import BadImage, decode_reduced
from crossmodal.search import schemas
from crossmodal.search import expressions
from crossmodal.search.dependencies import (EngineDep, ImageId, OptionsDep, PageDep, Service, ServiceDep, TextQuery,
                                           checked_page)
from crossmodal.search.engine import CaptionHit, ImageHit, NotFound, SearchEngine
from crossmodal.search.options import SearchOptions, wall_clock
from crossmodal.search.queries import InvalidQuery, clean_query

router = APIRouter(tags=["search"])
query_router = APIRouter(tags=["search"])  # JSON bodies, under the JSON body limit
Upload = Annotated[UploadFile, File(description="An image file (JPEG, PNG, WebP, GIF, BMP or TIFF).")]


@router.get("/v1/images/search", response_model=schemas.ImageSearchResponse)
def images_by_text(service: ServiceDep, engine: EngineDep, q: TextQuery, page: PageDep, options: OptionsDep):
    """Text to images. `q` may be a query expression: `beach +2:sunset -people`, `image:42 -dog`
    (see POST /v1/images/query); filters, sort and mode narrow and order the results."""
    start = time.perf_counter()
    terms = query_terms(q, [], service)
    return images_response(search_terms(engine, terms, page.k, page.offset, options=options), start)


@query_router.post("/v1/images/query", response_model=schemas.ImageSearchResponse)
def images_by_query(service: ServiceDep, engine: EngineDep, body: schemas.ImageQuery):
    """Weighted text and image terms, and relevance feedback ("more like these, less like those"),
    combined into one query, with filters, sort and mode as fields. Also answered at POST
    /v1/images/search with a JSON body."""
    start = time.perf_counter()
    page = checked_page(service, body.k, body.offset)
    terms = query_terms(body.q, body.terms, service)
    if not terms and not body.more_like:
        raise HTTPException(422, "the query is empty: give `q`, `terms` or `more_like`")
    return images_response(search_terms(engine, terms, page.k, page.offset, body.more_like, body.less_like,
                                        options=body), start)  # the body is SearchOptions with more fields


def query_terms(q: str | None, terms: list[schemas.QueryTerm], service: Service) -> list[expressions.Term]:
    """The expression's terms, then the listed ones; a 422 says which one is wrong."""
    try:
        parsed = expressions.parse(q, service.settings.max_query_chars) if q is not None else []
        listed = [expressions.Term(t.weight, text=clean_query(t.text, service.settings.max_query_chars)
                                   if t.text is not None else None, image_id=t.image_id) for t in terms]
    except InvalidQuery as err:
        raise HTTPException(422, str(err)) from err
    if len(parsed) + len(listed) > expressions.MAX_TERMS:
        raise HTTPException(422, f"at most {expressions.MAX_TERMS} terms, not {len(parsed) + len(listed)}")
    return parsed + listed


def search_terms(engine: SearchEngine, terms: list[expressions.Term], k: int, offset: int,
                 more_like: list[int] = (), less_like: list[int] = (), uploads: list[tuple[float, Image.Image]] = (),
                 options: SearchOptions | None = None) -> list[ImageHit]:
    """Terms, uploads and feedback to images (a plain query is one text term); its mistakes as 422s."""
    try:
        return engine.images_by_terms(terms, k, offset, more_like, less_like, uploads, options)
    except NotFound as err:
        raise HTTPException(422, f"{err}: use an id from a search result") from err
    except InvalidQuery as err:
        raise HTTPException(422, str(err)) from err


@router.post("/v1/images/search", response_model=schemas.ImageSearchResponse)
async def images_by_image(service: ServiceDep, engine: EngineDep, file: Upload, page: PageDep, options: OptionsDep,
                          q: Annotated[str | None, Form(description="More terms beside the upload, as an "
                                                                    "expression: `+sunset -people`.")] = None,
                          weight: Annotated[float, Form(ge=-expressions.MAX_WEIGHT, le=expressions.MAX_WEIGHT,
                                                        description="The upload's weight among the terms.")] = 1.0):
    """Image to images: the upload is a term of the query, with `q`'s terms beside it where given."""
    start = time.perf_counter()
    if weight == 0:
        raise HTTPException(422, "the upload's weight must not be 0")
    terms = query_terms(q, [], service) if q else []
    if options.mode != "vector":
        raise HTTPException(422, f"mode={options.mode} needs words to look for; an image query is ranked by vector")
    _as_422(engine.selection, options)  # a bad filter value fails before the upload is decoded
    image = await uploaded_image(file, service)
    return images_response(await run_in_threadpool(search_terms, engine, terms, page.k, page.offset, (), (),
                                                   [(weight, image)], options), start)


@router.get("/v1/images/{image_id}/similar", response_model=schemas.ImageSearchResponse)
def similar_images(engine: EngineDep, image_id: ImageId, page: PageDep, options: OptionsDep):
    """Indexed image to images (itself excluded)."""
    start = time.perf_counter()
    return images_response(_as_422(engine.similar_images, image_id, page.k, page.offset, options), start)


@router.get("/v1/captions/search", response_model=schemas.CaptionSearchResponse)
def captions_by_text(engine: EngineDep, q: TextQuery, page: PageDep, options: OptionsDep):
    """Text to captions; the filters keep captions whose image passes them."""
    start = time.perf_counter()
    return captions_response(_as_422(engine.captions_by_text, q, page.k, page.offset, options), start)


@router.post("/v1/captions/search", response_model=schemas.CaptionSearchResponse)
async def captions_by_image(service: ServiceDep, engine: EngineDep, file: Upload, page: PageDep, options: OptionsDep):
    """Image to captions; the filters keep captions whose image passes them."""
    start = time.perf_counter()
    _as_422(engine.selection, options)  # a bad filter value fails before the upload is decoded
    image = await uploaded_image(file, service)
    return captions_response(await run_in_threadpool(_as_422, engine.captions_by_image, image, page.k, page.offset,
                                                     options), start)


@router.get("/v1/images/{image_id}/captions", response_model=schemas.CaptionSearchResponse)
def captions_for_image(engine: EngineDep, image_id: ImageId, page: PageDep, options: OptionsDep):
    """Indexed image to captions (from the whole collection, its own included, or the filtered part)."""
    start = time.perf_counter()
    return captions_response(_as_422(engine.captions_for_image, image_id, page.k, page.offset, options), start)


def _as_422(search, *args):
    """A search whose mistakes (a filter value, an option that does not apply) are 422s."""
    try:
        return search(*args)
    except InvalidQuery as err:
        raise HTTPException(422, str(err)) from err


async def uploaded_image(file: UploadFile, service: Service) -> Image.Image:
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


def image_result(hit: ImageHit) -> schemas.ImageResult:
    return schemas.ImageResult(**{**hit.__dict__, "taken_at": wall_clock(hit.taken_at)},
                               url=f"/v1/images/{hit.id}/file",
                               thumbnail_url=f"/v1/images/{hit.id}/thumbnail")


def caption_result(hit: CaptionHit) -> schemas.CaptionResult:
    return schemas.CaptionResult(**hit.__dict__, thumbnail_url=f"/v1/images/{hit.image_id}/thumbnail")


def images_response(hits: list[ImageHit], start: float) -> schemas.ImageSearchResponse:
    return schemas.ImageSearchResponse(results=[image_result(h) for h in hits],
                                       took_ms=(time.perf_counter() - start) * 1000)


def captions_response(hits: list[CaptionHit], start: float) -> schemas.CaptionSearchResponse:
    return schemas.CaptionSearchResponse(results=[caption_result(h) for h in hits],
                                         took_ms=(time.perf_counter() - start) * 1000)
