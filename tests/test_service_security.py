"""Bad requests, upload limits, safe file serving, admin token and CORS, against the real app."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from sqlalchemy import update

from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL
from crossmodal.indexer.store import ImageRow
from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import serving


@pytest.fixture
def small_limits(indexed):
    return indexed.model_copy(update={"max_upload_bytes": 50_000})


@pytest.fixture
def client(small_limits, encoder):
    with TestClient(create_app(small_limits, SearchEngine(small_limits, encoder=encoder))) as client:
        yield client


def image_id(client, path: str) -> int:
    results = client.get("/v1/images/search", params={"q": "a photo", "k": 100}).json()["results"]
    return next(r["id"] for r in results if r["path"] == path)


# -- uploads --------------------------------------------------------------------------------------

def test_oversized_upload_is_refused_while_streaming_not_after(indexed, encoder):
    """A chunked upload with no Content-Length: the 413 arrives while the client is still sending."""
    limits = indexed.model_copy(update={"max_upload_bytes": 100_000})
    answer, sent = b"", 0
    with serving(create_app(limits, SearchEngine(limits, encoder=encoder))) as base:
        port = int(base.rsplit(":", 1)[1])
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"POST /v1/images/search HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                             b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
                head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
                conn.sendall(b"%x\r\n%s\r\n" % (len(head), head))
                sent, chunk = len(head), b"\0" * 16_384
                conn.settimeout(0.05)
                while sent < 50_000_000 and not answer:  # would be 50 MB; the limit is 100 kB
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    try:
                        answer = conn.recv(4096)
                    except TimeoutError:
                        pass
                conn.settimeout(5)
                while not answer.endswith(b"}"):  # the rest of the JSON response
                    more = conn.recv(4096)
                    if not more:
                        break
                    answer += more
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than the limit of 100000 bytes" in answer
    assert sent < 2_000_000, f"the server let {sent} bytes in before refusing"


def test_declared_oversized_upload_gets_413_with_reason(client):
    response = client.post("/v1/images/search", files={"file": ("big.jpg", b"\0" * 200_000, "image/jpeg")})
    assert response.status_code == 413 and "limit of 50000 bytes" in response.json()["detail"]


def test_oversized_json_body_is_refused(client):
    response = client.post("/v1/index/jobs", content=b'{"collection": "' + b"a" * 200_000 + b'"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


# -- query parameters (property-based) ------------------------------------------------------------

def valid_query(q: str) -> bool:
    import unicodedata
    text = q.strip()
    return bool(text) and len(q) <= 500 and not any(
        unicodedata.category(ch) == "Cc" and ch not in "\t\n" for ch in text) and any(
        unicodedata.category(ch)[0] in "LNSP" for ch in text)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=st.text(max_size=600), k=st.integers(-5, 150), offset=st.integers(-5, 1200))
def test_any_query_parameters_get_200_or_422_never_500(client, q, k, offset):
    response = client.get("/v1/images/search", params={"q": q, "k": k, "offset": offset})
    should_pass = valid_query(q) and 1 <= k <= 100 and 0 <= offset <= 1000
    assert response.status_code == (200 if should_pass else 422), (q, k, offset, response.text)
    if should_pass:
        results = response.json()["results"]
        assert len(results) == max(0, min(k, 18 - offset))
    else:
        assert response.json()["detail"]


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.text(min_size=1, max_size=30))
def test_any_image_id_in_the_path_gets_a_4xx_never_500(client, raw):
    for suffix in ("", "/file", "/thumbnail", "/similar", "/captions"):
        response = client.get(f"/v1/images/{quote(raw, safe='')}{suffix}")
        assert response.status_code in (200, 404, 405, 422), (raw, suffix, response.status_code)


# -- files ------------------------------------------------------------------------------------------

def test_files_are_served_by_id_and_never_outside_the_collection(client, small_limits, collection, tmp_path):
    camera, cat = image_id(client, "camera.png"), image_id(client, "cat.jpg")
    assert client.get(f"/v1/images/{camera}/file").status_code == 200
    secret = tmp_path / "secret.txt"
    secret.write_text("not for you")
    engine = client.app.state.service.engine
    with engine.store.session() as s, s.begin():  # a tampered database row pointing outside the root
        s.execute(update(ImageRow).where(ImageRow.id == camera).values(path="../secret.txt"))
    response = client.get(f"/v1/images/{camera}/file")
    assert response.status_code == 404 and "not for you" not in response.text
    (collection / "cat.jpg").unlink()  # a file swapped for a symlink that escapes the root
    (collection / "cat.jpg").symlink_to(secret)
    for suffix in ("/file", "/thumbnail"):
        response = client.get(f"/v1/images/{cat}{suffix}")
        assert response.status_code == 404 and "not for you" not in response.text
    for path in ("/v1/images/..%2F..%2Fetc%2Fpasswd/file", "/v1/images/%2Fetc%2Fpasswd/file", "/../../etc/passwd"):
        response = client.get(path)
        assert response.status_code in (404, 422) and "root:" not in response.text


def test_a_symlink_swap_racing_the_request_never_serves_an_outside_file(indexed, encoder, collection, tmp_path):
    """A thread swaps a photo for a symlink to an outside file and back, as fast as it can,
    while the file and its thumbnail are fetched: before, 277 of 3,000 requests leaked."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"TOP-SECRET" * 100)
    photo = collection / "cat.jpg"
    original = photo.read_bytes()
    swapped = collection / "cat-swap.tmp"
    stop = threading.Event()

    def swapper() -> None:
        while not stop.is_set():
            swapped.unlink(missing_ok=True)
            swapped.symlink_to(secret)
            os.replace(swapped, photo)
            swapped.write_bytes(original)
            os.replace(swapped, photo)

    with serving(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as base:
        with httpx.Client(base_url=base, timeout=30) as http:
            cat = next(r["id"] for r in http.get("/v1/images/search", params={"q": "a cat", "k": 18}).json()["results"]
                       if r["path"] == "cat.jpg")
            thread = threading.Thread(target=swapper)
            thread.start()
            statuses, leaks = Counter(), 0
            try:
                for i in range(600):
                    response = http.get(f"/v1/images/{cat}/file")
                    statuses[response.status_code] += 1
                    leaks += b"TOP-SECRET" in response.content
                    if i % 50 == 0:
                        thumb = http.get(f"/v1/images/{cat}/thumbnail")
                        statuses[thumb.status_code] += 1
            finally:
                stop.set()
                thread.join(10)
    assert leaks == 0
    assert set(statuses) <= {200, 404} and statuses[200] > 0 and statuses[404] > 0, statuses


def test_many_first_time_thumbnail_requests_at_once_all_succeed(live_server):
    with httpx.Client(base_url=live_server, timeout=60) as http:
        ids = [r["id"] for r in http.get("/v1/images/search", params={"q": "a photo", "k": 18}).json()["results"]]

    def fetch(image_id: int) -> int:
        with httpx.Client(base_url=live_server, timeout=60) as http:
            return http.get(f"/v1/images/{image_id}/thumbnail").status_code

    with ThreadPoolExecutor(48) as pool:  # 30 requests for each image at once, none cached yet
        statuses = Counter(pool.map(fetch, [i for i in ids for _ in range(30)]))
    assert statuses == Counter({200: len(ids) * 30})


# -- odd but valid uploads ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["grey16-big-endian.tif", "broken-exif-float.jpg", "broken-exif-range.jpg"])
def test_odd_but_valid_uploads_are_searched(client, name):
    from tests.test_bad_files import BAD_FILES

    response = client.post("/v1/captions/search", params={"k": 3}, files={"file": (name, BAD_FILES[name][0])})
    assert response.status_code == 200 and len(response.json()["results"]) == 3, response.text


# -- admin token and CORS ---------------------------------------------------------------------------

def test_rebuilds_need_the_admin_token_when_one_is_set(indexed, encoder, collection):
    guarded = indexed.model_copy(update={"admin_token": "s3cret-token"})
    with TestClient(create_app(guarded, SearchEngine(guarded, encoder=encoder))) as client:
        body = {"collection": str(collection)}
        assert client.post("/v1/index/jobs", json=body).status_code == 401
        wrong = client.post("/v1/index/jobs", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "admin token" in wrong.json()["detail"]
        assert client.get("/v1/index/jobs").status_code == 401
        assert client.get("/v1/images/search", params={"q": "a cat"}).status_code == 200  # search stays open
        ok = client.post("/v1/index/jobs", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 202
        job = ok.json()["id"]
        deadline = time.time() + 120
        while client.get(f"/v1/index/jobs/{job}", headers={"Authorization": "Bearer s3cret-token"}
                         ).json()["state"] in ("queued", "running") and time.time() < deadline:
            time.sleep(0.2)


def test_a_rebuild_may_name_only_an_allowed_model_with_weights(client, small_limits, encoder, collection):
    response = client.post("/v1/index/jobs", json={"collection": str(collection), "model": "RN50"})
    assert response.status_code == 400 and "not allowed" in response.json()["detail"]
    allowing = small_limits.model_copy(update={"allowed_models": ["RN50", "ViT-B-32:laion2b_s34b_b79k"]})
    with TestClient(create_app(allowing, SearchEngine(allowing, encoder=encoder))) as other:
        response = other.post("/v1/index/jobs", json={"collection": str(collection), "model": "RN50"})
        assert response.status_code == 400 and "without weights" in response.json()["detail"]
        assert other.get("/v1/index/jobs").json() == []  # no job was started
        assert other.get("/v1/stats").json()["model"] == CURRENT_DEFAULT_MODEL  # the index's model, unchanged


def test_a_query_of_invisible_characters_gets_422(client):
    response = client.get("/v1/images/search", params={"q": "\u200b\u200c\u200d\ufeff"})
    assert response.status_code == 422 and "no visible characters" in response.json()["detail"]


def test_head_is_answered_like_get_without_a_body(client):
    assert client.head("/health").status_code == 200
    camera = image_id(client, "camera.png")
    for suffix in ("/file", "/thumbnail", ""):
        got, head = client.get(f"/v1/images/{camera}{suffix}"), client.head(f"/v1/images/{camera}{suffix}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(got.content))
        assert head.headers["content-type"] == got.headers["content-type"]


def test_only_allowed_host_names_are_answered(client):
    """DNS rebinding: a page on rebind.example resolved to 127.0.0.1 sends its own name as Host."""
    assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "localhost"}).status_code == 200
    for host in ("rebind.example", "rebind.example:8000", "127.0.0.1.rebind.example", "user@127.0.0.1", ""):
        response = client.get("/v1/stats", headers={"Host": host})
        assert response.status_code == 400 and "CROSSMODAL_ALLOWED_HOSTS" in response.json()["detail"], host


def test_cors_allows_the_configured_ui_origin_only(indexed, encoder):
    configured = indexed.model_copy(update={"cors_origins": ["http://ui.example:8501"]})
    with TestClient(create_app(configured, SearchEngine(configured, encoder=encoder))) as client:
        preflight = {"Access-Control-Request-Method": "GET"}
        allowed = client.options("/v1/images/search", headers={"Origin": "http://ui.example:8501", **preflight})
        assert allowed.headers.get("access-control-allow-origin") == "http://ui.example:8501"
        other = client.options("/v1/images/search", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
        simple = client.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in simple.headers
