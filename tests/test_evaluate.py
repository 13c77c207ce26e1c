"""Recall@K with the Flickr 1k protocol on cases small enough to check by hand."""
from __future__ import annotations

import numpy as np
from sqlalchemy import select

from crossmodal.indexer.evaluate import recall_at_k


def test_recall_counts_hits_both_ways():
    images = np.eye(3, dtype=np.float32)
    # captions 0,1 belong to image 0; 2 to image 1; 3 to image 2 but points at image 0.
    texts = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.8, 0, 0.6]], dtype=np.float32)
    result = recall_at_k(images, texts, np.array([0, 0, 1, 2]), ks=(1, 2))
    assert result["text_to_image"] == {"R@1": 75.0, "R@2": 100.0}
    # every image's best-scoring caption is one of its own (image 0: caption 0 at 1.0 beats caption 3 at 0.8)
    assert result["image_to_text"] == {"R@1": 100.0, "R@2": 100.0}


def test_perfect_and_random_models():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((50, 16)).astype(np.float32)
    own = np.repeat(np.arange(50), 5)
    perfect = recall_at_k(images, images[own], own)
    assert perfect["text_to_image"]["R@1"] == 100.0 and perfect["image_to_text"]["R@1"] == 100.0
    random = recall_at_k(images, rng.standard_normal((250, 16)).astype(np.float32), own)
    assert random["text_to_image"]["R@1"] < 20


def test_eval_on_a_lossy_index_ranks_exactly_as_the_engine_does(tmp_path, encoder, collection):
    """IVF-PQ: eval must re-rank candidates with exact vectors and apply hubness as search does."""
    from crossmodal.indexer.builder import IndexBuilder
    from crossmodal.indexer.evaluate import evaluate_published, recall_from_ranks
    from crossmodal.indexer.settings import Settings
    from crossmodal.indexer.store import CaptionRow
    from crossmodal.search.engine import SearchEngine

    lossy = Settings(index_dir=tmp_path / "lossy", device="cpu", index_factory="IVF2,PQ64x4")
    IndexBuilder(lossy, encoder=encoder).build(collection)
    engine = SearchEngine(lossy, encoder=encoder)
    model = engine.snapshot.manifest.model
    with engine.store.session() as s:
        pairs = s.execute(select(CaptionRow.id, CaptionRow.image_id).order_by(CaptionRow.id)).all()
    caption_vectors = engine.store.vectors_by_id(model, "caption", [c for c, _ in pairs])
    image_ids = sorted({i for _, i in pairs})
    image_vectors = engine.store.vectors_by_id(model, "image", image_ids)
    t2i = [next((rank for rank, hit in enumerate(engine.images_by_vector(caption_vectors[c], k=10, from_text=True))
                 if hit.id == i), 10) for c, i in pairs]
    own = {i: {c for c, j in pairs if j == i} for i in image_ids}
    i2t = [next((rank for rank, hit in enumerate(engine.captions_by_vector(image_vectors[i], k=10, from_image=True))
                 if hit.id in own[i]), 10) for i in image_ids]
    expected = recall_from_ranks(np.array(t2i), np.array(i2t))
    assert evaluate_published(lossy)["recall"] == expected
