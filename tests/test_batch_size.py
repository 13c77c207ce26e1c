"""The CPU batch size per model (issue 18): measured on a build's own photos, kept, remembered."""
from __future__ import annotations

import numpy as np
from sqlalchemy import select

from crossmodal.indexer import batch_size
from crossmodal.indexer.batch_size import BatchTuner
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.store import Embedding, ImageRow, Store
from tests.conftest import solid_image


def test_the_tuner_tries_each_size_and_keeps_the_fastest(tmp_path):
    seconds_per_image = {1: 0.020, 2: 0.015, 4: 0.010, 8: 0.009, 16: 0.0125, 32: 0.014}
    tuner, tried = BatchTuner(tmp_path, "some-model"), []
    while not tuner.done:
        size = tuner.size()
        tried.append(size)
        tuner.observe(size, size * seconds_per_image[size])
    assert tuner.best() == 8 and batch_size.known(tmp_path, "some-model") == 8
    assert 32 not in tried  # 16 ran at under 3/4 of the best: larger sizes are not tried
    assert tried.count(1) == batch_size.WARM_UP_CALLS + batch_size.TIMED_IMAGES  # one image a batch
    assert batch_size.known(tmp_path, "another-model") is None


def test_a_build_measures_the_batch_size_on_its_own_photos(settings, encoder, tmp_path, monkeypatch):
    monkeypatch.setattr(batch_size, "MIN_NEW_IMAGES", 40)
    monkeypatch.setattr(batch_size, "CANDIDATES", (1, 2, 4))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(70):
        solid_image(((37 * i) % 256, (91 * i) % 256, (13 * i) % 256), size=(80, 60)).save(folder / f"{i:02d}.png")
    encoder.cpu_batch_size = None
    try:
        report = IndexBuilder(settings, encoder=encoder).build(folder)
        measured = batch_size.known(settings.index_dir, encoder.name)
        assert measured in (1, 2, 4) and encoder.cpu_batch_size == measured and report.n_embedded == 70
    finally:
        encoder.cpu_batch_size = None
    store = Store(settings.resolved_database_url())
    with store.session() as s:  # every photo's stored vector is its own, whatever batch it was embedded in
        rows = s.execute(select(ImageRow.path, Embedding.vector).join(
            Embedding, (Embedding.key == ImageRow.content_hash) & (Embedding.kind == "image"))).all()
    stored = {path: np.frombuffer(blob, dtype=np.float32) for path, blob in rows}
    from PIL import Image

    names = sorted(stored)[:8]
    alone = encoder.encode_images([Image.open(folder / name) for name in names], batch_size=1)
    assert np.abs(np.stack([stored[n] for n in names]) - alone).max() < 1e-4
