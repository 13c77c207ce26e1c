"""The API's request and response models (pydantic); the OpenAPI docs at /docs come from these."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from crossmodal.search.expressions import MAX_FEEDBACK, MAX_TERMS, MAX_WEIGHT
from crossmodal.search.options import SearchOptions


class ImageResult(BaseModel):
    id: int
    score: float
    path: str
    width: int
    height: int
    captions: list[str]
    taken_at: datetime | None = Field(None, description="When it was taken (wall clock, no zone): EXIF "
                                      "DateTimeOriginal, else the file's modification time.")
    taken_from: Literal["exif", "mtime"] | None = None
    camera: str | None = None
    url: str
    thumbnail_url: str


class CaptionResult(BaseModel):
    id: int
    score: float
    text: str
    image_id: int
    image_path: str
    thumbnail_url: str


class ImageSearchResponse(BaseModel):
    results: list[ImageResult]
    took_ms: float


class CaptionSearchResponse(BaseModel):
    results: list[CaptionResult]
    took_ms: float


class QueryTerm(BaseModel):
    """One term of a query expression: a text or an indexed image, and its weight."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(default=None, description="A text term.")
    image_id: int | None = Field(default=None, ge=0, description="An indexed image's id (from a search result).")
    weight: float = Field(default=1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, description="Negative: away from this term. "
                                                                                 "Not 0.")

    @model_validator(mode="after")
    def one_kind(self) -> "QueryTerm":
        if (self.text is None) == (self.image_id is None):
            raise ValueError("a term has either `text` or `image_id`")
        if self.weight == 0:
            raise ValueError("a term's weight must not be 0")
        return self


class ImageQuery(SearchOptions):
    """A query expression and relevance feedback, as a JSON body of POST /v1/images/search, with the
    filters, sort and mode of SearchOptions as fields."""

    model_config = ConfigDict(extra="forbid")
    terms: list[QueryTerm] = Field(default=[], max_length=MAX_TERMS, description="Weighted text and image terms.")
    q: str | None = Field(default=None, description="An expression in the CLI's syntax, e.g. `beach +2:sunset "
                                                    "-people`; its terms come before `terms`.")
    more_like: list[int] = Field(default=[], max_length=MAX_FEEDBACK, description="Image ids to find more like.")
    less_like: list[int] = Field(default=[], max_length=MAX_FEEDBACK, description="Image ids to find fewer like.")
    k: int = Field(default=10, ge=1, description="Number of results (at most CROSSMODAL_MAX_K).")
    offset: int = Field(default=0, ge=0, description="Results to skip (at most CROSSMODAL_MAX_OFFSET).")


class CaptionOut(BaseModel):
    id: int
    text: str


class ImageDetail(BaseModel):
    id: int
    path: str
    width: int
    height: int
    bytes: int
    content_hash: str
    captions: list[CaptionOut]
    url: str
    thumbnail_url: str


class FolderCount(BaseModel):
    folder: str
    images: int


class CameraCount(BaseModel):
    camera: str
    images: int


class Facets(BaseModel):
    """What the filters can take in the served index (the UI's sidebar choices)."""

    folders: list[FolderCount] = Field(description="Every folder holding images, at any depth, with its image count.")
    cameras: list[CameraCount]
    taken_first: datetime | None
    taken_last: datetime | None
    taken_from_exif: int = Field(description="Images dated by EXIF; the others by their file's mtime.")
    with_captions: int
    images: int


class Stats(BaseModel):
    images: int
    captions: int
    model: str
    dim: int
    image_index_type: str
    caption_index_type: str
    build_id: int
    built_at: datetime | None
    collection_root: str = Field(description="The index's first folder (its only one, in an index of one).")
    folders: list["Folder"] = Field([], description="The folders the index holds (GET /v1/folders).")
    typical_best_score: float | None = Field(None, description="The median best text->image score of typical "
                                             "queries in this collection (models with a hubness bank).")
    weak_below_score: float | None = Field(None, description="A best match under this is weak: 9 in 10 typical "
                                           "queries find a better one.")


class Folder(BaseModel):
    """A folder the index holds, with its photo and caption counts in the served build."""

    id: int
    name: str = Field(description="Unique in the index: with several folders, photo paths start with it.")
    path: str = Field(description="The folder on the server's disk.")
    images: int
    captions: int


class FolderRequest(BaseModel):
    path: str = Field(description="Folder of images on the server's disk, to add to the index.")
    captions: str | None = Field(default=None, description="Optional captions file (TSV, CSV or JSONL); default: "
                                 "captions.tsv/csv/jsonl in the folder.")


class JobRequest(BaseModel):
    collection: str = Field(description="Folder of images on the server's disk.")
    captions: str | None = Field(default=None, description="Optional captions file (TSV, CSV or JSONL).")
    model: str | None = Field(default=None, description="Encoder name; default: the service's model.")


class JobProgress(BaseModel):
    phase: str
    done: int
    total: int
    rate: float = Field(description="Items per second in this phase.")
    eta_seconds: float | None
    overall: float = Field(0.0, description="The whole build's share done, over every phase (0 to 1).")
    overall_eta_seconds: float | None = Field(None, description="Time left for the whole build.")


class SkippedItem(BaseModel):
    path: str
    reason: str


JobAction = Literal["replace", "add", "remove", "rescan"]


class Job(BaseModel):
    id: str
    state: Literal["queued", "running", "done", "failed"]
    action: JobAction = Field("replace", description="replace: the index becomes `collection` alone; "
                                                     "add, remove, rescan: that folder of the index.")
    collection: str
    captions: str | None
    created_at: datetime
    finished_at: datetime | None = None
    progress: JobProgress | None = None
    error: str | None = None
    build_id: int | None = None
    images: int | None = None
    captions_indexed: int | None = None
    removed: int | None = Field(None, description="Indexed photos the rebuild removed (no longer in the folder).")
    unchanged: bool = Field(False, description="Nothing had changed: the served build stays (nothing was written).")
    skipped: list[SkippedItem] = []
    bad_caption_rows: list[SkippedItem] = []


class RebuildPreview(BaseModel):
    """What a rebuild over a folder would do to the served index (GET /v1/index/preview), before it starts."""

    collection: str
    indexed_from: list[str] = Field(description="The folders the served index holds.")
    indexed: int = Field(description="Photos in the served index (for a rescan: in that folder).")
    found: int = Field(description="Image files in the folder.")
    would_remove: int = Field(description="Indexed photos the rebuild removes: those of other folders, and "
                                          "those without a file at their path in this one.")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    reason: str | None = None
