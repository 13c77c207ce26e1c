"""The search service over HTTP: every endpoint, every error code, a rebuild job with queries in flight."""
from __future__ import annotations

import io
import os
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import BOTH_DATABASES, solid_image

DATABASES = BOTH_DATABASES  # each test runs on SQLite and on a real PostgreSQL server


@pytest.fixture
def client(indexed, encoder):
    with TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as client:
        yield client


def png_bytes(color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    solid_image(color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_id(client, path: str) -> int:
    results = client.get("/v1/images/search", params={"q": path.split(".")[0], "k": 18}).json()["results"]
    return next(r["id"] for r in results if r["path"] == path)


def test_health_ready_stats(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "reason": None}
    stats = client.get("/v1/stats").json()
    assert stats["images"] == 18 and stats["captions"] == 22 and stats["model"] == "crossmodal-lite-4"
    assert stats["dim"] == 896 and stats["image_index_type"] == "Flat" and stats["build_id"] >= 1
    assert client.get("/docs").status_code == 200 and "/v1/images/search" in client.get("/openapi.json").text


def test_requests_run_on_a_pool_of_cores_plus_one_threads(indexed, encoder):
    """Searches are CPU work: anyio's 40 threads only fought over the cores (search/service.py)."""
    from anyio import to_thread

    for threads, expected in ((0, (os.cpu_count() or 1) + 1), (2, 2)):
        settings = indexed.model_copy(update={"request_threads": threads})
        with TestClient(create_app(settings, SearchEngine(settings, encoder=encoder))) as client:
            assert client.portal.call(lambda: to_thread.current_default_thread_limiter().total_tokens) == expected
            assert client.get("/v1/images/search", params={"q": "a cat"}).status_code == 200


def test_text_to_images_with_paging(client):
    body = client.get("/v1/images/search", params={"q": "a man with a camera", "k": 4}).json()
    results = body["results"]
    assert body["took_ms"] > 0 and len(results) == 4 and results[0]["path"] == "camera.png"
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    first = results[0]
    assert first["url"] == f"/v1/images/{first['id']}/file" and first["thumbnail_url"].endswith("/thumbnail")
    assert first["width"] == 512 and first["height"] == 512 and first["captions"]
    page2 = client.get("/v1/images/search", params={"q": "a man with a camera", "k": 2, "offset": 2}).json()["results"]
    assert [r["id"] for r in page2] == [r["id"] for r in results[2:4]]


def test_image_to_images_and_similar(client, collection):
    files = {"file": ("q.jpg", (collection / "coffee.jpg").read_bytes(), "image/jpeg")}
    results = client.post("/v1/images/search", files=files, params={"k": 3}).json()["results"]
    assert results[0]["path"] == "coffee.jpg" and results[0]["score"] > 0.99
    similar = client.get(f"/v1/images/{results[0]['id']}/similar", params={"k": 5}).json()["results"]
    assert len(similar) == 5 and results[0]["id"] not in {r["id"] for r in similar}


def test_captions_by_text_and_by_image(client, collection):
    by_text = client.get("/v1/captions/search", params={"q": "a red coffee cup", "k": 2}).json()["results"]
    assert by_text[0]["image_path"] == "coffee.jpg"
    assert set(by_text[0]) == {"id", "score", "text", "image_id", "image_path", "thumbnail_url"}
    files = {"file": ("x.webp", (collection / "camera.png").read_bytes(), "application/octet-stream")}
    by_image = client.post("/v1/captions/search", files=files, params={"k": 2}).json()["results"]
    assert by_image[0]["image_path"] == "camera.png" and len(by_image) == 2


def test_image_detail_file_and_cached_thumbnail(client, collection):
    cat = image_id(client, "cat.jpg")
    detail = client.get(f"/v1/images/{cat}").json()
    assert detail["path"] == "cat.jpg" and len(detail["captions"]) == 2
    file = client.get(f"/v1/images/{cat}/file")
    assert file.headers["content-type"] == "image/jpeg" and file.content == (collection / "cat.jpg").read_bytes()
    rocket = client.get(f"/v1/images/{image_id(client, 'rocket.webp')}/file")
    assert rocket.headers["content-type"] == "image/webp"
    thumb = client.get(f"/v1/images/{cat}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg" and "max-age" in thumb.headers["cache-control"]
    from PIL import Image
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 256
    again = client.get(f"/v1/images/{cat}/thumbnail", headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize("params, fragment", [
    ({"q": ""}, "empty"), ({"q": "   "}, "empty"), ({"q": "x" * 501}, "at most 500"),
    ({"q": "a\x00b"}, "control characters"), ({"q": "cat", "k": 0}, "greater than or equal to 1"),
    ({"q": "cat", "k": 101}, "k must be at most 100"),
    ({"q": "cat", "offset": 1001}, "offset must be at most 1000"), ({"q": "cat", "offset": -1}, "greater than"),
    ({"q": "cat", "k": "many"}, "valid integer"), ({}, "Field required"),
])
def test_bad_query_parameters_are_422_with_reason(client, params, fragment):
    for path in ("/v1/images/search", "/v1/captions/search"):
        response = client.get(path, params=params)
        assert response.status_code == 422 and fragment in response.text, response.text


def test_unknown_ids_and_jobs_are_404(client):
    for path in ("/v1/images/999999", "/v1/images/999999/file", "/v1/images/999999/thumbnail",
                 "/v1/images/999999/similar", "/v1/index/jobs/nope"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["detail"], path


def test_bad_uploads_are_415_or_413(indexed, encoder):
    small = indexed.model_copy(update={"max_upload_bytes": 2000, "max_image_pixels": 5000})
    with TestClient(create_app(small, SearchEngine(small, encoder=encoder))) as client:
        text_file = {"file": ("cat.jpg", b"definitely not an image", "image/jpeg")}
        assert client.post("/v1/images/search", files=text_file).status_code == 415
        big = {"file": ("big.bin", b"\0" * 5000, "image/png")}
        response = client.post("/v1/captions/search", files=big)
        assert response.status_code == 413 and "limit" in response.json()["detail"]
        from PIL import Image
        buffer = io.BytesIO()
        Image.new("L", (100, 100)).save(buffer, format="PNG")  # tiny file, 10,000 pixels
        assert client.post("/v1/images/search", files={"file": ("p.png", buffer.getvalue())}).status_code == 413
        assert client.post("/v1/images/search").status_code == 422  # no file at all


def test_not_ready_without_an_index(settings, encoder):
    with TestClient(create_app(settings, SearchEngine(settings, encoder=encoder))) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and "no index" in ready.json()["reason"]
        assert client.get("/v1/images/search", params={"q": "cat"}).status_code == 503


def test_rebuild_job_swaps_index_while_queries_keep_succeeding(live_server, collection, tmp_path):
    for i in range(6):
        solid_image((40 * i, 255 - 40 * i, 90)).save(collection / f"extra{i}.png")
    (collection / "cat.jpg").unlink()
    failures, latencies, stop = [], [], threading.Event()

    def query_loop():
        with httpx.Client(base_url=live_server, timeout=30) as http:
            while not stop.is_set():
                start = time.perf_counter()
                response = http.get("/v1/images/search", params={"q": "a photo of an animal", "k": 5})
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200 or not response.json()["results"]:
                    failures.append(response.status_code)

    clients = [threading.Thread(target=query_loop) for _ in range(3)]
    for t in clients:
        t.start()
    with httpx.Client(base_url=live_server, timeout=30) as http:
        job = http.post("/v1/index/jobs", json={"collection": str(collection)})
        assert job.status_code == 202 and job.json()["state"] in ("queued", "running")
        second = http.post("/v1/index/jobs", json={"collection": str(collection)})
        assert second.status_code == 409
        seen = []
        deadline = time.time() + 300
        while time.time() < deadline:
            state = http.get(f"/v1/index/jobs/{job.json()['id']}").json()
            if state["progress"]:
                seen.append((state["progress"]["phase"], state["progress"]["done"], state["progress"]["total"]))
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.05)
        stop.set()
        for t in clients:
            t.join()
        assert state["state"] == "done", state
        assert state["images"] == 23 and state["skipped"] == []
        assert ("images", 6, 6) in seen or any(p == "images" and t == 6 for p, _, t in seen)
        assert not failures and len(latencies) > 3
        stats = http.get("/v1/stats").json()
        assert stats["build_id"] == state["build_id"] and stats["images"] == 23
        top = http.get("/v1/images/search", params={"q": "a cat", "k": 23}).json()["results"]
        assert "cat.jpg" not in {r["path"] for r in top}
        bad = http.post("/v1/index/jobs", json={"collection": str(tmp_path / "missing")})
        assert bad.status_code == 400 and "not found" in bad.json()["detail"]
