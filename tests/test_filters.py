"""Filters, date sort and cutoff: photo facts stored at index time, both filtering regimes inside FAISS
against brute force, the API's parameters and JSON fields, the CLI, pagination, and the 422s."""
from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from crossmodal.indexer import faiss_index, ranking
from crossmodal.indexer.attributes import Selection
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.search.engine import SearchEngine
from crossmodal.search.options import SearchOptions
from crossmodal.search.service import create_app
from tests.conftest import solid_image

# -- both regimes, against brute force ---------------------------------------------------------------


def _vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["Flat", "IVF16,SQ8"])
@pytest.mark.parametrize("share", [0.002, 0.01, 0.1, 0.5])
def test_a_filtered_search_returns_the_best_k_selected_in_both_regimes(index_type, share, monkeypatch):
    n, k = 4000, 10
    vectors, ids = _vectors(n), np.arange(1000, 1000 + n, dtype=np.int64)  # ids are row ids, not positions
    index = faiss_index.build_index(vectors, ids, index_type, use_gpu=False)
    faiss_index.apply_search_params(index, faiss_index.default_search_params(index_type))
    rng = np.random.default_rng(1)
    chosen = np.sort(rng.choice(ids, max(1, int(n * share)), replace=False))
    selection = Selection.of(chosen, n)
    prefiltered = []
    original = faiss_index._selector_params
    monkeypatch.setattr(faiss_index, "_selector_params", lambda *a: prefiltered.append(1) or original(*a))
    exact = dict(zip(ids.tolist(), vectors))
    for query in _vectors(20, seed=2):
        lookup = (lambda wanted: {i: exact[i] for i in wanted}) if "SQ" in index_type else None
        found = ranking.ranked(index, index_type, query[None], k, lookup,
                               selection=selection)[0]
        scores = vectors[np.searchsorted(ids, chosen)] @ query
        best = chosen[np.argsort(-scores)[:k]].tolist()
        assert len(found) == min(k, len(chosen))  # k results whenever k photos match
        assert set(i for i, _ in found) <= set(chosen.tolist())
        if index_type == "Flat":
            assert [i for i, _ in found] == best
        else:  # IVF-PQ re-ranked by exact vectors: the same set, up to a rare miss of the approximate stage
            assert len(set(i for i, _ in found) & set(best)) >= len(best) - 1
    # The regime the share calls for: a selector while the probed lists would hold too few selected codes
    # (this IVF probes all 16 lists: under 2 x 100 candidates of 4,000), post-filtering beyond.
    assert bool(prefiltered) == (share <= faiss_index.PREFILTER_MAX_SHARE if index_type == "Flat" else share * n < 200)


def test_a_post_filter_that_finds_too_few_in_the_probed_lists_falls_back_to_the_selector():
    n = 4000
    vectors, ids = _vectors(n), np.arange(n, dtype=np.int64)
    index = faiss_index.build_index(vectors, ids, "IVF64,Flat", use_gpu=False)
    faiss_index.apply_search_params(index, {"nprobe": 4})
    query = _vectors(1, seed=3)
    _, probed = faiss_index.search(index, query, n)  # every id in the 4 lists this query probes
    selection = Selection.of(np.setdiff1d(ids, probed[probed >= 0]), n)  # a broad filter, none of them
    assert not faiss_index.prefilters(index, selection, 50)  # the rule expects enough in the probed lists
    _, found = faiss_index.search_selected(index, query, 50, selection)
    best = selection.ids[np.argsort(-(vectors[selection.ids] @ query[0]))[:50]]
    assert found[0].tolist() == best.tolist()  # found by the selector over every list


def test_an_empty_selection_finds_nothing():
    index = faiss_index.build_index(_vectors(50), np.arange(50), "Flat", use_gpu=False)
    assert ranking.ranked(index, "Flat", _vectors(1), 10, None, selection=Selection.of(np.array([], np.int64), 50)) \
        == [[]]


# -- photo facts through a real build ------------------------------------------------------------------

DATES = {"trip/a.jpg": "2019:07:14 10:20:30", "trip/b.jpg": "2021:01:02 08:00:00", "trip/c.jpg": "2021:03:04 18:30:00"}


def _exif(make: str, model: str, taken: str) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = make, model
    exif.get_ifd(0x8769)[0x9003] = taken
    return exif


@pytest.fixture
def photos(collection):
    """The sample collection plus three camera photos with EXIF dates (two cameras) in trip/, and a portrait."""
    (collection / "trip").mkdir()
    for (path, taken), (make, model), size in zip(DATES.items(), [("Canon", "Canon EOS 5D"), ("NIKON CORPORATION",
                                                                   "D750"), ("Canon", "Canon EOS 5D")],
                                                  [(300, 200), (200, 200), (320, 200)]):
        solid_image((40 * len(path), 90, 20), size).save(collection / path, exif=_exif(make, model, taken))
    solid_image((20, 20, 220), (100, 200)).save(collection / "trip" / "portrait.png")
    os.utime(collection / "trip" / "portrait.png", (1_500_000_000, 1_500_000_000))
    return collection


@pytest.fixture
def engine(settings, encoder, photos):
    IndexBuilder(settings, encoder=encoder).build(photos)
    return SearchEngine(settings, encoder=encoder)


def _paths(hits) -> list[str]:
    return [h.path for h in hits]


def test_photo_facts_are_stored_at_index_time(engine):
    hits = {h.path: h for h in engine.images_by_text("a photo", k=30)}
    assert len(hits) == 22
    a, b = hits["trip/a.jpg"], hits["trip/b.jpg"]
    assert (a.camera, a.taken_from) == ("Canon EOS 5D", "exif") and b.camera == "NIKON CORPORATION D750"
    assert a.taken_at == pytest.approx(1563099630.0)  # 2019-07-14 10:20:30 as wall-clock seconds
    assert hits["trip/portrait.png"].taken_from == "mtime" and hits["trip/portrait.png"].camera is None
    facets = engine.facets()
    assert {"folder": "trip", "images": 4} in facets["folders"] and facets["taken_from_exif"] == 3
    assert [c["camera"] for c in facets["cameras"]] == ["Canon EOS 5D", "NIKON CORPORATION D750"]


@pytest.mark.parametrize("options, expected", [
    ({"folder": "trip"}, {"trip/a.jpg", "trip/b.jpg", "trip/c.jpg", "trip/portrait.png"}),
    ({"folder": "generated/"}, {"generated/red.png", "generated/blue.jpg"}),
    ({"camera": "canon"}, {"trip/a.jpg", "trip/c.jpg"}),
    ({"camera": "Canon EOS 5D"}, {"trip/a.jpg", "trip/c.jpg"}),
    ({"taken_after": "2021-01-01", "taken_before": "2021-12-31"}, {"trip/b.jpg", "trip/c.jpg"}),
    ({"taken_before": "2021-01-02"}, {"trip/a.jpg", "trip/b.jpg", "trip/portrait.png"}),  # the whole day
    ({"taken_after": "2021-01-02T09:00:00", "folder": "trip"}, {"trip/c.jpg"}),
    ({"orientation": "portrait"}, {"trip/portrait.png"}),
    ({"orientation": "square", "folder": "trip"}, {"trip/b.jpg"}),
    ({"min_width": 300, "max_height": 200}, lambda h: h.width >= 300 and h.height <= 200),
    ({"max_width": 100, "min_height": 48}, lambda h: h.width <= 100 and h.height >= 48),
    ({"has_captions": False}, {"trip/a.jpg", "trip/b.jpg", "trip/c.jpg", "trip/portrait.png", "generated/red.png",
                               "generated/blue.jpg"}),
])
def test_each_filter_returns_exactly_the_matching_photos(engine, options, expected):
    hits = engine.images_by_text("a photo", k=30, options=SearchOptions(**options))
    if callable(expected):  # brute force over every photo's facts
        expected = {h.path for h in engine.images_by_text("a photo", k=30) if expected(h)}
        assert expected
    assert set(_paths(hits)) == expected
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)  # still ranked by relevance


def test_k_results_whenever_k_match_and_the_ranking_is_the_unfiltered_ones_order(engine):
    everything = _paths(engine.images_by_text("a photo", k=30))
    captioned = _paths(engine.images_by_text("a photo", k=5, options=SearchOptions(has_captions=True)))
    assert len(captioned) == 5
    assert captioned == [p for p in everything if not p.startswith(("trip/", "generated/"))][:5]


def test_date_sort_cutoff_and_pages(engine):
    newest = engine.images_by_text("a photo", k=4, options=SearchOptions(folder="trip", sort="date_desc"))
    assert _paths(newest) == ["trip/c.jpg", "trip/b.jpg", "trip/a.jpg", "trip/portrait.png"]
    oldest = engine.images_by_text("a photo", k=4, options=SearchOptions(folder="trip", sort="date_asc"))
    assert _paths(oldest) == _paths(newest)[::-1]
    ranked = engine.images_by_text("a photo", k=30)
    cutoff = ranked[9].score
    above = engine.images_by_text("a photo", k=30, options=SearchOptions(min_score=cutoff))
    assert _paths(above) == _paths(ranked[:10])
    # "the top N by relevance, then by date": the date order of exactly the 10 best
    top = engine.images_by_text("a photo", k=30, options=SearchOptions(sort="date_desc", top=10))
    assert set(_paths(top)) == set(_paths(ranked[:10]))
    taken = [h.taken_at for h in top]
    assert taken == sorted(taken, reverse=True)
    for options in (SearchOptions(sort="date_desc", top=15), SearchOptions(has_captions=True, sort="date_asc"),
                    SearchOptions(folder="trip", mode="hybrid"), SearchOptions(mode="keyword")):
        whole = _paths(engine.images_by_text("a man with a camera", k=15, options=options))
        pages = [p for offset in range(0, 15, 5)
                 for p in _paths(engine.images_by_text("a man with a camera", k=5, offset=offset, options=options))]
        assert pages == whole and len(set(pages)) == len(pages)  # one ordering: no duplicates, no gaps


def test_a_rerun_keeps_facts_and_rows_from_before_them_are_read_again(settings, encoder, photos, engine):
    database = settings.resolved_database_url().removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:  # as migration 0003 leaves rows written before it
        connection.execute("UPDATE images SET taken_at = NULL, taken_from = NULL, camera_make = NULL, "
                           "camera_model = NULL")
    report = IndexBuilder(settings, encoder=encoder).build(photos)
    assert report.n_embedded == 0 and report.n_images == 22  # read again for their facts, not re-embedded
    again = SearchEngine(settings, encoder=encoder)
    assert _paths(again.images_by_text("a photo", k=5, options=SearchOptions(camera="nikon"))) == ["trip/b.jpg"]
    (photos / "trip" / "b.jpg").unlink()
    IndexBuilder(settings, encoder=encoder).build(photos)
    again.reload()
    assert _paths(again.images_by_text("a photo", k=5, options=SearchOptions(folder="trip", camera="canon"))) == [
        p for p in _paths(again.images_by_text("a photo", k=30)) if p in ("trip/a.jpg", "trip/c.jpg")]
    with pytest.raises(Exception, match="camera 'nikon' took no indexed photo"):
        again.images_by_text("a photo", options=SearchOptions(camera="nikon"))


# -- over HTTP and in the CLI ----------------------------------------------------------------------------

@pytest.fixture
def client(settings, engine):
    with TestClient(create_app(settings, engine)) as client:
        yield client


def _results(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_every_image_endpoint_takes_the_filters(client, photos):
    params = {"q": "a photo", "folder": "trip", "sort": "date_desc", "k": 10}
    by_get = _results(client.get("/v1/images/search", params=params))
    assert [r["path"] for r in by_get] == ["trip/c.jpg", "trip/b.jpg", "trip/a.jpg", "trip/portrait.png"]
    assert by_get[0]["taken_at"] == "2021-03-04T18:30:00" and by_get[0]["camera"] == "Canon EOS 5D"
    by_json = _results(client.post("/v1/images/search", json=params))
    assert [r["id"] for r in by_json] == [r["id"] for r in by_get]
    similar = _results(client.get(f"/v1/images/{by_get[0]['id']}/similar", params={"camera": "canon"}))
    assert [r["path"] for r in similar] == ["trip/a.jpg"]  # itself excluded
    with open(photos / "cat.jpg", "rb") as photo:
        upload = _results(client.post("/v1/images/search", params={"has_captions": "false", "k": 3},
                                      files={"file": ("cat.jpg", photo.read(), "image/jpeg")}, data={"q": "-red"}))
    assert len(upload) == 3 and all(r["path"].startswith(("trip/", "generated/")) for r in upload)
    facets = client.get("/v1/facets").json()
    assert facets["taken_first"] == datetime.fromtimestamp(1_500_000_000).isoformat()  # the mtime, local wall clock
    assert facets["taken_last"] > "2021-03-04T18:30:00" and facets["images"] == 22 and facets["with_captions"] == 16


def test_caption_searches_keep_the_captions_of_photos_that_pass_the_filters(client):
    wide = {r["id"] for r in _results(client.get("/v1/images/search", params={"q": "a photo", "k": 30}))
            if r["width"] >= 600}
    assert wide
    image_id = next(iter(wide))
    for path, params in (("/v1/captions/search", {"q": "a photo"}), (f"/v1/images/{image_id}/captions", {})):
        everything = _results(client.get(path, params={**params, "k": 30}))
        filtered = _results(client.get(path, params={**params, "k": 30, "min_width": 600}))
        assert filtered == [r for r in everything if r["image_id"] in wide]  # the same order, only theirs
        assert filtered and len(filtered) < len(everything)
    response = client.get("/v1/captions/search", params={"q": "a photo", "sort": "date_desc"})
    assert response.status_code == 422 and "sort and mode apply to image searches" in response.text
    response = client.get("/v1/captions/search", params={"q": "a photo", "camera": "leica"})
    assert response.status_code == 422 and "took no indexed photo" in response.text


@pytest.mark.parametrize("params, fragment", [
    ({"camera": "leica"}, "camera 'leica' took no indexed photo (cameras in this collection: Canon EOS 5D, NIKON"),
    ({"folder": "nowhere"}, "folder 'nowhere': no indexed image is in it"),
    ({"taken_after": "2021-02-30"}, "taken_after"),
    ({"taken_after": "2022-01-01", "taken_before": "2021-01-01"}, "taken_after (2022-01-01) is after taken_before"),
    ({"orientation": "round"}, "'landscape', 'portrait' or 'square'"),
    ({"sort": "random"}, "'relevance', 'date_desc' or 'date_asc'"),
    ({"mode": "fuzzy"}, "'vector', 'keyword' or 'hybrid'"),
    ({"min_width": 0}, "greater than or equal to 1"),
    ({"min_width": 500, "max_width": 100}, "min_width (500) is above max_width (100)"),
])
def test_bad_filter_values_are_422s_that_name_the_part_and_reach_no_model(client, monkeypatch, params, fragment):
    engine = client.app.state.service.engine
    monkeypatch.setattr(engine, "text_vector", lambda text: pytest.fail(f"{text!r} reached the encoder"))
    for response in (client.get("/v1/images/search", params={"q": "a photo", **params}),
                     client.post("/v1/images/search", json={"q": "a photo", **params})):
        assert response.status_code == 422 and fragment in response.text, response.text


def test_keyword_modes_need_words(client):
    image_id = _results(client.get("/v1/images/search", params={"q": "a photo", "k": 1}))[0]["id"]
    response = client.get(f"/v1/images/{image_id}/similar", params={"mode": "keyword"})
    assert response.status_code == 422 and "needs words" in response.text
    response = client.post("/v1/images/search", json={"terms": [{"image_id": image_id}], "mode": "hybrid"})
    assert response.status_code == 422 and "needs words" in response.text


def test_the_cli_filters_and_sorts(tmp_path, photos):
    from tests.test_cli import run

    index_dir = tmp_path / "idx"
    assert run("index", photos, "--index-dir", index_dir)[0] == 0
    code, out = run("search", "a photo", "--folder", "trip", "--sort", "date_asc", "--index-dir", index_dir, "--json")
    assert code == 0, out
    assert [h["path"] for h in json.loads(out)["images"]] == ["trip/portrait.png", "trip/a.jpg", "trip/b.jpg",
                                                              "trip/c.jpg"]
    code, out = run("search", "a photo", "--camera", "nikon", "--taken-after", "2021-01-01", "--index-dir", index_dir)
    assert code == 0 and "trip/b.jpg" in out and out.count("image:") == 1
    code, out = run("search", "a photo", "--taken-after", "2021-13-01", "--index-dir", index_dir)
    assert code == 2 and "--taken-after" in out
    code, out = run("search", "a photo", "--camera", "leica", "--index-dir", index_dir)
    assert code == 2 and "took no indexed photo" in out
    code, out = run("search", "a photo", "--folder", "trip", "--min-width", "5000", "--index-dir", index_dir)
    assert code == 0 and "no indexed image matches the filters" in out
