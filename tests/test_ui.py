"""The Streamlit app's logic (streamlit.testing AppTest) against a real search service over HTTP."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from crossmodal.ui.settings import get_ui_settings
from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import free_port, serving, solid_image

APP = Path(__file__).resolve().parents[1] / "ui" / "app.py"


@pytest.fixture
def app_for(monkeypatch):
    """An AppTest of the real app file, configured (as `crossmodal ui` does) through CROSSMODAL_API_URL."""
    def make(api_url: str) -> AppTest:
        monkeypatch.setenv("CROSSMODAL_API_URL", api_url)
        get_ui_settings.cache_clear()
        return AppTest.from_file(str(APP), default_timeout=60)

    yield make
    get_ui_settings.cache_clear()


def shown(markdown: str) -> str:
    """Markdown source as the reader sees it: the app escapes every special character of its data."""
    return re.sub(r"\\(.)", r"\1", markdown)


def texts(elements) -> str:
    return "\n".join(shown(str(e.value)) for e in elements)


def test_text_search_grid_open_similar_and_more(app_for, live_server):
    at = app_for(live_server).run()
    assert not at.exception and "Service ready" in texts(at.success)
    assert "Type what you are looking for" in texts(at.info)  # empty state before a query

    at.text_input(key="query").input("a man with a camera").run()
    assert not at.exception and not at.error
    assert "12 images for “a man with a camera”" in texts(at.caption)
    assert len(at.image) == 12 and all(image.value for image in at.image)  # real thumbnails, fetched over HTTP
    first = at.markdown[0].value
    assert "camera.png" in first and float(first.split("**")[1]) > 0

    camera_id = next(int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-"))
    at.button(key=f"text-open-{camera_id}").click().run()
    assert shown(at.subheader[0].value) == "camera.png"  # the opened result, large, with its captions
    assert any("photographer" in m.value for m in at.markdown)

    at.button(key="detail-similar").click().run()  # closes the opened result, lists its neighbours
    assert [shown(s.value) for s in at.subheader] == ["Images similar to camera.png"]
    similar_keys = [b.key for b in at.button if b.key and b.key.startswith("similar-open-")]
    assert len(similar_keys) == 12 and f"similar-open-{camera_id}" not in similar_keys
    assert at.query_params["similar"] == str(camera_id) and "open" not in at.query_params

    at.button(key="similar-back").click().run()
    at.selectbox(key="page_size").set_value(8).run()
    assert "8 images for" in texts(at.caption)
    at.button(key="more").click().run()
    assert "16 images for" in texts(at.caption)
    assert "more" in {b.key for b in at.button}  # 18 indexed: the third page is still there
    at.button(key="more").click().run()
    assert "18 images for" in texts(at.caption) and "more" not in {b.key for b in at.button}


def test_more_like_this_refines_the_query_and_an_expression_works(app_for, live_server):
    at = app_for(live_server).run()
    assert "beach +2:sunset -people" in texts(at.caption)  # the syntax hint under the query box
    at.text_input(key="query").input("a photo").run()
    at.selectbox(key="page_size").set_value(24).run()
    order = [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-")]
    assert len(order) == 18
    at.button(key=f"text-morelike-{order[-1]}").click().run()
    assert not at.exception and not at.error
    assert "refined: more like 1, less like 0" in texts(at.caption)
    refined = [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-")]
    assert sorted(refined) == sorted(order) and refined.index(order[-1]) < len(order) - 1  # it came up
    at.button(key=f"text-lesslike-{order[-1]}").click().run()  # moves it to the other side
    assert "refined: more like 0, less like 1" in texts(at.caption)
    at.button(key="feedback-clear").click().run()
    assert "refined" not in texts(at.caption)
    assert [int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-")] == order

    at.text_input(key="query").input("a cup +2:coffee -red").run()
    assert not at.exception and not at.error and "images for “a cup +2:coffee -red”" in texts(at.caption)
    assert "refined" not in texts(at.caption)  # a new query starts unrefined
    at.text_input(key="query").input("a cup +11:coffee").run()
    assert "at most 10" in texts(at.error)  # the service's 422, as a message
    at.text_input(key="query").input("a horse " * 75).run()  # 600 characters
    assert "the query must be at most 500 characters long" in texts(at.error)  # said plainly


def test_sidebar_filters_sort_and_mode_narrow_the_results(app_for, live_server):
    at = app_for(live_server).run()
    assert at.selectbox(key="filter_folder").options == ["All folders", "generated"]  # from /v1/facets
    at.text_input(key="query").input("a red square").run()
    assert "12 images for" in texts(at.caption)
    at.selectbox(key="filter_folder").set_value("generated").run()
    at.selectbox(key="sort").set_value("date_desc").run()
    assert not at.exception and not at.error
    assert "2 images for “a red square”" in texts(at.caption)
    paths = [shown(m.value) for m in at.markdown if "generated/" in shown(m.value)]
    assert len(paths) == 2 and "generated/blue.jpg" in paths[0]  # written after red.png: newest first
    assert sum("taken " in shown(c.value) and "(file date)" in shown(c.value) for c in at.caption) == 2
    at.selectbox(key="filter_captions").set_value("With captions").run()
    assert "with these filters: widen them" in texts(at.warning)  # nothing generated has captions
    at.selectbox(key="filter_folder").set_value("Any").run()
    at.selectbox(key="sort").set_value("relevance").run()
    at.selectbox(key="mode").set_value("keyword").run()
    at.text_input(key="query").input("tabby").run()
    assert "1 images for “tabby”" in texts(at.caption)  # only the cat's caption has the word


def test_scores_come_with_a_match_bar_and_weak_matches_are_said_so(app_for, live_server):
    """Issue 20 item 9: raw scores (0.148 down to -0.030) meant nothing, and nonsense looked as confident."""
    stats = httpx.get(f"{live_server}/v1/stats").json()
    weak, typical = stats["weak_below_score"], stats["typical_best_score"]
    assert weak < typical
    at = app_for(live_server).run()
    at.text_input(key="query").input("a man with a camera").run()
    best = httpx.get(f"{live_server}/v1/images/search", params={"q": "a man with a camera", "k": 1}).json()
    assert best["results"][0]["score"] > typical
    assert at.get("progress")[0].proto.text == f"strong match · score {best['results'][0]['score']:.3f}"
    assert not at.warning


def test_a_query_whose_best_match_is_weak_is_told_so(app_for, indexed, encoder):
    """A collection whose typical queries score far higher than this one's best: the cue shows. (The sample
    collection's own scale is too low for any query to fall under it, so the build's scale is raised.)"""
    build_dir = next((indexed.index_dir / "builds").iterdir())
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["score_scale"] = {"typical_best": 0.6, "weak_below": 0.5}
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    with serving(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as base:
        at = app_for(base).run()
        at.text_input(key="query").input("a man with a camera").run()
        assert "Weak matches: even the best result scores" in texts(at.warning)
        assert all(p.proto.text.startswith("weak match") for p in at.get("progress"))
        at.selectbox(key="mode").set_value("hybrid").run()  # fused scores are not on that scale: no cue
        assert not at.warning


def test_the_view_state_lives_in_the_url_and_survives_switching_views(app_for, live_server):
    """Issue 20, items 2 and 4: switching views kept nothing; Open in the image view did nothing visible."""
    at = app_for(live_server).run()
    at.text_input(key="query").input("a horse").run()
    at.selectbox(key="sort").set_value("date_desc").run()
    assert at.query_params["q"] == "a horse" and at.query_params["sort"] == "date_desc"
    before = [b.key for b in at.button if b.key and b.key.startswith("text-open-")]
    at.radio(key="view").set_value("Index").run()
    assert at.query_params["view"] == "index" and at.query_params["q"] == "a horse"
    at.radio(key="view").set_value("Text → images").run()
    assert at.text_input(key="query").value == "a horse" and at.selectbox(key="sort").value == "date_desc"
    assert [b.key for b in at.button if b.key and b.key.startswith("text-open-")] == before  # results kept

    # A bookmarked URL opens the same view: query, order, page size and the opened result.
    horse = next(r["id"] for r in httpx.get(f"{live_server}/v1/images/search", params={"q": "a horse", "k": 18})
                 .json()["results"] if r["path"] == "horse.png")
    again = app_for(live_server)
    again.query_params.update({"q": "a horse", "k": "8", "open": str(horse), "sort": "date_desc", "bogus": "1"})
    again.run()
    assert not again.exception and again.text_input(key="query").value == "a horse"
    assert again.selectbox(key="page_size").value == 8 and again.selectbox(key="sort").value == "date_desc"
    assert "8 images for “a horse”" in texts(again.caption) and "horse.png" in shown(again.subheader[0].value)
    again.button(key="detail-close").click().run()
    assert "open" not in again.query_params and "detail-close" not in {b.key for b in again.button}

    # Open on a result of the Image → captions view shows it, in the text view.
    again.button(key=f"text-open-{horse}").click().run()
    again.button(key="detail-describe").click().run()
    assert again.radio(key="view").value == "Image → captions" and again.query_params["describe"] == str(horse)
    opened = next(b.key for b in again.button if b.key and b.key.startswith("image-open-"))
    again.button(key=opened).click().run()
    assert again.radio(key="view").value == "Text → images"
    assert again.subheader and shown(again.subheader[0].value).endswith((".png", ".jpg", ".webp"))  # the dialog


def test_a_new_query_leaves_similar_results_and_the_opened_result(app_for, live_server):
    """Issue 20, items 1 and 3: typing a new query while "Similar" results or an opened result are
    showing shows the new query's results, not the old state."""
    at = app_for(live_server).run()
    at.text_input(key="query").input("a man with a camera").run()
    first = next(int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-"))
    at.button(key=f"text-open-{first}").click().run()
    at.button(key="detail-similar").click().run()
    assert any("Images similar to" in s.value for s in at.subheader)
    at.text_input(key="query").input("a horse").run()
    assert not at.exception and not at.error
    assert not any("Images similar to" in s.value for s in at.subheader)  # the Similar list is gone
    assert "detail-close" not in {b.key for b in at.button}  # and so is the opened result
    assert "images for “a horse”" in texts(at.caption)


def test_upload_an_image_to_get_its_captions_and_similar_images(app_for, live_server, collection, monkeypatch):
    at = app_for(live_server).run()
    at.radio(key="view").set_value("Image → captions").run()
    assert "Upload a photo" in texts(at.info)
    at.file_uploader(key="upload").set_value(("camera.png", (collection / "camera.png").read_bytes(),
                                              "image/png")).run()
    assert not at.exception and not at.error
    ranked = [shown(m.value) for m in at.markdown if shown(m.value).startswith(("1. ", "2. "))]
    assert "camera" in ranked[0]
    assert "camera.png" in texts(at.caption)
    assert "Most similar images" in [s.value for s in at.subheader]
    assert any("camera.png" in m.value and m.value.startswith("**1.0") for m in at.markdown)  # itself, score 1.0
    assert "Captions that describe it" in [s.value for s in at.subheader]
    assert "This photo is in your collection" in texts(at.caption)
    requests = []
    original = httpx.Client.request
    monkeypatch.setattr(httpx.Client, "request", lambda self, *a, **kw: requests.append(a) or original(self, *a, **kw))
    at.button(key=next(b.key for b in at.button if b.key and b.key.startswith("image-similar-"))).click().run()
    assert not [r for r in requests if r[0] == "POST"]  # the upload is not sent again (issue 20 item 2)
    assert at.radio(key="view").value == "Text → images"  # Similar shows its list, in the text view
    at.radio(key="view").set_value("Image → captions").run()

    # A photo from elsewhere: the captions are other photos', said so, one thumbnail per photo.
    buffer = io.BytesIO()
    solid_image((250, 250, 240), (120, 90)).save(buffer, format="PNG")
    at.file_uploader(key="upload").set_value(("white.png", buffer.getvalue(), "image/png")).run()
    assert "Captions of similar photos in your collection" in [s.value for s in at.subheader]
    ranked = [shown(m.value) for m in at.markdown if re.match(r"\d+\. ", shown(m.value))]
    assert len(ranked) == 12  # the page size
    photos = [c for c in texts(at.caption).splitlines() if c.startswith("image ")]
    assert len(photos) == len(set(photos)) and len(photos) < 12  # grouped: each photo once


def test_rejected_upload_is_a_message_not_a_traceback(app_for, live_server):
    at = app_for(live_server).run()
    at.radio(key="view").set_value("Image → captions").run()
    at.file_uploader(key="upload").set_value(("fake.png", b"this is text, not a png", "image/png")).run()
    assert not at.exception
    assert "refused" in texts(at.error) and "not a usable image" in texts(at.error)


def test_describe_an_indexed_image_from_its_result(app_for, live_server):
    at = app_for(live_server).run()
    at.text_input(key="query").input("a horse").run()
    horse_id = next(int(b.key.rsplit("-", 1)[1]) for b in at.button if b.key and b.key.startswith("text-open-"))
    at.button(key=f"text-open-{horse_id}").click().run()
    at.button(key="detail-describe").click().run()
    assert at.radio(key="view").value == "Image → captions" and at.header[0].value == "Find captions for an image"
    first = next(shown(m.value) for m in at.markdown if shown(m.value).startswith("1. "))
    assert "horse" in first


def test_index_view_rebuild_shows_progress_then_skipped_files(app_for, live_server, collection):
    for i in range(80):  # enough work that the job is surely still running for the 409 and the progress bar
        solid_image((3 * i, 200 - 2 * i, 40 + 2 * i), size=(224, 200)).save(collection / f"new{i:02d}.png")
    (collection / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    at = app_for(live_server).run()
    at.radio(key="view").set_value("Index").run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "18" and metrics["Captions"] == "22"
    assert at.text_input(key="rebuild_collection").value == str(collection.resolve())

    at.button[-1].click().run()  # the form's "Rebuild index"
    assert not at.exception and not at.error
    with httpx.Client(base_url=live_server) as http:  # a second rebuild while the first runs: 409, shown as such
        assert http.post("/v1/index/jobs", json={"collection": str(collection)}).status_code == 409
    saw_progress, deadline = False, time.time() + 180
    while time.time() < deadline and not at.success[1:]:
        saw_progress |= bool(at.progress)
        time.sleep(0.3)
        at.run()
    assert saw_progress, "no progress bar while the rebuild ran"
    assert "published: 98 images, 22 captions" in texts(at.success)
    assert {m.label: m.value for m in at.metric}["Images"] == "98"  # stats reloaded after the swap
    skipped = at.dataframe[0].value
    assert list(skipped["file"]) == ["broken.jpg"] and "corrupt" in skipped["reason"][0]


def test_a_rebuild_that_would_remove_photos_says_how_many_and_asks(app_for, live_server, tmp_path):
    """Issue 20 item 5: a rebuild over another folder replaced 300 photos with 50, without a word."""
    other = folder_of_photos(tmp_path / "other", 2)
    at = app_for(live_server).run()
    at.radio(key="view").set_value("Index").run()
    at.text_input(key="rebuild_collection").set_value(str(other))  # a form: its values go with the submit
    at.button(key="FormSubmitter:rebuild-Rebuild index").click().run()
    assert not at.error, texts(at.error)
    assert "would remove **18 of the 18 indexed photos**" in texts(at.warning) and "2 image files" in texts(at.warning)
    assert "Rebuild and remove 18 photos" in [b.label for b in at.button]
    with httpx.Client(base_url=live_server) as http:
        assert http.get("/v1/index/jobs").json() == []  # nothing started before the answer
    at.button(key="rebuild-cancel").click().run()
    assert not at.warning and "rebuild-confirm" not in {b.key for b in at.button}

    at.text_input(key="rebuild_collection").set_value(str(other))
    at.button(key="FormSubmitter:rebuild-Rebuild index").click().run()
    at.button(key="rebuild-confirm").click().run()
    finish(at)
    assert "published: 2 images, 0 captions. 18 photos no longer in the folder were removed." in texts(at.success)


def test_the_index_view_adds_lists_and_removes_folders(app_for, live_server, tmp_path):
    """Issue 20 item 5: several folders per index; each listed with its counts, removed only after a yes."""
    phone = folder_of_photos(tmp_path / "phone", 3)
    at = app_for(live_server).run()
    at.radio(key="view").set_value("Index").run()
    assert "18 photos · 22 captions" in texts(at.markdown)
    assert at.button(key="folder-remove-1").proto.disabled  # the only folder: rebuild elsewhere instead

    at.text_input(key="add_folder_path").set_value(str(phone))
    at.button(key="FormSubmitter:add-folder-Add folder").click().run()
    assert not at.error, texts(at.error)
    finish(at)
    assert "published: 21 images, 22 captions" in texts(at.success)
    assert {m.label: m.value for m in at.metric}["Images"] == "21"
    listed = texts(at.markdown)
    assert "**phone**" in listed and "3 photos · 0 captions" in listed and "18 photos · 22 captions" in listed

    phone_id = next(int(b.key.rsplit("-", 1)[1]) for b in at.button
                    if b.key and b.key.startswith("folder-remove-") and b.key != "folder-remove-1")
    (phone / "p0.png").unlink()  # a rescan that would remove a photo says so first, too
    at.button(key=f"folder-rescan-{phone_id}").click().run()
    assert "would remove **1 of its 3 photos**" in texts(at.warning)
    at.button(key="folder-confirm").click().run()
    finish(at)
    assert "published: 20 images, 22 captions. 1 photo no longer in the folder was removed." in texts(at.success)

    at.button(key=f"folder-remove-{phone_id}").click().run()
    assert "Its **2 photos** and 0 captions leave the index" in texts(at.warning)
    with httpx.Client(base_url=live_server) as http:  # nothing started before the yes
        assert [j["action"] for j in http.get("/v1/index/jobs").json()] == ["rescan", "add"]
    at.button(key="folder-confirm").click().run()
    finish(at)
    assert "2 photos of the removed folder left the index" in texts(at.success)
    assert "**phone**" not in texts(at.markdown)


def folder_of_photos(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        solid_image((80 * i, 200, 60), size=(90, 60)).save(folder / f"p{i}.png")
    return folder


def finish(at: AppTest, seconds: float = 120) -> None:
    """Run the app until the job it follows has finished (a success or an error below the stats)."""
    deadline = time.time() + seconds
    while time.time() < deadline and not at.success[1:] and not at.error:
        time.sleep(0.3)
        at.run()


def test_the_rebuild_button_is_disabled_while_a_rebuild_runs(app_for, live_server, collection):
    """Issue 20 item 11: "Rebuild index" stayed clickable during a run (a second click got a 409, explained)."""
    for i in range(80):  # enough work that the job is surely still running while the app is driven
        solid_image((3 * i, 100, 250 - 3 * i), size=(224, 224)).save(collection / f"more{i:02d}.png")
    with httpx.Client(base_url=live_server) as http:
        job = http.post("/v1/index/jobs", json={"collection": str(collection)}).json()
        at = app_for(live_server).run()
        at.radio(key="view").set_value("Index").run()
        assert f"Rebuild {job['id']}" in texts(at.subheader)  # the running job is found and followed
        submit = at.button(key="FormSubmitter:rebuild-Rebuild index")
        assert submit.proto.disabled and "A rebuild is running" in submit.proto.help
        deadline = time.time() + 180
        while http.get(f"/v1/index/jobs/{job['id']}").json()["state"] == "running" and time.time() < deadline:
            time.sleep(0.5)


def test_rebuilds_from_the_ui_need_the_token_its_user_types(app_for, indexed, encoder, collection, monkeypatch):
    """The UI holds no admin token: one in its environment is never sent for a user."""
    guarded = indexed.model_copy(update={"admin_token": "t0ken-for-admins"})
    auth = {"Authorization": "Bearer t0ken-for-admins"}
    with serving(create_app(guarded, SearchEngine(guarded, encoder=encoder))) as base:
        monkeypatch.setenv("CROSSMODAL_ADMIN_TOKEN", "t0ken-for-admins")
        at = app_for(base).run()
        at.radio(key="view").set_value("Index").run()
        at.button[-1].click().run()  # "Rebuild index" with no token typed
        assert not at.exception and "needs its admin token" in texts(at.error)
        assert httpx.get(f"{base}/v1/index/jobs", headers=auth).json() == []

        at.text_input(key="admin_token").input("t0ken-for-admins")
        at.button[-1].click().run()
        assert not at.exception and not at.error
        jobs = httpx.get(f"{base}/v1/index/jobs", headers=auth).json()
        assert len(jobs) == 1
        deadline = time.time() + 120
        while httpx.get(f"{base}/v1/index/jobs/{jobs[0]['id']}", headers=auth).json()["state"] in (
                "queued", "running") and time.time() < deadline:
            time.sleep(0.3)


def test_every_markdown_character_of_data_is_escaped_and_nothing_is_lost():
    from crossmodal.ui.app import plain

    hostile = "![x](http://127.0.0.1:9/pixel.png) $x^2$ :red[alarm] **bold** <b>tag</b> `tick`"
    escaped = plain(hostile)
    assert all(f"\\{ch}" in escaped for ch in "![]()$:*<>`")
    assert escaped.replace("\\", "") == hostile  # nothing lost: Markdown drops the backslashes


def test_service_down_or_without_index_is_explained(app_for, settings):
    at = app_for(f"http://127.0.0.1:{free_port()}").run()
    assert not at.exception
    assert "not reachable" in texts(at.error) and "crossmodal serve" in texts(at.error)
    assert "Search is unavailable" in texts(at.info)
    at.radio(key="view").set_value("Index").run()
    assert not at.exception and "not reachable" in texts(at.error)


FORBIDDEN_IN_THE_UI = ("torch", "open_clip", "faiss", "crossmodal.indexer", "crossmodal.search.engine")


def test_the_ui_never_loads_the_model_or_an_index(tmp_path):
    """The UI process imports neither torch, open_clip, faiss nor the indexer: it only speaks HTTP."""
    script = (
        "import json, sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({str(APP)!r}, default_timeout=60).run()\n"
        "assert not at.exception, at.exception\n"
        f"print(json.dumps([m for m in {FORBIDDEN_IN_THE_UI!r} if m in sys.modules]))\n"
    )
    env = {"CROSSMODAL_API_URL": f"http://127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                            cwd=APP.parents[1])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_validation_errors_are_sentences():
    """Issue 20 item 13: "q: String should have at most 500 characters" became a sentence."""
    from crossmodal.ui.client import _plain_error

    assert _plain_error({"type": "string_too_long", "loc": ["query", "q"], "msg": "String should have at most 500 "
                         "characters", "ctx": {"max_length": 500}}) == "The query is too long: at most 500 characters"
    assert _plain_error({"type": "less_than_equal", "loc": ["query", "k"], "msg": "", "ctx": {"le": 100}}) == \
        "The number of results must be at most 100"
    assert _plain_error({"type": "date_from_datetime_parsing", "loc": ["query", "taken_after"],
                         "msg": "Input should be a valid date"}) == "Taken after: input should be a valid date"
