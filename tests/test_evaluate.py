"""Recall@K with the Flickr 1k protocol on cases small enough to check by hand."""
from __future__ import annotations

import numpy as np
import pytest
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

    lossy = Settings(index_dir=tmp_path / "lossy", device="cpu", index_factory="IVF2,PQ64x4",
                     text_query_precision="float32")  # the stored caption vectors are the queries
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


def test_eval_encodes_text_queries_as_the_service_does(tmp_path, encoder, collection):
    """With the int8 query tower (the default), eval's text queries are the service's own, not the stored
    caption vectors: its text-to-image ranks equal those of the text search that users run."""
    from crossmodal.indexer.builder import IndexBuilder
    from crossmodal.indexer.evaluate import evaluate_published
    from crossmodal.indexer.settings import Settings
    from crossmodal.indexer.store import CaptionRow
    from crossmodal.search.engine import SearchEngine

    settings = Settings(index_dir=tmp_path / "index", device="cpu")
    IndexBuilder(settings, encoder=encoder).build(collection)
    engine = SearchEngine(settings)  # no model handed in: text queries go through the exported tower
    assert engine.text_encoder.precision == "int8"
    with engine.store.session() as s:
        pairs = s.execute(select(CaptionRow.text, CaptionRow.image_id).order_by(CaptionRow.id)).all()
    ranks = np.array([next((rank for rank, hit in enumerate(engine.images_by_text(text, k=10)) if hit.id == i), 10)
                      for text, i in pairs])
    result = evaluate_published(settings)
    assert result["text_queries"] == "int8"
    assert result["recall"]["text_to_image"] == {f"R@{k}": float((ranks < k).mean() * 100) for k in (1, 5, 10)}
    as_stored = evaluate_published(settings.model_copy(update={"text_query_precision": "float32"}))
    assert as_stored["text_queries"] == "float32" and as_stored["recall"]["image_to_text"] == \
        result["recall"]["image_to_text"]  # captions and images are the build's vectors either way


def _class_folder(root, sample_source):
    """A zero-shot classes folder from the sample photos: two photos a class (the second mirrored),
    one caption each naming the class, laid out like caltech101-dev."""
    from PIL import Image, ImageOps

    classes = {"cat.jpg": "a cat", "horse.png": "a horse", "rocket.webp": "a rocket", "coffee.jpg": "a coffee cup",
               "brick.png": "a brick wall", "astronaut.jpg": "an astronaut"}
    (root / "images").mkdir(parents=True)
    rows = ["image\tcaption"]
    for source, name in classes.items():
        image = Image.open(sample_source / source).convert("RGB")
        for n, variant in enumerate((image, ImageOps.mirror(image))):
            file = f"{name.split()[-1]}_{n}.png"
            variant.save(root / "images" / file)
            rows.append(f"{file}\ta photo of {name}.")
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_zero_shot_eval_agrees_with_brute_force_over_the_stored_vectors(tmp_path, encoder, sample_source):
    """`crossmodal eval --zero-shot` through FAISS equals exhaustive search over the stored vectors."""
    from crossmodal.indexer.builder import IndexBuilder
    from crossmodal.indexer.evaluate import evaluate_classes
    from crossmodal.indexer.settings import Settings
    from crossmodal.search.engine import SearchEngine

    folder = _class_folder(tmp_path / "classes", sample_source)
    settings = Settings(index_dir=tmp_path / "index", device="cpu", text_query_precision="float32")
    IndexBuilder(settings, encoder=encoder).build(folder / "images", folder / "captions.tsv")
    result = evaluate_classes(settings)
    assert result["n_classes"] == 6 and result["n_images"] == 12 and len(result["classes"]) == 6

    engine = SearchEngine(settings, encoder=encoder)
    paths = engine.store.image_paths()
    class_of = {image_id: path.split("_")[0] for image_id, path in paths.items()}
    names = {row["class"]: row for row in result["classes"]}
    precision, top1 = [], []
    for text, row in names.items():
        hits = engine.images_by_vector(encoder.encode_texts([text])[0], k=10, from_text=True)
        label = text.removesuffix(".").split()[-1]
        precision.append(sum(class_of[h.id] == label for h in hits) / 10)
        assert row["precision_at_10"] == precision[-1] and row["images"] == 2
    vectors = engine.store.vectors_by_id(engine.snapshot.manifest.model, "image", list(paths))
    for image_id, vector in vectors.items():
        best = engine.captions_by_vector(vector, k=1, from_image=True)[0]
        top1.append(best.text.removesuffix(".").split()[-1] == class_of[image_id])
    assert result["text_to_image_precision_at_10"] == sum(precision) / len(precision)
    assert result["image_to_caption_top1"] == sum(top1) / len(top1)
    assert result["image_to_caption_top1"] > 1 / 6  # better than chance on its own sample photos


def test_zero_shot_eval_refuses_a_collection_with_several_captions_an_image(indexed):
    from crossmodal.indexer.evaluate import evaluate_classes

    with pytest.raises(ValueError, match="one caption per image"):
        evaluate_classes(indexed)
