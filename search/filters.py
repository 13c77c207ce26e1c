"""Filters and date order applied to the served build: SearchOptions (options.py) over its attribute table.

`select` turns the filters into a Selection of image ids (attributes.py), which ranking uses to
pre- or post-filter inside FAISS; `ordered` applies the relevance cutoff and the date sort.
"""
from __future__ import annotations

import numpy as np

from crossmodal.indexer.attributes import Attributes, Selection
from crossmodal.search.options import SearchOptions, first_second, last_second
from crossmodal.search.queries import InvalidQuery


def select(options: SearchOptions, attributes: Attributes) -> Selection | None:
    """The images the filters let through (None: no filter); a value matching nothing known is an InvalidQuery."""
    if not options.has_filters():
        return None
    rows = attributes.rows
    mask = np.ones(len(rows), dtype=bool)
    if options.folder is not None:
        inside = np.zeros(len(rows), dtype=bool)
        inside[attributes.folder_rows(options.folder)] = True
        if not inside.any():
            raise InvalidQuery(f"folder {options.folder!r}: no indexed image is in it")
        mask &= inside
    if options.camera is not None:
        mask &= np.isin(rows["camera"], _cameras(options.camera, attributes.cameras))
    taken = rows["taken_at"]
    if options.taken_after is not None:
        mask &= taken >= first_second(options.taken_after)
    if options.taken_before is not None:
        mask &= taken <= last_second(options.taken_before)
    width, height = rows["width"], rows["height"]
    for value, column, keep in ((options.min_width, width, np.greater_equal), (options.max_width, width, np.less_equal),
                                (options.min_height, height, np.greater_equal),
                                (options.max_height, height, np.less_equal)):
        if value is not None:
            mask &= keep(column, value)
    if options.orientation is not None:
        shapes = {"landscape": width > height, "portrait": height > width, "square": width == height}
        mask &= shapes[options.orientation]
    if options.has_captions is not None:
        mask &= rows["captioned"] == options.has_captions
    return attributes.selection(mask)


def _cameras(name: str, cameras: list[str]) -> list[int]:
    """Indexes of the cameras named `name`: the whole name, or its first words (a maker), any case."""
    wanted = " ".join(name.lower().split())
    found = [i for i, camera in enumerate(cameras)
             if camera.lower() == wanted or camera.lower().startswith(wanted + " ")]
    if not found:
        known = ", ".join(cameras[:10]) + (", ..." if len(cameras) > 10 else "") if cameras else "none recorded"
        raise InvalidQuery(f"camera {name!r} took no indexed photo (cameras in this collection: {known})")
    return found


def ordered(ranking: list[tuple[int, float]], options: SearchOptions,
            attributes: Attributes) -> list[tuple[int, float]]:
    """The cutoff, then the date sort of what is left (undated last; equal dates keep their relevance order)."""
    if options.min_score is not None:
        ranking = [(i, s) for i, s in ranking if s >= options.min_score]
    if options.sort == "relevance" or not ranking:
        return ranking
    rows, found = attributes.positions(np.array([i for i, _ in ranking], dtype=np.int64))
    taken = np.where(found, attributes.rows["taken_at"][rows], np.nan)
    key = np.nan_to_num(-taken if options.sort == "date_desc" else taken, nan=np.inf)
    return [ranking[i] for i in np.lexsort((np.arange(len(ranking)), key))]
