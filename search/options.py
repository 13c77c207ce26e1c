"""What narrows and orders an image search: filters, sort with a relevance cutoff, and the ranking mode.

One pydantic model serves the API's query parameters and JSON fields, the CLI and the UI's client (so
it imports nothing but pydantic: the UI loads no index code); search/filters.py applies it.

Dates are wall-clock times, as EXIF stores them (no time zone): a date alone covers its whole day,
both bounds included. A photo without EXIF DateTimeOriginal is dated by its file's mtime.
"""
from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


Sort = Literal["relevance", "date_desc", "date_asc"]
Mode = Literal["vector", "keyword", "hybrid"]
FILTERS = ("folder", "taken_after", "taken_before", "camera", "orientation", "min_width", "max_width",
           "min_height", "max_height", "has_captions")


class SearchOptions(BaseModel):
    """Filters, sort and mode of an image search (query parameters, or fields of a JSON body)."""

    model_config = ConfigDict(extra="ignore")  # as query parameters they sit beside q, k and offset
    folder: str | None = Field(None, min_length=1, max_length=1000, description="Only images under this folder "
                               "of the collection (a path prefix, e.g. `holidays/2023`).")
    taken_after: date | datetime | None = Field(None, description="Taken on or after this date or time "
                                                "(EXIF DateTimeOriginal, else the file's mtime).")
    taken_before: date | datetime | None = Field(None, description="Taken on or before this date or time.")
    camera: str | None = Field(None, min_length=1, max_length=256, description="Camera maker or model, as "
                               "GET /v1/facets lists them (case does not matter).")
    orientation: Literal["landscape", "portrait", "square"] | None = None
    min_width: int | None = Field(None, ge=1, le=1_000_000, description="Pixels.")
    max_width: int | None = Field(None, ge=1, le=1_000_000)
    min_height: int | None = Field(None, ge=1, le=1_000_000)
    max_height: int | None = Field(None, ge=1, le=1_000_000)
    has_captions: bool | None = Field(None, description="Only images with (true) or without (false) captions.")
    sort: Sort = Field("relevance", description="`date_desc` / `date_asc`: the `top` results by relevance "
                       "(those scoring at least `min_score`), sorted by date taken.")
    min_score: float | None = Field(None, ge=-10, le=10, description="Leave out results scoring below this.")
    top: int = Field(100, ge=1, le=1000, description="With a date sort: how many results by relevance to sort.")
    mode: Mode = Field("vector", description="`keyword`: BM25 over captions and file names; `hybrid`: both "
                       "rankings fused by reciprocal rank.")

    @model_validator(mode="after")
    def bounds_in_order(self) -> "SearchOptions":
        if self.taken_after is not None and self.taken_before is not None and \
                first_second(self.taken_after) > last_second(self.taken_before):
            raise ValueError(f"taken_after ({self.taken_after}) is after taken_before ({self.taken_before})")
        for low, high in (("min_width", "max_width"), ("min_height", "max_height")):
            a, b = getattr(self, low), getattr(self, high)
            if a is not None and b is not None and a > b:
                raise ValueError(f"{low} ({a}) is above {high} ({b})")
        return self

    def has_filters(self) -> bool:
        return any(getattr(self, name) is not None for name in FILTERS)


def wall_clock(seconds: float | None) -> datetime | None:
    """A stored photo date (wall-clock seconds, see first_second) as the naive datetime it stands for."""
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).replace(tzinfo=None)


def first_second(value: date | datetime) -> float:
    """The first second a bound covers, as wall-clock seconds (how photo dates are stored)."""
    moment = value if isinstance(value, datetime) else datetime.combine(value, time())
    return moment.replace(tzinfo=timezone.utc).timestamp()


def last_second(value: date | datetime) -> float:
    """The last instant a bound covers: a date alone covers its whole day."""
    if isinstance(value, datetime):
        return first_second(value)
    return first_second(value + timedelta(days=1)) - 1e-6
