"""Hubness correction: the bank's penalties, their storage beside the index, and search using them."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from crossmodal.indexer import faiss_index
from crossmodal.indexer.hubness import HubnessBank, Penalties, corrected, load_bank
from crossmodal.indexer.store import ImageRow, Store, load_embeddings, vectors_from_bytes
from crossmodal.search.engine import SearchEngine


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_penalty_is_beta_times_mean_of_k_nearest_bank_queries(tmp_path):
    rng = np.random.default_rng(0)
    bank = HubnessBank(_unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(40, 8))), k=5, beta=0.5)
    gallery = _unit(rng.normal(size=(7, 8)))
    expected = [0.5 * np.sort(bank.text @ v)[-5:].mean() for v in gallery]
    np.testing.assert_allclose(bank.penalties(gallery, "image"), expected, rtol=1e-5)
    expected_captions = [0.5 * np.sort(bank.image @ v)[-5:].mean() for v in gallery]
    np.testing.assert_allclose(bank.penalties(gallery, "text", chunk=3), expected_captions, rtol=1e-5)
    bank.save(tmp_path / "bank.safetensors")
    loaded = HubnessBank.load(tmp_path / "bank.safetensors")
    assert (loaded.k, loaded.beta, loaded.text.shape) == (5, 0.5, (50, 8))
    np.testing.assert_allclose(loaded.penalties(gallery, "image"), expected, atol=2e-3)  # stored as float16


def test_penalties_look_up_by_id_and_reorder_candidates(tmp_path):
    penalties = Penalties.of(np.array([30, 10, 20]), np.array([0.3, 0.1, 0.2]))
    np.testing.assert_allclose(penalties.lookup(np.array([20, 99, 10])), [0.2, 0.0, 0.1])
    # 30 leads on cosine but is the biggest hub: corrected, 10 comes first
    assert [i for i, _ in corrected([(30, 0.50), (10, 0.45), (20, 0.30)], penalties)] == [10, 30, 20]
    penalties.save(tmp_path / "p.npz")
    assert Penalties.load(tmp_path / "p.npz").lookup(np.array([30]))[0] == pytest.approx(0.3)
    assert Penalties.load(tmp_path / "missing.npz") is None


def test_default_model_ships_a_bank_and_open_clip_models_have_none(encoder):
    bank = load_bank(encoder.name)
    assert bank is not None and bank.text.shape[1] == bank.image.shape[1] == encoder.dim
    assert 0 < bank.beta <= 1 and bank.k > 0
    assert load_bank("ViT-B-32:laion2b_s34b_b79k") is None


def test_text_search_ranks_by_corrected_scores_and_image_search_by_cosine(indexed, encoder):
    build_dir = faiss_index.build_dir_for(indexed.index_dir, 1)
    manifest = faiss_index.Manifest.read(build_dir)
    assert manifest.hubness["k"] == load_bank(encoder.name).k
    penalties = Penalties.load(build_dir / faiss_index.PENALTY_FILES[faiss_index.IMAGES_FILE])
    store = Store(indexed.resolved_database_url())
    engine = SearchEngine(indexed, encoder=encoder, store=store)
    ids = penalties.ids
    with store.session() as s:
        hashes = dict(s.execute(select(ImageRow.id, ImageRow.content_hash)).all())
        blobs = load_embeddings(s, encoder.name, "image", list(hashes.values()))
    vectors = vectors_from_bytes([blobs[hashes[i]] for i in ids], encoder.dim)
    # the stored penalties are the bank's, for the stored vectors
    np.testing.assert_allclose(penalties.values, load_bank(encoder.name).penalties(vectors, "image"), atol=1e-5)

    query = encoder.encode_texts(["a cat"])[0]
    expected = vectors @ query - penalties.values
    hits = engine.images_by_text("a cat", k=len(ids))
    assert [h.id for h in hits] == ids[np.argsort(-expected, kind="stable")].tolist()
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], atol=1e-5)

    similar = engine.images_by_vector(vectors[0], k=len(ids))  # image -> image: no correction
    np.testing.assert_allclose([h.score for h in similar], np.sort(vectors @ vectors[0])[::-1], atol=1e-5)


def test_a_large_collection_penalises_captions_against_its_own_photos(settings, encoder, collection, monkeypatch):
    """Past COLLECTION_BANK_MIN_IMAGES photos, the caption penalties come from the collection's photos;
    the image penalties still come from the shipped bank's texts."""
    from crossmodal.indexer import hubness
    from crossmodal.indexer.builder import IndexBuilder

    shipped = IndexBuilder(settings, encoder=encoder).build(collection)
    manifest = faiss_index.Manifest.read(faiss_index.build_dir_for(settings.index_dir, shipped.build_id))
    assert manifest.hubness["image_side"] == "shipped"  # 18 photos: too few to stand for a collection

    monkeypatch.setattr(hubness, "COLLECTION_BANK_MIN_IMAGES", 10)
    monkeypatch.setattr(hubness, "COLLECTION_BANK_SIZE", 12)
    (collection / "cat.jpg").unlink()  # a change, so a new build is written
    report = IndexBuilder(settings, encoder=encoder).build(collection)
    build_dir = faiss_index.build_dir_for(settings.index_dir, report.build_id)
    manifest = faiss_index.Manifest.read(build_dir)
    assert manifest.hubness["image_side"] == "collection" and manifest.hubness["bank_images"] == 12
    store = Store(settings.resolved_database_url())
    image_ids = sorted(store.image_paths())
    images = store.vectors_by_id(manifest.model, "image", image_ids)
    sample = np.sort(np.random.default_rng(0).choice(np.array(image_ids), 12, replace=False))
    bank = load_bank(encoder.name).with_collection_images(np.stack([images[i] for i in sample]))
    captions = Penalties.load(build_dir / faiss_index.PENALTY_FILES[faiss_index.CAPTIONS_FILE])
    vectors = store.vectors_by_id(manifest.model, "caption", captions.ids.tolist())
    expected = bank.penalties(np.stack([vectors[i] for i in captions.ids]), "text")
    np.testing.assert_allclose(captions.values, expected, atol=1e-5)
    assert not np.allclose(captions.values, load_bank(encoder.name).penalties(
        np.stack([vectors[i] for i in captions.ids]), "text"), atol=1e-3)
    image_penalties = Penalties.load(build_dir / faiss_index.PENALTY_FILES[faiss_index.IMAGES_FILE])
    np.testing.assert_allclose(image_penalties.values, load_bank(encoder.name).penalties(
        np.stack([images[i] for i in image_penalties.ids]), "image"), atol=1e-5)


def test_correction_can_be_switched_off_at_search_time(indexed, encoder):
    plain = indexed.model_copy(update={"hubness_correction": False})
    engine = SearchEngine(plain, encoder=encoder)
    assert engine.snapshot.image_penalties is None and engine.snapshot.caption_penalties is None
    hits = engine.images_by_text("a cat", k=5)
    query = encoder.encode_texts(["a cat"])[0]
    stored = engine.store.vectors_by_id(engine.snapshot.manifest.model, "image", [h.id for h in hits])
    np.testing.assert_allclose([h.score for h in hits], [stored[h.id] @ query for h in hits], atol=1e-5)


def test_check_reports_missing_or_mismatched_penalties(indexed):
    from crossmodal.indexer.check import check_index

    assert check_index(indexed).ok
    path = faiss_index.build_dir_for(indexed.index_dir, 1) / faiss_index.PENALTY_FILES[faiss_index.IMAGES_FILE]
    good = Penalties.load(path)
    Penalties.of(good.ids[1:], good.values[1:]).save(path)
    assert any("ids differ" in p for p in check_index(indexed).problems)
    path.unlink()
    assert any("is missing" in p for p in check_index(indexed).problems)
