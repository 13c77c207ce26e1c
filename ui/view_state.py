"""The UI's view state: one record of what the user looks at, kept in the URL's query parameters.

Every control reads and writes it through Streamlit's session state (each field is a widget key
or a plain key the buttons set). `restore` runs first in each script run and `publish` last:

- a search can be bookmarked, shared and reloaded (the URL holds the view, the query, the page
  size, the opened or "similar to" result, the filters, the order and the refinements);
- switching views keeps the query and its results: Streamlit forgets a widget's value in a run
  that does not draw the widget, and the kept copy brings it back.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import Any

import streamlit as st

KEPT = "_view_state"  # the kept copy, in session state
VIEW_NAMES = ("text", "image", "index")  # the URL's names of the app's views, in their order


@dataclass(frozen=True)
class Field:
    key: str  # the session-state key the controls use
    parse: Callable[[str], Any]
    show: Callable[[Any], str] = str


def _ids(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip().isdigit()][:50]


def _dates(text: str) -> tuple[date, ...]:
    return tuple(date.fromisoformat(part) for part in text.split("..")[:2])


FIELDS = {  # URL parameter -> field
    "view": Field("view", str), "q": Field("query", str), "k": Field("page_size", int),
    "open": Field("selected", int), "similar": Field("similar_to", int), "describe": Field("describe_id", int),
    "folder": Field("filter_folder", str), "camera": Field("filter_camera", str),
    "orientation": Field("filter_orientation", str), "captions": Field("filter_captions", str),
    "dates": Field("filter_date_range", _dates, lambda value: "..".join(d.isoformat() for d in value)),
    "sort": Field("sort", str), "mode": Field("mode", str),
    "more": Field("feedback_more", _ids, lambda ids: ",".join(map(str, ids))),
    "less": Field("feedback_less", _ids, lambda ids: ",".join(map(str, ids))),
}
DEFAULTS = {"view": None, "query": "", "page_size": 12, "selected": None, "similar_to": None, "describe_id": None,
            "filter_folder": "Any", "filter_camera": "Any", "filter_orientation": "Any", "filter_captions": "Any",
            "filter_date_range": (), "sort": "relevance", "mode": "vector", "feedback_more": [], "feedback_less": []}


def restore(views: tuple[str, ...]) -> None:
    """Put every field into session state, where a control finds it: from the kept copy, or on a
    session's first run from the URL. `views`: the app's view labels, in VIEW_NAMES' order."""
    state = st.session_state
    if KEPT not in state:
        state[KEPT] = {**DEFAULTS, "view": views[0], **_from_url(views)}
    for key, value in state[KEPT].items():
        if key not in state:
            state[key] = value
    if "filter_dates" not in state:  # the checkbox that shows the date range
        state["filter_dates"] = bool(state.get("filter_date_range"))


def publish(views: tuple[str, ...]) -> None:
    """Keep what the controls hold now, and write it to the URL (defaults left out, so URLs stay short)."""
    state = st.session_state
    kept = state[KEPT]
    for key in DEFAULTS:
        if key in state:
            kept[key] = state[key]
    if not state.get("filter_dates"):
        kept["filter_date_range"] = ()
    shown = {**kept, "view": VIEW_NAMES[views.index(kept["view"])] if kept["view"] in views else None}
    defaults = {**DEFAULTS, "view": VIEW_NAMES[0]}
    wanted = {name: field.show(shown[field.key]) for name, field in FIELDS.items()
              if shown.get(field.key) not in (None, "", [], ()) and shown[field.key] != defaults[field.key]}
    if wanted != dict(st.query_params):
        st.query_params.from_dict(wanted)


def _from_url(views: tuple[str, ...]) -> dict[str, Any]:
    found = {}
    for name, value in st.query_params.items():
        field = FIELDS.get(name)
        if field is None:
            continue
        try:
            found[field.key] = field.parse(value)
        except ValueError:  # a hand-edited URL: that part is ignored, the rest still applies
            continue
    view = found.pop("view", None)
    if view in VIEW_NAMES:
        found["view"] = views[VIEW_NAMES.index(view)]
    return found
