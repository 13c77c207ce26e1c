"""Rebuild jobs live in the database: any service sharing it reports them, a dead one's jobs fail."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from fastapi.testclient import TestClient

from crossmodal.indexer.store import JobRow, Store
from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import BOTH_DATABASES, solid_image

DATABASES = BOTH_DATABASES


def test_a_job_started_on_one_service_is_followed_on_another(indexed, encoder, collection):
    for i in range(4):
        solid_image((60 * i, 20, 200 - 40 * i)).save(collection / f"new{i}.png")
    with TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as first, \
            TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as second:
        job = first.post("/v1/index/jobs", json={"collection": str(collection)}).json()
        assert second.post("/v1/index/jobs", json={"collection": str(collection)}).status_code == 409
        phases, deadline = set(), time.time() + 120
        while time.time() < deadline:
            seen = second.get(f"/v1/index/jobs/{job['id']}").json()
            if seen["progress"]:
                phases.add(seen["progress"]["phase"])
            if seen["state"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert seen["state"] == "done", seen
        assert seen["images"] == 22 and seen["build_id"] == job_build(indexed) and "images" in phases
        assert [j["id"] for j in second.get("/v1/index/jobs").json()] == [job["id"]]
        assert seen["created_at"].endswith(("Z", "+00:00"))


def job_build(settings) -> int:
    return Store(settings.resolved_database_url()).published_build().id


def test_a_job_whose_service_died_is_reported_failed_and_blocks_nothing(indexed, encoder, collection):
    store = Store(indexed.resolved_database_url())
    long_ago = datetime.now(timezone.utc) - timedelta(minutes=10)
    store.add_job(JobRow(id="orphan", state="running", collection=str(collection), created_at=long_ago,
                         updated_at=long_ago), stale_before=long_ago)
    with TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as client:
        orphan = client.get("/v1/index/jobs/orphan").json()
        assert orphan["state"] == "failed" and "stopped" in orphan["error"]
        started = client.post("/v1/index/jobs", json={"collection": str(collection)})
        assert started.status_code == 202, started.text
        client.app.state.service.jobs.wait(120)
        assert client.get(f"/v1/index/jobs/{started.json()['id']}").json()["state"] == "done"
        assert store.job("orphan").state == "failed"  # marked so in the database, once a new job came


def test_a_rebuild_preview_counts_the_photos_it_would_remove(indexed, encoder, collection, tmp_path):
    (collection / "cat.jpg").unlink()
    (collection / "generated" / "red.png").rename(collection / "generated" / "red2.png")  # moved: gone at its path
    with TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as client:
        preview = client.get("/v1/index/preview", params={"collection": str(collection)}).json()
        assert preview == {"collection": str(collection.resolve()), "indexed_from": [str(collection.resolve())],
                           "indexed": 18, "found": 17, "would_remove": 2}
        (tmp_path / "empty").mkdir()
        elsewhere = client.get("/v1/index/preview", params={"collection": str(tmp_path / "empty")}).json()
        assert elsewhere["would_remove"] == 18 and elsewhere["found"] == 0
        assert client.get("/v1/index/preview", params={"collection": str(tmp_path / "no")}).status_code == 400
        job = client.post("/v1/index/jobs", json={"collection": str(collection)}).json()
        deadline = time.time() + 120
        while (seen := client.get(f"/v1/index/jobs/{job['id']}").json())["state"] not in ("done", "failed") \
                and time.time() < deadline:
            time.sleep(0.05)
        assert seen["state"] == "done" and seen["removed"] == 2 and seen["images"] == 17
