"""Recall@K with the Flickr 1k protocol on cases small enough to check by hand."""
from __future__ import annotations

import numpy as np

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
