"""Several folders per index (issue 20 item 5): add one, remove one, read one again; the others keep
their photos. Real builds over real files, the real service over HTTP."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.folders import Change
from crossmodal.indexer.store import Store
from crossmodal.search.engine import SearchEngine
from crossmodal.search.options import SearchOptions
from crossmodal.search.service import create_app
from tests.conftest import BOTH_DATABASES, solid_image

DATABASES = BOTH_DATABASES


@pytest.fixture
def phone(tmp_path, collection) -> Path:
    """A second folder holding a copy of cat.jpg at the same path, a photo of its own, and its own captions."""
    folder = tmp_path / "phone"
    folder.mkdir()
    shutil.copy(collection / "cat.jpg", folder / "cat.jpg")
    solid_image((250, 240, 20), size=(80, 60)).save(folder / "sunflower.png")
    (folder / "captions.tsv").write_text("image\tcaption\ncat.jpg\tmy neighbour's cat on the sofa\n")
    return folder


def served(settings, encoder) -> SearchEngine:
    return SearchEngine(settings, encoder=encoder)


def test_a_second_folder_is_added_without_reading_the_first(indexed, encoder, collection, phone):
    builder = IndexBuilder(indexed, encoder=encoder)
    (collection / "coffee.jpg").write_bytes(b"not an image any more")  # would be skipped if the folder were read
    current = [collection.resolve()]
    report = builder.build(Change.add(current, phone))
    assert report.n_images == 20 and report.n_embedded == 1 and report.n_removed == 0  # only the sunflower is new
    assert not report.skipped  # coffee.jpg's folder was not read
    assert report.n_captions == 23  # 22 of the first folder, kept; 1 of the phone's

    engine = served(indexed, encoder)
    paths = {h.path for h in engine.images_by_text("a cat", k=20)}
    assert {"collection/cat.jpg", "phone/cat.jpg", "phone/sunflower.png", "collection/generated/red.png"} <= paths
    cats = {h.path: h for h in engine.images_by_text("a cat", k=20) if h.path.endswith("cat.jpg")}
    assert cats["phone/cat.jpg"].captions == ["my neighbour's cat on the sofa"]  # each folder's captions its own
    assert "an orange tabby cat looking to the side" in cats["collection/cat.jpg"].captions
    only_phone = engine.images_by_text("a cat", k=20, options=SearchOptions(folder="phone"))
    assert sorted(h.path for h in only_phone) == ["phone/cat.jpg", "phone/sunflower.png"]
    assert {f["name"]: (f["images"], f["captions"]) for f in engine.folders()} == {
        "collection": (18, 22), "phone": (2, 1)}
    for hit in engine.images_by_text("a cat", k=20):  # every file is served from its own folder
        folder, path = engine.image_file(hit.id)
        assert path.is_file() and path.parent.resolve().is_relative_to(folder)
        with engine.open_image_file(hit.id) as handle:
            assert handle.read() == path.read_bytes()


def test_removing_a_folder_drops_its_photos_and_rescanning_reads_only_it(indexed, encoder, collection, phone):
    builder = IndexBuilder(indexed, encoder=encoder)
    current = [collection.resolve()]
    builder.build(Change.add(current, phone))
    current.append(phone.resolve())

    solid_image((10, 200, 90), size=(70, 50)).save(phone / "leaf.png")
    (phone / "sunflower.png").unlink()
    solid_image((90, 10, 200)).save(collection / "unseen.png")  # not read: only the phone is rescanned
    report = builder.build(Change.rescan_one(current, phone.resolve()))
    assert report.n_images == 20 and report.n_removed == 1 and report.n_embedded == 1
    paths = {h.path for h in served(indexed, encoder).images_by_text("a leaf", k=30)}
    assert "phone/leaf.png" in paths and "phone/sunflower.png" not in paths and "collection/unseen.png" not in paths

    report = builder.build(Change.remove(current, collection.resolve()))
    assert report.n_images == 2 and report.n_removed == 18 and report.n_captions == 1
    store = Store(indexed.resolved_database_url())
    assert [f.name for f in store.folders()] == ["phone"]
    assert len(store.image_keys()) == 2  # the removed folder's rows went with the publish
    engine = served(indexed, encoder)
    assert sorted(h.path for h in engine.images_by_text("a cat", k=10)) == ["cat.jpg", "leaf.png"]  # one folder again
    with pytest.raises(ValueError, match="only folder"):
        Change.remove([phone.resolve()], phone.resolve())


def test_folders_with_the_same_name_get_distinct_names(settings, encoder, tmp_path):
    first, second = tmp_path / "a" / "photos", tmp_path / "b" / "photos"
    for folder, color in ((first, (200, 10, 10)), (second, (10, 10, 200))):
        folder.mkdir(parents=True)
        solid_image(color).save(folder / "one.png")
    IndexBuilder(settings, encoder=encoder).build([first, second])
    engine = served(settings, encoder)
    assert sorted(f["name"] for f in engine.folders()) == ["photos", "photos-2"]
    assert sorted(h.path for h in engine.images_by_text("red", k=5)) == ["photos-2/one.png", "photos/one.png"]


def test_the_api_adds_rescans_and_removes_folders(indexed, encoder, collection, phone):
    with TestClient(create_app(indexed, served(indexed, encoder))) as http:
        assert [f["name"] for f in http.get("/v1/folders").json()] == ["collection"]
        assert http.delete("/v1/folders/999").status_code == 404
        only = http.get("/v1/folders").json()[0]["id"]
        refused = http.delete(f"/v1/folders/{only}")
        assert refused.status_code == 400 and "only folder" in refused.json()["detail"]
        missing = http.post("/v1/folders", json={"path": str(phone / "nope")})
        assert missing.status_code == 400 and "not found" in missing.json()["detail"]

        job = wait(http, http.post("/v1/folders", json={"path": str(phone)}))
        assert job["action"] == "add" and job["images"] == 20 and job["removed"] == 0
        stats = http.get("/v1/stats").json()
        assert {f["name"]: f["images"] for f in stats["folders"]} == {"collection": 18, "phone": 2}
        preview = http.get("/v1/index/preview", params={"collection": str(phone)}).json()
        assert preview["would_remove"] == 18 and len(preview["indexed_from"]) == 2  # the other folder's photos

        phone_id = next(f["id"] for f in stats["folders"] if f["name"] == "phone")
        solid_image((10, 200, 90)).save(phone / "leaf.png")
        (phone / "sunflower.png").rename(phone / "sunflower2.png")
        preview = http.get("/v1/index/preview", params={"collection": str(phone), "action": "rescan"}).json()
        assert (preview["indexed"], preview["found"], preview["would_remove"]) == (2, 3, 1)  # the other folder stays
        job = wait(http, http.post(f"/v1/folders/{phone_id}/rescan"))
        assert job["action"] == "rescan" and job["images"] == 21 and job["removed"] == 1

        job = wait(http, http.delete(f"/v1/folders/{phone_id}"))
        assert job["action"] == "remove" and job["images"] == 18 and job["removed"] == 3
        assert [f["name"] for f in http.get("/v1/folders").json()] == ["collection"]
        hits = http.get("/v1/images/search", params={"q": "a cat", "k": 3}).json()["results"]
        assert hits[0]["path"] == "cat.jpg"  # one folder: paths as they are in it


def wait(http: TestClient, started) -> dict:
    assert started.status_code == 202, started.text
    job_id, deadline = started.json()["id"], time.time() + 120
    while time.time() < deadline:
        job = http.get(f"/v1/index/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            assert job["state"] == "done", job
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")
