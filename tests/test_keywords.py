"""Keyword and hybrid search: the keyword index kept with the rows (SQLite FTS5, PostgreSQL full text),
fusion by reciprocal rank, and `crossmodal eval --modes`."""
from __future__ import annotations

from sqlalchemy import text

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.evaluate import evaluate_modes, evaluate_published
from crossmodal.indexer.ranking import fused, fusion_depth
from crossmodal.search.engine import SearchEngine
from crossmodal.search.options import SearchOptions
from tests.conftest import BOTH_DATABASES

DATABASES = BOTH_DATABASES  # each test runs on SQLite (FTS5) and on a real PostgreSQL server (tsvector)


def _documents(store) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM keywords")).scalar()


def test_keywords_find_captions_and_file_names_and_follow_the_rows(settings, encoder, collection):
    builder = IndexBuilder(settings, encoder=encoder)
    builder.build(collection)
    engine = SearchEngine(settings, encoder=encoder)
    store = engine.store
    assert _documents(store) == 18 + 22  # one per file name, one per caption
    by_word = lambda words: [engine.store.image_paths()[i] for i, _ in store.keyword_search(words, 10)]
    assert by_word("tabby") == ["cat.jpg"]
    assert by_word("ginger cats")[0] == "cat.jpg"  # stemmed: cats -> cat
    assert set(by_word("generated")) == {"generated/red.png", "generated/blue.jpg"}  # the file names' words
    assert by_word("the of a") == [] and by_word("\"tabby' OR *") == ["cat.jpg"]  # no syntax reaches the index
    keyword = engine.images_by_text("a cup of coffee", k=5, options=SearchOptions(mode="keyword"))
    assert [h.path for h in keyword] == ["coffee.jpg"]  # the only photo with either word

    (collection / "cat.jpg").unlink()
    builder.build(collection)
    engine.reload()
    assert _documents(store) == 17 + 20 and by_word("tabby") == []  # its documents went with its rows
    assert "cat.jpg" not in [h.path for h in engine.images_by_text("tabby", options=SearchOptions(mode="hybrid"))]


def test_hybrid_is_the_reciprocal_rank_fusion_of_both_rankings(settings, encoder, collection):
    IndexBuilder(settings, encoder=encoder).build(collection)
    engine = SearchEngine(settings, encoder=encoder)
    query = "a red coffee cup"
    depth = fusion_depth(settings)
    vector = [(h.id, h.score) for h in engine.images_by_text(query, k=100)]
    keyword = engine.store.keyword_search(query, depth)
    expected = fused([vector, keyword])[:10]
    hybrid = engine.images_by_text(query, k=10, options=SearchOptions(mode="hybrid"))
    assert [(h.id, round(h.score, 9)) for h in hybrid] == [(i, round(s, 9)) for i, s in expected]
    assert hybrid[0].path == "coffee.jpg"


def test_eval_modes_measure_each_mode_through_the_published_index(settings, encoder, collection):
    IndexBuilder(settings, encoder=encoder).build(collection)
    result = evaluate_modes(settings)
    assert result["vector"] == evaluate_published(settings)["recall"]["text_to_image"]
    held_out, uncaptioned = result["query_caption_held_out"], result["query_photo_uncaptioned"]
    # With a sibling caption left, words find the photo: a caption and its sibling share words here.
    assert held_out["keyword"]["R@10"] > 0 and held_out["hybrid"]["R@10"] >= result["vector"]["R@10"] - 10
    # Nothing left to find a photo by but its file name, which here often names it (cat.jpg, coffee.jpg)
    assert 0 < uncaptioned["keyword"]["R@10"] <= held_out["keyword"]["R@10"]
