"""The Streamlit UI: text to images, image to captions, and the index with live rebuilds.

It talks to the search service over HTTP only (`ui.client`); it never loads the model
or an index. Run it with `crossmodal ui` (or `crossmodal up` for service + UI).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

import streamlit as st

from crossmodal.search import schemas
from crossmodal.search.options import SearchOptions
from crossmodal.ui.client import (RebuildRunning, Rejected, SearchClient, ServiceDown, ServiceError, ServiceNotReady,
                                  Upload)
from crossmodal.ui import view_state
from crossmodal.ui.settings import get_ui_settings

VIEWS = ("Text → images", "Image → captions", "Index")
PAGE_SIZES = (8, 12, 24, 48)
GRID_COLUMNS = 4
EXAMPLES = ("a dog running on the grass", "a man with a camera", "a horse", "a cup of coffee")
SORTS = {"relevance": "Best match first", "date_desc": "Newest first", "date_asc": "Oldest first"}
MODES = {"vector": "Meaning (vector search)", "hybrid": "Meaning and words (hybrid)",
         "keyword": "Words in captions and file names"}
ANY = "Any"
SAME_PHOTO_SCORE = 0.98  # an upload this close to an indexed photo is that photo (re-encoded or resized)
CAPTIONED = {ANY: None, "With captions": True, "Without captions": False}


# -- service access (cached per API URL) -------------------------------------------------------

@st.cache_resource(show_spinner=False)
def _client(api_url: str) -> SearchClient:
    return SearchClient(api_url)


def client() -> SearchClient:
    return _client(get_ui_settings().api_url)


@st.cache_data(ttl=3600, max_entries=4096, show_spinner=False)
def thumbnail(api_url: str, image_id: int) -> bytes | None:
    """Row ids are immutable (a changed file gets a new id), so caching by id is safe."""
    try:
        return _client(api_url).thumbnail(image_id)
    except ServiceError:
        return None


def show_thumbnail(image_id: int, alt: str, width: int | None = None) -> None:
    """A result's thumbnail; `alt` (its first caption, else its file name) is what a screen reader says."""
    data = thumbnail(client().api_url, image_id)
    if data is None:
        st.caption("(no preview: the file is no longer readable)")
    else:
        st.image(data, width=width or "stretch", alt=alt)


def alt_text(hit: schemas.ImageResult) -> str:
    return hit.captions[0] if hit.captions else f"photo {hit.path}"


@st.cache_data(ttl=30, show_spinner=False)
def served(api_url: str, what: str):
    """`stats` (the served build's score scale, for match bars) or `facets` (the filters' folders, cameras
    and dates), re-read every 30 s: a rebuild changes them. None while the service cannot say."""
    try:
        return getattr(_client(api_url), what)()
    except ServiceError:
        return None


def served_stats(api_url: str) -> schemas.Stats | None:
    return served(api_url, "stats")


def match_scale(hits: list[schemas.ImageResult], text_query: bool) -> tuple[float, float]:
    """(weak, strong) scores for the match bars: for a text query ranked by vector, the served build's
    scale of typical queries (ranking.score_scale); otherwise (image queries, keyword and hybrid scores,
    a model without a scale) the spread of these results."""
    stats = served_stats(client().api_url)
    if text_query and stats is not None and stats.typical_best_score is not None \
            and stats.weak_below_score is not None:
        return stats.weak_below_score, stats.typical_best_score
    scores = [h.score for h in hits] or [0.0]
    return min(scores), max(scores)


def match_bar(score: float, scale: tuple[float, float]) -> None:
    """A bar a person can read: full at a typical best match, empty at a weak one; the raw score in words."""
    weak, strong = scale
    share = 1.0 if strong <= weak else min(1.0, max(0.0, (score - weak) / (strong - weak)))
    label = "strong match" if share >= 1.0 else "good match" if share >= 0.5 else "fair match" if share > 0 \
        else "weak match"
    st.progress(share, text=f"{label} · score {score:.3f}")


def facets(api_url: str) -> schemas.Facets | None:
    return served(api_url, "facets")


def guarded(action: Callable, *args, **kwargs):
    """Run a service call; show its failure as a message and return None instead of raising."""
    try:
        return action(*args, **kwargs)
    except ServiceNotReady as err:
        st.info(f"The search service is not ready: {plain(str(err))}")
    except Rejected as err:
        st.error(f"The service refused this request: {plain(str(err))}")
    except ServiceError as err:  # down, or a server error
        st.error(str(err))
    return None


# -- shared pieces ------------------------------------------------------------------------------

STYLE = """<style>
/* Captions at WCAG AA contrast: Streamlit's grey measured 3.9:1 on white, this is 7.8:1. */
[data-testid="stCaptionContainer"], [data-testid="stCaptionContainer"] p { color: #4a4d55; }
/* Phones: two result cards a row (Streamlit stacks columns one per row: 12 results were 7,600 px). */
@media (max-width: 640px) {
  [class*=st-key-results] [data-testid="stHorizontalBlock"] { flex-wrap: wrap; gap: 0.5rem; }
  [class*=st-key-results] [data-testid="stColumn"] { flex: 1 1 calc(50% - 0.5rem) !important;
                                               min-width: calc(50% - 0.5rem) !important; }
}
</style>"""


def image_grid(hits: list[schemas.ImageResult], key: str, feedback: bool = False, dates: bool = False,
               text_query: bool = False) -> None:
    """Thumbnails with score, path and first caption; each can be opened or used as a query, and
    with `feedback`, refine the current query ("more like this" / "less like this"). `dates`: show
    when each was taken (a date sort). Open and Similar lead to the text view, where both are shown."""
    scale = match_scale(hits, text_query)
    grid = st.container(key=f"results-{key}")
    for row_start in range(0, len(hits), GRID_COLUMNS):
        columns = grid.columns(GRID_COLUMNS)
        for column, hit in zip(columns, hits[row_start:row_start + GRID_COLUMNS]):
            with column, st.container(border=True):
                show_thumbnail(hit.id, alt_text(hit))
                st.markdown(f"**{hit.score:.3f}** · {code(hit.path)}")
                match_bar(hit.score, scale)
                if dates and hit.taken_at is not None:
                    st.caption(f"taken {hit.taken_at:%Y-%m-%d %H:%M}" + (" (file date)" if hit.taken_from == "mtime"
                                                                        else ""))
                if hit.captions:
                    st.caption(plain(hit.captions[0]))
                left, right = st.columns(2)
                name = hit.path.rsplit("/", 1)[-1]
                left.button("Open", key=f"{key}-open-{hit.id}", on_click=_in_text_view, args=("selected", hit.id),
                            width="stretch", help=f"Open {name} large, with its captions")
                right.button("Similar", key=f"{key}-similar-{hit.id}", on_click=_in_text_view,
                             args=("similar_to", hit.id), width="stretch", help=f"Photos like {name}")
                if feedback:
                    left, right = st.columns(2)
                    left.button("More like", key=f"{key}-morelike-{hit.id}", on_click=_feedback,
                                args=("more", hit.id), width="stretch", help=f"More like {name}: refine the query")
                    right.button("Less like", key=f"{key}-lesslike-{hit.id}", on_click=_feedback,
                                 args=("less", hit.id), width="stretch", help=f"Less like {name}: refine the query")


def caption_list(hits: list[schemas.CaptionResult]) -> None:
    """Ranked captions grouped by their photo: one thumbnail per photo, its matching captions beside it
    (a photo with three matching captions was shown three times)."""
    groups: dict[int, list[tuple[int, schemas.CaptionResult]]] = {}
    for rank, hit in enumerate(hits, 1):
        groups.setdefault(hit.image_id, []).append((rank, hit))
    for image_id, ranked in groups.items():
        thumb, text = st.columns([1, 5], vertical_alignment="center")
        with thumb:
            show_thumbnail(image_id, alt=ranked[0][1].text, width=96)
        for rank, hit in ranked:
            text.markdown(f"{rank}\\. **{hit.score:.3f}** · {plain(hit.text)}")
        text.caption(f"image {code(ranked[0][1].image_path)} (id {image_id})")


MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|$:<>~&=^])")


def plain(text: str) -> str:
    """Text from the collection or the service, shown as itself inside Markdown.

    Streamlit renders Markdown everywhere: a caption `![](http://elsewhere/pixel.png)` made
    the browser fetch it, `$x$` became maths and `:red[...]` styling. Every Markdown, math
    and directive character is backslash-escaped; line breaks become spaces.
    """
    return MARKDOWN_SPECIALS.sub(r"\\\1", " ".join(text.split()))


def code(text: str) -> str:
    """A path in a code span (literal there), or escaped where a backtick would end the span."""
    return f"`{text}`" if "`" not in text and "\n" not in text else plain(text)


def _set(key: str, value) -> None:
    st.session_state[key] = value


def _feedback(side: str, image_id: int) -> None:
    """Refine the current text query with this result (relevance feedback); one side per image."""
    state = st.session_state
    other = "less" if side == "more" else "more"
    state[f"feedback_{other}"] = [i for i in state.get(f"feedback_{other}", []) if i != image_id]
    if image_id not in state.get(f"feedback_{side}", []):
        state[f"feedback_{side}"] = [*state.get(f"feedback_{side}", []), image_id]


def _feedback_now() -> dict[str, list[int]]:
    return {side: list(st.session_state.get(f"feedback_{side}", [])) for side in ("more", "less")}


def _clear_feedback() -> None:
    st.session_state.feedback_more, st.session_state.feedback_less = [], []


def _new_query() -> None:
    """A new query starts afresh: no refinements, no "Similar" list or opened result left over from the
    last one (those hid the new query's results, issue 20 items 1 and 3)."""
    _clear_feedback()
    st.session_state.similar_to = None
    st.session_state.selected = None


def _describe(image_id: int) -> None:
    """Jump to Image → captions with this collection image as the query."""
    st.session_state.describe_id = image_id
    st.session_state.selected = None
    st.session_state.view = VIEWS[1]


def _in_text_view(key: str, image_id: int) -> None:
    """Open a result, or list images similar to it: both are shown in the Text → images view, so go there
    from any view (in Image → captions they did nothing visible where they were clicked, issue 20 item 2)."""
    st.session_state[key] = image_id
    st.session_state.view = VIEWS[0]


def detail_panel(api: SearchClient) -> None:
    """The opened result, in a dialog over the page: where it is seen whatever the scroll position (drawn at
    the top of the page, it was out of sight for a result further down, issue 20 item 3)."""
    image_id = st.session_state.get("selected")
    if image_id is None:
        st.session_state.pop("_leave_result", None)  # left by a full rerun of the page: nothing to leave
    else:
        _opened_result(api, image_id)


def _dismissed() -> None:
    st.session_state.selected = None


@st.dialog("Result", width="large", on_dismiss=_dismissed)
def _opened_result(api: SearchClient, image_id: int) -> None:
    """The opened result, large, with its captions; from here it can be described or used as a query."""
    if st.session_state.pop("_leave_result", False):
        st.rerun()  # a button below changed the page: a click in a dialog reruns only the dialog
    detail = guarded(api.image, image_id)
    if detail is None:
        return
    picture, info = st.columns([3, 2])
    data = guarded(api.image_file, image_id)
    if data is not None:
        picture.image(data, width="stretch", alt=detail.captions[0].text if detail.captions else f"photo {detail.path}")
    info.subheader(plain(detail.path))
    info.caption(f"id {detail.id} · {detail.width}×{detail.height} px · {detail.bytes:,} bytes")
    for caption in detail.captions:
        info.markdown(f"- {plain(caption.text)}")
    if not detail.captions:
        info.caption("No captions for this image.")
    info.button("Similar images", key="detail-similar", on_click=_leave_result, args=("similar_to", image_id))
    info.button("Describe it (captions)", key="detail-describe", on_click=_leave_result, args=("describe_id", image_id))
    info.button("Close", key="detail-close", on_click=_leave_result)


def _leave_result(key: str | None = None, image_id: int | None = None) -> None:
    """Close the opened result, and show images similar to it or describe it."""
    state = st.session_state
    state.selected, state._leave_result = None, True
    if key == "similar_to":
        state.similar_to = image_id
    elif key == "describe_id":
        _describe(image_id)


# -- views --------------------------------------------------------------------------------------

def text_view(api: SearchClient) -> None:
    st.header("Find images by text")
    query_column, size_column = st.columns([4, 1])
    query = query_column.text_input("Query", key="query", placeholder="e.g. " + EXAMPLES[0],
                                    on_change=_new_query).strip()
    query_column.caption("Combine terms: `beach +2:sunset -people` (weights up to 10; `-` steers away) · "
                         "`image:ID` is a result's image · **More like** / **Less like** on a result "
                         "refines the query.")
    page_size = size_column.selectbox("Results per page", PAGE_SIZES, key="page_size")
    options = search_options(api)
    detail_panel(api)
    similar_to = st.session_state.get("similar_to")
    if similar_to is not None:
        similar_results(api, similar_to, page_size, options)
    elif not query:
        st.info("Type what you are looking for, for example: " + " · ".join(f"*{e}*" for e in EXAMPLES))
    else:
        text_results(api, query, page_size, options)


def search_options(api: SearchClient) -> SearchOptions:
    """The sidebar's filters, sort and match mode; every search of the text view uses them."""
    found = facets(api.api_url)
    folders = [ANY, *(f.folder for f in found.folders)] if found else [ANY]
    cameras = [ANY, *(c.camera for c in found.cameras)] if found else [ANY]
    _choices_of("filter_folder", folders)
    _choices_of("filter_camera", cameras)
    with st.sidebar.expander("Filters and order", expanded=True):
        folder = st.selectbox("Folder", folders, key="filter_folder",
                              format_func=lambda f: "All folders" if f == ANY else f)
        camera = st.selectbox("Camera", cameras, key="filter_camera")
        dates = None
        if found and found.taken_first and st.checkbox("Only photos taken between", key="filter_dates"):
            if len(st.session_state.get("filter_date_range") or ()) != 2:
                st.session_state.filter_date_range = (found.taken_first.date(), found.taken_last.date())
            dates = st.date_input("Dates taken", key="filter_date_range")
        orientation = st.selectbox("Orientation", [ANY, "landscape", "portrait", "square"], key="filter_orientation")
        captions = st.selectbox("Captions", list(CAPTIONED), key="filter_captions")
        sort = st.selectbox("Order", list(SORTS), format_func=SORTS.get, key="sort",
                            help="Newest or oldest first: the 100 best matches, sorted by the date they were taken.")
        mode = st.selectbox("Match", list(MODES), format_func=MODES.get, key="mode")
    dates = tuple(dates or ())
    return SearchOptions(folder=None if folder == ANY else folder, camera=None if camera == ANY else camera,
                         taken_after=dates[0] if dates else None, taken_before=dates[-1] if dates else None,
                         orientation=None if orientation == ANY else orientation, has_captions=CAPTIONED[captions],
                         sort=sort, mode=mode)


def _choices_of(key: str, choices: list[str]) -> None:
    """A kept or bookmarked choice the collection no longer has (a folder since removed) becomes Any."""
    if st.session_state.get(key) not in choices:
        st.session_state[key] = ANY


def _search_text(api: SearchClient, query: str, k: int, offset: int, feedback: dict, options: SearchOptions):
    if feedback["more"] or feedback["less"]:
        return api.images_by_query(query, k, offset, feedback["more"], feedback["less"], options)
    return api.images_by_text(query, k, offset, options)


def text_results(api: SearchClient, query: str, page_size: int, options: SearchOptions) -> None:
    feedback = _feedback_now()
    wanted = {"query": query, "page_size": page_size, "more": list(feedback["more"]), "less": list(feedback["less"]),
              "options": options.model_dump(mode="json")}
    state = st.session_state.get("text_results")
    if not state or any(state[key] != value for key, value in wanted.items()):
        with st.spinner("Searching…"):
            response = guarded(_search_text, api, query, page_size, 0, feedback, options)
        if response is None:
            return
        state = {**wanted, "hits": response.results, "took_ms": response.took_ms,
                 "exhausted": len(response.results) < page_size}
        st.session_state.text_results = state
    hits = state["hits"]
    if not hits:
        st.warning(f"No images match “{plain(query)}” with these filters: widen them in the sidebar."
                   if options.has_filters() or options.mode == "keyword" else
                   f"No images match “{plain(query)}”: the index is empty. Build one in the Index view.")
        return
    stats = served_stats(client().api_url)
    if options.mode == "vector" and stats is not None and stats.weak_below_score is not None \
            and hits[0].score < stats.weak_below_score:
        st.warning(f"Weak matches: even the best result scores {hits[0].score:.3f}, below what 9 in 10 typical "
                   f"queries find in this collection ({stats.weak_below_score:.3f}). Nothing here may be what you "
                   "look for: try other words.")
    refined = f" · refined: more like {len(state['more'])}, less like {len(state['less'])}" \
        if state["more"] or state["less"] else ""
    st.caption(f"{len(hits)} images for “{plain(query)}” · {state['took_ms']:.0f} ms{refined}")
    if refined:
        st.button("Clear refinements", key="feedback-clear", on_click=_clear_feedback)
    image_grid(hits, "text", feedback=True, dates=options.sort != "relevance", text_query=options.mode == "vector")
    if not state["exhausted"]:
        st.button("More results", key="more", on_click=_more_text, args=(api,))


def _more_text(api: SearchClient) -> None:
    state = st.session_state.text_results
    try:
        response = _search_text(api, state["query"], state["page_size"], len(state["hits"]), state,
                                SearchOptions(**state["options"]))
    except Rejected:  # paged past the service's limit (CROSSMODAL_MAX_OFFSET): the end of the list
        state["exhausted"] = True
        return
    except ServiceError as err:
        st.error(plain(str(err)))
        return
    state["hits"] = state["hits"] + response.results
    state["exhausted"] = len(response.results) < state["page_size"]


def similar_results(api: SearchClient, image_id: int, page_size: int, options: SearchOptions) -> None:
    detail = guarded(api.image, image_id)
    title = detail.path if detail else f"image {image_id}"
    header, back = st.columns([4, 1], vertical_alignment="bottom")
    header.subheader(f"Images similar to {plain(title)}")
    back.button("Back to text search", key="similar-back", on_click=_set, args=("similar_to", None))
    with st.spinner("Finding similar photos…"):
        response = guarded(api.similar_images, image_id, page_size, 0, options)
    if response is not None:
        image_grid(response.results, "similar", dates=options.sort != "relevance")


def image_view(api: SearchClient) -> None:
    st.header("Find captions for an image")
    upload_column, k_column = st.columns([4, 1])
    # Any file is taken, and the service judges its bytes: the uploader's own refusal of a type was a
    # small red "!" whose reason showed on hover only (issue 20 item 7); the service's is said in words.
    upload = upload_column.file_uploader("Upload an image (JPEG, PNG, WebP, GIF, BMP or TIFF)", key="upload")
    k = k_column.selectbox("Results", PAGE_SIZES, index=1, key="image_k")
    describe_id = st.session_state.get("describe_id")
    if upload is not None:
        query = Upload(upload.name, upload.getvalue(), upload.type or "application/octet-stream")
        captions, images = _image_query_results(api, query, (upload.file_id, k), k)
        if images is None:
            return
        left, right = st.columns([1, 3])
        left.image(query.data, caption=query.name, width="stretch")
    elif describe_id is not None:
        left, right = st.columns([1, 3])
        with left:
            show_thumbnail(describe_id, alt="the collection photo being described")
            st.button("Clear", key="describe-clear", on_click=_set, args=("describe_id", None))
        with st.spinner("Searching…"):
            captions = guarded(api.captions_for_image, describe_id, k)
            images = guarded(api.similar_images, describe_id, k) if captions is not None else None
    else:
        st.info("Upload a photo, or press **Open → Describe it** on a search result to use an indexed image.")
        return
    if captions is None or images is None:
        return
    own = describe_id is not None and upload is None
    with right:
        if own or (images.results and images.results[0].score >= SAME_PHOTO_SCORE):
            st.subheader("Captions that describe it")
            if not own:
                st.caption(f"This photo is in your collection: {code(images.results[0].path)}.")
        else:
            st.subheader("Captions of similar photos in your collection")
            st.caption("This photo is not in the collection: these captions were written for the photos most "
                       "like it, grouped by photo.")
        if captions.results:
            caption_list(captions.results)
        else:
            st.warning("The index holds no captions.")
    st.subheader("Most similar images")
    image_grid(images.results, "image")


def _image_query_results(api: SearchClient, query: Upload, key: tuple, k: int):
    """(captions, images) for an upload, asked once per upload and size: a click elsewhere on the page
    (a button of a result) re-sent the photo every time."""
    kept = st.session_state.get("image_results")
    if kept and kept["key"] == key:
        return kept["captions"], kept["images"]
    with st.spinner("Reading the photo and searching…"):
        captions = guarded(api.captions_by_image, query, k)  # the service judges the bytes first
        images = guarded(api.images_by_image, query, k) if captions is not None else None
    if images is not None:
        st.session_state.image_results = {"key": key, "captions": captions, "images": images}
    return captions, images


def index_view(api: SearchClient, status: str) -> None:
    st.header("Index")
    if status == "down":  # said once, in the sidebar; nothing here can work until it is back
        st.info("The Index view needs the service (see the sidebar).")
        return
    stats = None
    try:
        stats = api.stats()
    except ServiceNotReady as err:
        st.info(f"Nothing is served yet: {plain(str(err))}")
    except ServiceError as err:
        st.error(str(err))
    if stats is not None:
        show_stats(stats)
    st.text_input("Admin token", type="password", key="admin_token",
                  help="The service's CROSSMODAL_ADMIN_TOKEN, when it has one. The UI holds no token of its "
                       "own: it sends yours for this browser session only.")
    job_id = st.session_state.get("job_id") or _running_job_id(api)
    running = job_id is not None and _job_state(api, job_id) in ("queued", "running")
    if stats is not None:
        folders_panel(api, stats, running)
    rebuild_form(api, stats, running)
    job_id = st.session_state.get("job_id") or job_id  # the form may have just started one
    if job_id:
        job_panel(api, job_id, stats.build_id if stats is not None else None)


def show_stats(stats: schemas.Stats) -> None:
    columns = st.columns(4)
    columns[0].metric("Images", f"{stats.images:,}")
    columns[1].metric("Captions", f"{stats.captions:,}")
    columns[2].metric("Build", stats.build_id)
    columns[3].metric("Dimensions", stats.dim)
    built = stats.built_at.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(stats.built_at, datetime) else "unknown"
    st.markdown(f"Model **{plain(stats.model)}** · image index {code(stats.image_index_type)} · caption index "
                f"{code(stats.caption_index_type)} · built {built}")


def folders_panel(api: SearchClient, stats: schemas.Stats, running: bool) -> None:
    """The index's folders with their counts: read one again, remove one (after saying how many photos
    go), add another (issue 20 item 5: one folder per index, and a rebuild elsewhere replaced it)."""
    st.subheader("Folders")
    busy = "A rebuild is running: its progress is below." if running else None
    for folder in stats.folders:
        name, counts, rescan, remove = st.columns([4, 3, 1, 1], vertical_alignment="center")
        name.markdown(f"**{plain(folder.name)}**  \n{code(folder.path)}")
        counts.markdown(f"{folder.images:,} photos · {folder.captions:,} captions")
        rescan.button("Rescan", key=f"folder-rescan-{folder.id}", disabled=running,
                      help=busy or f"Read {folder.name} again: new, changed and deleted files",
                      on_click=_set, args=("folder_action", {"action": "rescan", "folder": folder.model_dump()}))
        only = "The index's only folder: rebuild over another folder below instead." \
            if len(stats.folders) == 1 else None
        remove.button("Remove", key=f"folder-remove-{folder.id}", disabled=running or bool(only),
                      help=busy or only or f"Remove {folder.name} and its photos from the index (files stay on disk)",
                      on_click=_set, args=("folder_action", {"action": "remove", "folder": folder.model_dump()}))
    _folder_action(api, running)
    with st.form("add-folder", clear_on_submit=True):
        path = st.text_input("Add a folder (on the server)", key="add_folder_path",
                             placeholder="/photos/phone", help="Only this folder is read; the others keep their photos.")
        captions = st.text_input("Its captions file (optional; default: captions.* in the folder)",
                                 key="add_folder_captions")
        added = st.form_submit_button("Add folder", disabled=running, help=busy)
    if added and not path.strip():
        st.error("Name the folder to add.")
    elif added:
        _start_job(lambda token: api.add_folder(path.strip(), captions.strip() or None, token))


def _folder_action(api: SearchClient, running: bool) -> None:
    """A Remove says how many photos go and waits for a yes; so does a Rescan that would remove photos
    (files deleted from the folder); other rescans start at once."""
    pending = st.session_state.get("folder_action")
    if pending is None or running:
        return
    folder = schemas.Folder(**pending["folder"])
    if not pending.get("confirmed"):
        going = folder.images if pending["action"] == "remove" else _rescan_removes(api, folder)
        if going is None:
            return
        if going:
            _ask_before(pending, folder, going)
            return
    st.session_state.folder_action = None
    start = api.remove_folder if pending["action"] == "remove" else api.rescan_folder
    _start_job(lambda token: start(folder.id, token))


def rebuild_form(api: SearchClient, stats: schemas.Stats | None, running: bool = False) -> None:
    """The rebuild form; its button is disabled while a rebuild runs (its progress is shown below)."""
    with st.form("rebuild"):
        st.subheader("Rebuild")
        st.caption("The index becomes this one folder: photos of any other folder leave it (you are asked first).")
        collection = st.text_input("Collection folder (on the server)", value=stats.collection_root if stats else "",
                                   key="rebuild_collection")
        captions = st.text_input("Captions file (optional: TSV, CSV or JSONL; default: captions.* in the folder)",
                                 key="rebuild_captions")
        submitted = st.form_submit_button("Rebuild index", disabled=running,
                                          help="A rebuild is running: its progress is below." if running else None)
    pending = st.session_state.get("pending_rebuild")
    if submitted:
        if not collection.strip():
            st.error("Name the collection folder to index.")
            return
        pending = {"collection": collection.strip(), "captions": captions.strip() or None, "confirmed": False}
        st.session_state.pending_rebuild = pending
    if pending is None or running:
        return
    if not pending["confirmed"] and not _removal_confirmed(api, pending):
        return
    st.session_state.pending_rebuild = None
    _start_rebuild(api, pending["collection"], pending["captions"])


def _rescan_removes(api: SearchClient, folder: schemas.Folder) -> int | None:
    """How many of a folder's photos a rescan would remove (None: the service refused to say)."""
    try:
        return api.preview_rebuild(folder.path, token=_token(), action="rescan").would_remove
    except ServiceError as err:
        st.session_state.folder_action = None
        _rebuild_refused(err)
        return None


def _ask_before(pending: dict, folder: schemas.Folder, going: int) -> None:
    if pending["action"] == "remove":
        st.warning(f"Remove **{plain(folder.name)}** from the index? Its **{folder.images:,} photos** and "
                   f"{folder.captions:,} captions leave the index; the files stay on disk.")
    else:
        st.warning(f"Rescanning **{plain(folder.name)}** would remove **{going:,} of its {folder.images:,} "
                   "photos**: the folder has no file at their paths any more.")
    go, cancel = st.columns(2)
    verb = "Remove" if pending["action"] == "remove" else "Rescan and remove"
    go.button(f"{verb} {going:,} photos", key="folder-confirm", type="primary",
              on_click=_set, args=("folder_action", {**pending, "confirmed": True}))
    cancel.button("Cancel", key="folder-cancel", on_click=_set, args=("folder_action", None))


def _removal_confirmed(api: SearchClient, pending: dict) -> bool:
    """A rebuild that would remove indexed photos says how many, and starts only once the user agrees
    (a rebuild over another folder silently replaced 300 photos with 50, issue 20 item 5)."""
    try:
        preview = api.preview_rebuild(pending["collection"], token=_token())
    except ServiceError as err:
        st.session_state.pending_rebuild = None
        _rebuild_refused(err)
        return False
    if not preview.would_remove:
        return True
    others = [f for f in preview.indexed_from if f != preview.collection]
    elsewhere = f" (indexed from {', '.join(code(f) for f in others)})" if others else ""
    st.warning(f"This rebuild would remove **{preview.would_remove:,} of the {preview.indexed:,} indexed photos**"
               f"{elsewhere}: {code(preview.collection)} has no file at their paths. It holds "
               f"{preview.found:,} image files.")
    go, cancel = st.columns(2)
    go.button(f"Rebuild and remove {preview.would_remove:,} photos", key="rebuild-confirm", type="primary",
              on_click=_confirm_rebuild)
    cancel.button("Cancel", key="rebuild-cancel", on_click=_set, args=("pending_rebuild", None))
    return False


def _rebuild_refused(err: ServiceError) -> None:
    if err.status == 401:
        st.error("This service needs its admin token for rebuilds: enter it in the form above.")
    else:
        st.error(f"The rebuild could not start: {plain(str(err))}")


def _confirm_rebuild() -> None:
    st.session_state.pending_rebuild = {**st.session_state.pending_rebuild, "confirmed": True}


def _start_rebuild(api: SearchClient, collection: str, captions: str | None) -> None:
    _start_job(lambda token: api.start_rebuild(collection, captions, token=token))


def _start_job(start: Callable[[str], schemas.Job]) -> None:
    """Start a job with the user's token; its panel follows it, a refusal is said in words."""
    try:
        job = start(_token())
    except RebuildRunning as err:
        st.warning(f"{plain(str(err))}. Its progress is shown below.")
        return
    except ServiceError as err:
        _rebuild_refused(err)
        return
    st.session_state.job_id = job.id


def _token() -> str:
    """The admin token the user typed in this browser session (empty: none)."""
    return st.session_state.get("admin_token", "").strip()


def _job_state(api: SearchClient, job_id: str) -> str | None:
    """A job's state, quietly (the job panel below says what went wrong, once)."""
    try:
        return api.job(job_id, _token()).state
    except ServiceError:
        return None


def _running_job_id(api: SearchClient) -> str | None:
    try:
        return next((j.id for j in api.jobs(_token()) if j.state in ("queued", "running")), None)
    except ServiceError:
        return None


def job_panel(api: SearchClient, job_id: str, shown_build: int | None) -> None:
    """The job's progress or outcome. A job that published its build between this run's stats and here
    reloads the page once, so its counts are never shown beside the build it replaced."""
    job = guarded(api.job, job_id, _token())
    if job is None:
        st.session_state.job_id = None
    elif job.state in ("queued", "running"):
        live_job(api, job_id)
    else:
        newer = job.state == "done" and job.build_id is not None and shown_build is not None \
            and job.build_id > shown_build
        if newer and st.session_state.get("reloaded_for_job") != job_id:
            st.session_state.reloaded_for_job = job_id
            st.rerun()
        show_job(job)


@st.fragment(run_every=1.0)
def live_job(api: SearchClient, job_id: str) -> None:
    """Polls the job endpoint every second; when the job ends, the whole page reloads its stats."""
    job = guarded(api.job, job_id, _token())
    if job is None:
        return
    show_job(job)
    if job.state not in ("queued", "running"):
        st.rerun()


def show_job(job: schemas.Job) -> None:
    what = {"replace": "Rebuild", "add": "Add folder", "remove": "Remove folder", "rescan": "Rescan folder"}
    st.subheader(f"{what[job.action]} {job.id}")
    st.caption(code(job.collection) + (f" with captions {code(job.captions)}" if job.captions else ""))
    if job.state in ("queued", "running"):
        progress = job.progress
        if progress is None:
            st.progress(0.0, text="queued…")
        else:  # one bar over the whole build; the phase's count and rate beside it
            left = f" · about {_duration(progress.overall_eta_seconds)} left" \
                if progress.overall_eta_seconds is not None else ""
            count = f": {progress.done:,} / {progress.total:,} · {progress.rate:.1f}/s" if progress.total else "…"
            st.progress(min(1.0, progress.overall), text=f"{progress.phase}{count}{left}")
    elif job.state == "done":
        many = (job.removed or 0) > 1
        gone = "of the removed folder left the index" if job.action == "remove" else \
            f"no longer in the folder {'were' if many else 'was'} removed"
        removed = f" {job.removed:,} photo{'s' if many else ''} {gone}." if job.removed else ""
        outcome = f"Nothing changed: build {job.build_id} stays" if job.unchanged else f"Build {job.build_id} published"
        st.success(f"{outcome}: {job.images:,} images, {job.captions_indexed:,} captions." + removed)
    else:
        st.error(f"The rebuild failed: {plain(job.error or '')}")
    for title, items in (("Skipped files", job.skipped), ("Bad caption rows", job.bad_caption_rows)):
        if items:
            st.markdown(f"**{title}: {len(items)}**")
            st.dataframe([{"file": i.path, "reason": i.reason} for i in items], width="stretch",
                         hide_index=True)
    if job.state == "done" and not job.skipped:
        st.caption("No files were skipped.")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


# -- page ---------------------------------------------------------------------------------------

def sidebar(api: SearchClient) -> tuple[str, tuple[str, str | None]]:
    """Navigation and the service's status, kept current; returns (view, status) (see service_status)."""
    # The view switcher sits on top of the page, not in the sidebar: on a phone the sidebar folds away
    # behind an unlabelled "»", and it stayed over the content after a view was picked (issue 20 item 12).
    view = st.radio("View", VIEWS, key="view", horizontal=True, label_visibility="collapsed")
    with st.sidebar:
        st.title("crossmodal")
        status = _status(api)
        service_status(api, status)
        return view, status


def _status(api: SearchClient) -> tuple[str, str | None]:
    """("ready", None), ("loading", why: loading, or no index yet) or ("down", message)."""
    try:
        ready = api.ready()
    except ServiceDown as err:
        return "down", str(err)
    return ("ready", None) if ready.ready else ("loading", ready.reason or "")


@st.fragment(run_every=3.0)
def service_status(api: SearchClient, drawn: tuple[str, str | None]) -> None:
    """The status, re-checked every 3 s: when it changes (the service went down, came back, finished
    loading), the whole page is drawn again, so it never says "ready" about a service that is gone and
    recovers by itself (issue 20 item 8)."""
    if _status(api) != drawn:
        st.rerun()
    state, detail = drawn
    if state == "ready":
        st.success("Service ready")
    elif state == "loading":
        st.warning(f"Service not ready: {plain(detail or '')}")
    else:
        st.error(f"{detail} This page reconnects by itself.")
        st.button("Try again now", key="retry")
    st.caption(f"API `{api.api_url}`")


def main() -> None:
    st.set_page_config(page_title="crossmodal search", page_icon="🔎", layout="wide")
    st.html(STYLE)
    view_state.restore(VIEWS)  # from the URL on a first visit, else as the controls left it
    api = client()
    view, (status, reason) = sidebar(api)
    if view == VIEWS[2]:
        index_view(api, status)
    elif status == "down":
        st.info("Search is unavailable while the service cannot be reached (see the sidebar); your query and "
                "results come back when it does.")
    elif status == "loading":
        st.info("Search is unavailable until the service is ready (see the sidebar)."
                + (" The Index view can build the first index." if "no index" in (reason or "") else ""))
    elif view == VIEWS[0]:
        text_view(api)
    else:
        image_view(api)
    view_state.publish(VIEWS)


main()
