"""Real data: index the Flickr8k dev split and hold the measured quality (skips without ../shared)."""
from __future__ import annotations

import pytest

from indexer.builder import IndexBuilder
from indexer.evaluate import evaluate_published
from tests.conftest import flickr8k_split

# Measured with the committed crossmodal-lite heads: T->I R@10 66.2, I->T R@10 72.2 (see README and
# data/models/crossmodal-lite/training_report.json), minus a margin for noise across machines.
T2I_R10_FLOOR = 60.0
I2T_R10_FLOOR = 65.0


@pytest.mark.slow
def test_dev_split_indexes_and_meets_the_recall_floor(settings, encoder):
    dev = flickr8k_split("dev")
    report = IndexBuilder(settings, encoder=encoder).build(dev / "images", dev / "captions.tsv")
    assert report.n_images == 1000 and report.n_captions == 5000 and not report.skipped
    result = evaluate_published(settings)
    assert result["n_images"] == 1000 and result["n_captions"] == 5000
    recall = result["recall"]
    assert recall["text_to_image"]["R@10"] > T2I_R10_FLOOR, recall
    assert recall["image_to_text"]["R@10"] > I2T_R10_FLOOR, recall
