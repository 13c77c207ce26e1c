"""Compressed CPU variants (issue 18): "MODEL+onnx" and "MODEL+int8" run the towers in ONNX Runtime, close
to the model's vectors, exported once; the variant is part of the model name a build records."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.indexer import onnx_text
from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.encoder import load_encoder
from crossmodal.indexer.model_names import check_model_name, default_model_version, resolve_model_name, split_variant
from crossmodal.search.engine import SearchEngine
from tests.conftest import solid_image, tiny_open_clip

PHOTOS = ["camera.png", "cat.jpg", "coffee.jpg", "horse.png", "moon.png", "grass.png"]
TEXTS = ["a", "a cat", "two dogs play in the snow beside a red fence", "a cup of coffee on a saucer"]


def test_variant_names():
    assert split_variant("crossmodal-lite-4+int8") == ("crossmodal-lite-4", "int8")
    assert split_variant("ViT-B-32:/models/my+model.pt") == ("ViT-B-32:/models/my+model.pt", None)
    assert resolve_model_name("crossmodal-lite+int8") == "crossmodal-lite-4+int8"  # a version, never the alias
    assert resolve_model_name("ViT-B-32:laion2b_s34b_b79k+onnx") == "ViT-B-32:laion2b_s34b_b79k+onnx"
    assert default_model_version("crossmodal-lite-4+onnx") == "crossmodal-lite-4"
    check_model_name("crossmodal-lite+int8")
    with pytest.raises(ValueError, match="unknown variant 'fp16': the variants are onnx, int8"):
        check_model_name("crossmodal-lite+fp16")
    with pytest.raises(ValueError, match="architecture without weights"):
        check_model_name("RN50+int8")


@pytest.fixture(scope="module")
def photos(sample_source) -> list[Image.Image]:
    return [Image.open(sample_source / name).convert("RGB") for name in PHOTOS]


@pytest.mark.parametrize("variant, least", [("onnx", 0.99999), ("int8", 0.995)])
def test_a_variant_embeds_as_the_model_does_and_is_exported_once(encoder, photos, tmp_path, variant, least):
    compressed = load_encoder(f"{encoder.name}+{variant}", "cpu", tmp_path)
    assert compressed.name == f"crossmodal-lite-4+{variant}" and compressed.dim == encoder.dim
    cosines = (compressed.encode_images(photos) * encoder.encode_images(photos)).sum(1)
    assert cosines.min() >= least, cosines
    # text towers stay float32 in every variant (onnx_towers.py says why)
    np.testing.assert_allclose(compressed.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=1e-5)
    files = sorted(tmp_path.iterdir())
    assert [f.name.split(".", 1)[1] for f in files] == ["image.onnx", "text.onnx"]  # nothing half-written
    written = [f.stat().st_mtime_ns for f in files]
    again = load_encoder(f"{encoder.name}+{variant}", "cpu", tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == written  # loaded, not exported again
    np.testing.assert_array_equal(again.encode_images(photos), compressed.encode_images(photos))


def test_the_int8_image_tower_differs_from_float32(encoder, photos, tmp_path):
    """int8 is really quantized: its vectors are close to, not equal to, float32's (the +onnx variant's)."""
    onnx, int8 = (load_encoder(f"{encoder.name}+{v}", "cpu", tmp_path) for v in ("onnx", "int8"))
    difference = np.abs(onnx.encode_images(photos) - int8.encode_images(photos)).max()
    assert 1e-4 < difference < 0.05, difference
    sizes = {f.name: f.stat().st_size for f in tmp_path.glob("*.image.onnx")}
    assert len(sizes) == 2 and len(set(sizes.values())) == 2


def test_an_open_clip_vision_transformer_exports(tmp_path):
    """open_clip's ViTs use torch's fused attention, which has no ONNX form: the export turns it off."""
    vision = {"layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    name = tiny_open_clip(tmp_path, "tiny-vit-clip", vision=vision)
    model, compressed = load_encoder(name, "cpu"), load_encoder(f"{name}+onnx", "cpu")  # a temporary tower folder
    images = [solid_image((i * 40, 90, 200 - i * 30), (50 + 7 * i, 40)) for i in range(5)]
    np.testing.assert_allclose(compressed.encode_images(images), model.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(compressed.encode_texts(TEXTS), model.encode_texts(TEXTS), atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # turned back on after the export
    assert compressed.towers.text_file is None  # CLIP's causal text tower stays the model's (onnx_towers._exports_text)


def test_a_tower_that_strays_is_refused_with_a_clear_error(encoder, tmp_path, monkeypatch):
    from crossmodal.indexer import onnx_towers

    monkeypatch.setattr(onnx_towers, "INT8_AGREEMENT", 1.0)  # int8 never reproduces float32 exactly
    with pytest.raises(ValueError, match=r"model 'crossmodal-lite-4\+int8': the int8 image tower disagrees"):
        load_encoder(f"{encoder.name}+int8", "cpu", tmp_path)
    assert not list(tmp_path.glob("*.image.onnx*"))


def test_a_variant_build_records_its_name_and_never_mixes_vectors(settings, encoder, collection):
    settings = settings.model_copy(update={"export_text_tower": True})
    report = IndexBuilder(settings).build(collection, model="crossmodal-lite+int8")
    assert report.model == "crossmodal-lite-4+int8" and report.n_embedded > 0
    assert (settings.compressed_tower_dir).is_dir()
    # search answers from the variant's own towers: its text tower exported for torch-free queries too
    engine = SearchEngine(settings)
    assert engine.snapshot.manifest.model == "crossmodal-lite-4+int8"
    assert onnx_text.exported(settings.index_dir, "crossmodal-lite-4+int8")
    assert engine.images_by_text("an orange tabby cat", k=1)[0].path == "cat.jpg"
    by_image = engine.images_by_image(Image.open(collection / "horse.png"), k=1)
    assert by_image[0].path == "horse.png" and by_image[0].score > 0.99
    # back to the plain model: every photo is embedded again, none of the int8 vectors is reused
    plain = IndexBuilder(settings, encoder=encoder).build(collection)
    assert plain.model == "crossmodal-lite-4" and plain.model_changed
    assert plain.n_reused == 0 and plain.n_embedded == report.n_embedded


def test_a_tower_without_an_onnx_form_is_refused_with_a_clear_error(encoder, tmp_path, monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::something' to ONNX is not supported")

    monkeypatch.setattr(onnx_text, "export_tower", unsupported)
    with pytest.raises(ValueError, match=r"\+onnx': the image tower cannot be exported to ONNX \(RuntimeError"):
        load_encoder(f"{encoder.name}+onnx", "cpu", tmp_path)
    assert not list(tmp_path.iterdir())
