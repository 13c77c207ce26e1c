"""Query expressions and relevance feedback: the syntax, the ranking (against brute force over the
stored vectors), the JSON body over HTTP, pagination, the CLI, and the 422s that reach no model."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient

from crossmodal.search.engine import SearchEngine
from crossmodal.search.expressions import FEEDBACK_LESS, FEEDBACK_MORE, Term, parse
from crossmodal.search.queries import InvalidQuery
from crossmodal.search.service import create_app


@pytest.mark.parametrize("expression, terms", [
    ("a dog's toy on a t-shirt", [Term(1, text="a dog's toy on a t-shirt")]),  # plain: exactly as typed
    ("beach +2:sunset -people", [Term(1, text="beach"), Term(2, text="sunset"), Term(-1, text="people")]),
    ("a dog on the grass -leash", [Term(1, text="a dog on the grass"), Term(-1, text="leash")]),
    ('image:42 -0.5:image:7 +"snow sky"', [Term(1, image_id=42), Term(-0.5, image_id=7), Term(1, text="snow sky")]),
    ("rock - paper", [Term(1, text="rock"), Term(-1, text="paper")]),
    ("image:3", [Term(1, image_id=3)]),
])
def test_expression_syntax(expression, terms):
    assert parse(expression, 500) == terms


@pytest.mark.parametrize("expression, fragment", [
    ("beach +20:sun", "at most 10"), ("beach +0:sun", "non-zero"), ("beach -", "'-' is followed by nothing"),
    ("-image:abc", "image:ID"), ("   ", "empty"), ("x " + " ".join(f"+t{i}" for i in range(16)), "at most 16 terms"),
])
def test_bad_expressions_say_which_part_is_wrong(expression, fragment):
    with pytest.raises(InvalidQuery, match=fragment):
        parse(expression, 500)


def _unit(v):
    return v / np.linalg.norm(v)


def _brute_force(engine: SearchEngine, query: np.ndarray, from_text: bool) -> list[int]:
    """Every indexed image ranked by cosine minus (for text queries) its hubness penalty."""
    snapshot = engine.snapshot
    ids = sorted(engine.store.image_paths())
    stored = engine.store.vectors_by_id(snapshot.manifest.model, "image", ids)
    penalties = snapshot.image_penalties.lookup(np.array(ids)) if from_text else np.zeros(len(ids))
    scores = np.array([stored[i] @ query for i in ids]) - penalties
    return [ids[i] for i in np.argsort(-scores, kind="stable")]


def test_terms_and_feedback_rank_as_their_weighted_sum(indexed, encoder):
    engine = SearchEngine(indexed, encoder=encoder)
    n = engine.snapshot.images.ntotal
    cat = next(h.id for h in engine.images_by_text("an orange tabby cat", k=n) if h.path == "cat.jpg")
    horse = next(h.id for h in engine.images_by_text("a horse", k=n) if h.path == "horse.png")
    stored = engine.store.vectors_by_id(engine.snapshot.manifest.model, "image", [cat, horse])
    text = {t: encoder.encode_texts([t])[0] for t in ("a cup of coffee", "a red cup")}

    terms = parse(f"a cup of coffee -0.5:a red cup +image:{cat}", 500)
    expected = _unit(text["a cup of coffee"] - 0.5 * text["a red cup"] + _unit(stored[cat]))
    assert [h.id for h in engine.images_by_terms(terms, k=n)] == _brute_force(engine, expected, from_text=True)

    feedback = engine.images_by_terms(parse("a cup of coffee", 500), k=n, more_like=[cat], less_like=[horse])
    expected = _unit(text["a cup of coffee"] + FEEDBACK_MORE * _unit(stored[cat]) - FEEDBACK_LESS * _unit(stored[horse]))
    assert [h.id for h in feedback] == _brute_force(engine, expected, from_text=True)

    only_images = engine.images_by_terms([Term(1, image_id=cat), Term(-1, image_id=horse)], k=n)
    expected = _unit(_unit(stored[cat]) - _unit(stored[horse]))  # no text: ranked as image to image
    assert [h.id for h in only_images] == _brute_force(engine, expected, from_text=False)
    assert only_images[0].id == cat


@pytest.fixture
def client(indexed, encoder):
    with TestClient(create_app(indexed, SearchEngine(indexed, encoder=encoder))) as client:
        yield client


def _ids(response) -> list[int]:
    assert response.status_code == 200, response.text
    return [r["id"] for r in response.json()["results"]]


def test_the_json_body_the_expression_and_the_query_parameter_agree(client):
    cat = _ids(client.get("/v1/images/search", params={"q": "an orange tabby cat", "k": 1}))[0]
    body = {"terms": [{"text": "a cup of coffee"}, {"text": "a red cup", "weight": -0.5}, {"image_id": cat}], "k": 18}
    by_body = _ids(client.post("/v1/images/search", json=body))
    by_q = _ids(client.post("/v1/images/search", json={"q": f"a cup of coffee -0.5:a red cup +image:{cat}", "k": 18}))
    by_get = _ids(client.get("/v1/images/search", params={"q": f"a cup of coffee -0.5:a red cup +image:{cat}",
                                                          "k": 18}))
    assert by_body == by_q == by_get and len(by_body) == 18
    assert _ids(client.post("/v1/images/query", json=body)) == by_body  # the JSON route's own path
    # an image upload on the same path is still an upload
    with open(client.app.state.service.engine.snapshot.collection_root / "cat.jpg", "rb") as photo:
        upload = client.post("/v1/images/search", files={"file": ("cat.jpg", photo.read(), "image/jpeg")})
    assert upload.status_code == 200 and upload.json()["results"][0]["path"] == "cat.jpg"


def test_more_like_this_moves_the_ranking_and_pages_stay_one_ordering(client):
    query = {"q": "a photo", "k": 18}
    plain = _ids(client.post("/v1/images/search", json=query))
    liked = plain[-1]  # the last result: feedback must bring it up
    refined = _ids(client.post("/v1/images/search", json={**query, "more_like": [liked]}))
    assert refined.index(liked) < plain.index(liked)
    less = _ids(client.post("/v1/images/search", json={**query, "less_like": [plain[0]]}))
    assert less.index(plain[0]) > 0
    for body in (query, {**query, "more_like": [liked], "less_like": [plain[0]]},
                 {"terms": [{"text": "a photo"}, {"text": "grey", "weight": -2}], "k": 18}):
        whole = _ids(client.post("/v1/images/search", json=body))
        pages = [i for offset in range(0, 18, 5)
                 for i in _ids(client.post("/v1/images/search", json={**body, "k": 5, "offset": offset}))]
        assert pages == whole and len(set(pages)) == 18  # no duplicates, no gaps


@pytest.mark.parametrize("body, fragment", [
    ({}, "the query is empty"), ({"q": "   "}, "empty"), ({"q": "cat +11:dog"}, "at most 10"),
    ({"terms": [{"text": "cat", "weight": 0}]}, "must not be 0"), ({"terms": [{"text": "cat", "weight": 11}]}, "less than or equal to 10"),
    ({"terms": [{"text": "cat", "image_id": 1}]}, "either `text` or `image_id`"), ({"terms": [{}]}, "either"),
    ({"q": "cat", "more_like": [987654]}, "image 987654 is not in the index"),
    ({"terms": [{"image_id": 987654}]}, "image 987654 is not in the index"),
    ({"q": "cat", "k": 101}, "k must be at most 100"), ({"q": "cat", "colour": "red"}, "Extra inputs"),
    ({"q": "cat -cat"}, "cancel out"), ({"less_like": [1]}, "the query is empty"),
])
def test_bad_queries_are_422_and_reach_no_model(client, monkeypatch, body, fragment):
    if body != {"q": "cat -cat"}:  # the only one found out after encoding: its two vectors cancel
        engine = client.app.state.service.engine
        monkeypatch.setattr(engine, "text_vector", lambda text: pytest.fail(f"{text!r} reached the encoder"))
    response = client.post("/v1/images/search", json=body)
    assert response.status_code == 422 and fragment in response.text, response.text


def test_the_cli_takes_expressions_and_feedback(tmp_path, collection):
    from tests.test_cli import run

    index_dir = tmp_path / "idx"
    assert run("index", collection, "--index-dir", index_dir)[0] == 0
    code, out = run("search", "a cup -red", "-k", "18", "--index-dir", index_dir, "--json")
    assert code == 0, out
    found = json.loads(out)
    assert found["query"]["terms"] == [{"weight": 1.0, "text": "a cup", "image_id": None},
                                       {"weight": -1.0, "text": "red", "image_id": None}]
    first, last = found["images"][0]["id"], found["images"][-1]["id"]
    code, out = run("search", "a cup -red", "--more-like", str(last), "-k", "18", "--index-dir", index_dir, "--json")
    ranked = [h["id"] for h in json.loads(out)["images"]]
    assert code == 0 and ranked.index(last) < 17
    code, out = run("search", "a cup -red", "-k", "3", "--offset", "3", "--index-dir", index_dir)
    assert code == 0 and not re.search(rf"image:{first}\b", out) and out.count("image:") == 3
    code, out = run("search", "a cup +11:red", "--index-dir", index_dir)
    assert code == 2 and "at most 10" in out
    code, out = run("search", "--more-like", "987654", "--index-dir", index_dir)
    assert code == 2 and "not in the index" in out
