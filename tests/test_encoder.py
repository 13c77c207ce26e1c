"""The encoder interface: offline default model, open_clip checkpoints, the shared space."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crossmodal.indexer.encoder import load_encoder, pick_device
from crossmodal.indexer.model_names import ModelSpec
from crossmodal.indexer.pixels import stack
from tests.conftest import solid_image, tiny_open_clip


def test_default_model_loads_offline_and_embeds_into_one_normalised_space(encoder, sample_source):
    # 512 from the trained heads, 384 from the label bridge (label_bridge.py)
    assert encoder.name == "crossmodal-lite-4" and encoder.dim == 512 + 384 and encoder.device.type == "cpu"
    from PIL import Image
    images = encoder.encode_images([Image.open(sample_source / "cat.jpg"), solid_image((0, 0, 0))])
    texts = encoder.encode_texts(["a cat", "a dog", ""])
    assert images.dtype == texts.dtype == np.float32
    assert images.shape == (2, encoder.dim) and texts.shape == (3, encoder.dim)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert encoder.encode_texts([]).shape == (0, encoder.dim)


def test_texts_unlike_the_training_captions_lean_on_the_bridge(encoder):
    """Version 4: a text's bridge share rises from 0.3 to 0.8 as it moves away from every training caption
    (label_bridge.Familiarity); a Flickr-like caption keeps 0.3, and an image always has 0.3."""
    bridge = encoder.model.text.proj.bridge
    assert bridge.temperature == 2.0 and bridge.familiar.captions.shape == (4096, 384)
    texts = ["A dog runs through the grass.", "a photo of a gramophone.", "a photo of a metronome."]
    text = encoder.model.text  # open_clip's HFTextEncoder: transformer, pooler, then our fused head
    tokens = encoder.tokenize(texts)
    mask = (tokens != text.config.pad_token_id).long()
    with torch.inference_mode():
        pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)
        fused, weights = text.proj(pooled).numpy(), bridge.text_weight(pooled)[:, 0].tolist()
    vectors = encoder.encode_texts(texts)
    np.testing.assert_allclose(vectors, fused, atol=1e-4)
    assert weights[0] == pytest.approx(0.3) and weights[1] == weights[2] == pytest.approx(0.8)
    # the bridge's half of each vector carries sqrt(share) of its length
    np.testing.assert_allclose(np.linalg.norm(vectors[:, 512:], axis=1) ** 2, weights, atol=1e-4)


def test_right_caption_ranks_first_on_real_photos(encoder, sample_source):
    """Among all 22 sample captions, these photos' best caption is one of their own (raw cosine). Version 4
    gained the astronaut and lost the moon (a camera caption 0.208, its own 0.196; see its model card)."""
    from PIL import Image
    from crossmodal.indexer.collection import read_captions
    captions = read_captions(sample_source / "captions.tsv").rows
    names = ["astronaut.jpg", "camera.png", "cat.jpg", "coffee.jpg", "horse.png", "rocket.webp"]
    images = encoder.encode_images([Image.open(sample_source / n) for n in names])
    best = (images @ encoder.encode_texts([text for _, text in captions]).T).argmax(axis=1)
    assert [captions[i][0] for i in best] == names


def test_trimmed_padding_gives_the_same_vectors(encoder):
    texts = ["short", "a much longer caption about two dogs playing in the snow near a fence"]
    full = encoder.tokenizer(texts).to(encoder.device)
    with torch.inference_mode():
        reference = encoder.model.encode_text(full, normalize=True).numpy()
    np.testing.assert_allclose(encoder.encode_texts(texts), reference, atol=1e-5)
    assert encoder.tokenize(texts).shape[1] < full.shape[1]


def test_batching_does_not_change_results(encoder):
    images = [solid_image((i * 20, 100, 200 - i * 20)) for i in range(5)]
    np.testing.assert_allclose(encoder.encode_images(images, batch_size=2), encoder.encode_images(images, batch_size=5),
                               atol=1e-4)


@pytest.mark.parametrize("name, arch, pretrained", [
    ("ViT-B-32", "ViT-B-32", None),
    ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k"),
    ("RN50:/models/rn50.pt", "RN50", "/models/rn50.pt"),
    ("hf-hub:org/repo", "hf-hub:org/repo", None),
])
def test_model_spec_parsing(name, arch, pretrained):
    assert ModelSpec.parse(name) == ModelSpec(arch, pretrained)


def test_open_clip_local_checkpoint_loads(tmp_path):
    """The path real users take with their own checkpoints: ARCH:/path/to/file.pt."""
    tiny = load_encoder(tiny_open_clip(tmp_path, "tiny-test-clip"), device="cpu")
    assert tiny.dim == 32
    assert tiny.encode_images([solid_image((1, 2, 3))]).shape == (1, 32)


def test_clip_text_towers_run_without_the_padding_after_the_longest_text(tmp_path):
    """CLIP's causal text towers give the same vectors on tokens cut after the longest text, even where
    a text holds token 0 ("!"), which is also the padding."""
    tiny = load_encoder(tiny_open_clip(tmp_path, "tiny-causal-clip", text={"context_length": 24, "layers": 2}),
                        device="cpu")
    texts = ["a", "wow!!! a dog!", "!", "", "two dogs play in the snow", "very long " * 30]
    with torch.inference_mode():
        reference = tiny.model.encode_text(tiny.tokenizer(texts), normalize=True).numpy()
    np.testing.assert_allclose(tiny.encode_texts(texts), reference, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([tiny.encode_texts([t]) for t in texts]), reference, atol=1e-5)
    assert tiny.tokenize(["a dog!"]).shape[1] == 5  # start, "a", "dog", "!", end: not the 24 of the context
    assert tiny.tokenize(["very long " * 30]).shape[1] == 24  # truncated at the context, nothing cut


def test_unknown_model_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot load model"):
        load_encoder("no-such-arch:some-tag", device="cpu")
    with pytest.raises(ValueError, match="architecture without weights"):
        load_encoder("RN50", device="cpu")  # open_clip would build it with random weights
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_encoder(f"ViT-B-32:{tmp_path}/missing.pt", device="cpu")


def test_device_selection_falls_back_to_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_traced_image_tower_matches_open_clip_eager(encoder, sample_source):
    """On CPU the image tower runs traced (TorchScript); it must embed exactly as open_clip does."""
    from PIL import Image
    pixels = torch.stack([encoder.preprocess(Image.open(sample_source / n).convert("RGB"))
                          for n in ("cat.jpg", "horse.png", "rocket.webp")])
    traced = encoder.encode_image_tensors(pixels)
    assert encoder._traced_visual is not None and encoder._traced_visual is not encoder.model.visual
    with torch.inference_mode():
        eager = encoder.model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(traced, eager, atol=1e-4)


def test_default_preprocess_from_config_is_open_clips_transform(encoder):
    """A Ray driver builds crossmodal-lite's transform from its config, without the model; it is
    the transform open_clip makes as it builds the model (its preprocess_cfg)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from crossmodal.indexer.encoder import preparer_from_config
    pre = encoder.model.visual.preprocess_cfg
    theirs = image_transform_v2(PreprocessCfg(**pre), is_train=False)
    assert repr(preparer_from_config("crossmodal-lite-4").preprocess) == repr(theirs) == repr(encoder.preprocess)
    assert preparer_from_config("ViT-B-32") is None  # open_clip models settle theirs as they load


def _sample_photos(sample_source):
    """The sample photos as they are, plus wide, tall, tiny and grey variants (other resize paths)."""
    from PIL import Image
    photos = [Image.open(sample_source / n).convert("RGB") for n in ("cat.jpg", "horse.png", "rocket.webp")]
    return photos + [photos[0].resize((500, 333)), photos[1].resize((180, 640)), photos[2].resize((40, 30)),
                     photos[0].convert("L")]


def test_prepared_pixels_stand_in_for_the_open_clip_transform(encoder, sample_source):
    """prepare() (uint8, tensor kernels) plus the batched normalisation gives open_clip's
    pixels to within 2 levels of 255, and the same vectors."""
    photos = _sample_photos(sample_source)
    prepared = stack([encoder.prepare(p) for p in photos])
    reference = torch.stack([encoder.preprocess(p.convert("RGB")) for p in photos])
    assert prepared.dtype == torch.uint8 and encoder._pixels.on_tensors
    assert prepared.is_contiguous(memory_format=torch.channels_last)  # the encoder's layout, no conversion
    assert torch.equal(prepared, torch.stack([encoder.prepare(np.array(p.convert("RGB"))) for p in photos]))
    level = 2 / 255  # one level of 255 after Normalize(0.5, 0.5)
    assert (encoder._pixels.normalise(prepared) - reference).abs().max() <= 2 * level + 1e-6
    ours, theirs = encoder.encode_image_tensors(prepared), encoder.encode_image_tensors(reference)
    assert (ours * theirs).sum(axis=1).min() > 0.9999


def test_transforms_that_cannot_run_on_tensors_still_run(encoder, sample_source):
    """An unknown PIL step keeps the PIL path (same floats exactly); a transform without
    ToTensor + Normalize at its end runs whole."""
    from torchvision import transforms as T

    from crossmodal.indexer.encoder import Encoder
    photos = _sample_photos(sample_source)
    custom = T.Compose([T.Lambda(lambda im: im.rotate(90)), *encoder.preprocess.transforms])
    bare = T.Compose([*encoder.preprocess.transforms[:-1]])  # no Normalize
    for preprocess, dtype in ((custom, torch.uint8), (bare, torch.float32)):
        other = Encoder("custom-transform", encoder.model, preprocess, encoder.tokenizer, encoder.device)
        prepared = stack([other.prepare(p) for p in photos])
        assert prepared.dtype == dtype
        expected = torch.stack([preprocess(p.convert("RGB")) for p in photos])
        got = other._pixels.normalise(prepared) if dtype == torch.uint8 else prepared
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        np.testing.assert_allclose(other.encode_image_tensors(prepared), other.encode_image_tensors(expected),
                                   atol=1e-5)


def test_the_alias_names_the_current_version_and_an_old_recorded_name_loads_version_1(sample_source):
    """Builds record a versioned name, so a new version never reuses an older one's stored vectors;
    builds from before versions recorded the bare alias, and those hold version 1's vectors."""
    from PIL import Image

    from crossmodal.indexer.hubness import load_bank
    from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL, default_model_version, resolve_model_name

    assert resolve_model_name("crossmodal-lite") == CURRENT_DEFAULT_MODEL == "crossmodal-lite-4"
    assert resolve_model_name("ViT-B-32:laion2b_s34b_b79k") == "ViT-B-32:laion2b_s34b_b79k"
    assert default_model_version("crossmodal-lite") == "crossmodal-lite-1"
    from crossmodal.indexer import glossary
    assert glossary.for_model("crossmodal-lite-2") is None and glossary.for_model("crossmodal-lite") is None
    assert glossary.for_model(CURRENT_DEFAULT_MODEL) is not None  # versions 3 and 4 gloss; 1 and 2 load as they were
    old = load_encoder("crossmodal-lite", device="cpu")
    assert old.name == "crossmodal-lite" and old.dim == 512 and load_bank("crossmodal-lite").text.shape[1] == 512
    cat, horse = old.encode_images([Image.open(sample_source / "cat.jpg"), Image.open(sample_source / "horse.png")])
    texts = old.encode_texts(["a cat", "a horse"])
    assert texts[0] @ cat > texts[0] @ horse and texts[1] @ horse > texts[1] @ cat


def test_a_camera_photo_decoded_at_reduced_scale_keeps_its_vector(encoder, tmp_path):
    """Issue 18: large JPEGs are decoded at 1/2-1/8 scale (DCT domain), keeping a short side of twice what
    the model resizes to; the vector stays within a cosine of 0.998 of full decoding (0.9989 lowest
    measured on six real phone photos, tests/benchmarks/large_photos.py)."""
    from crossmodal.indexer.collection import decode_for_model
    from tests.test_collection import camera_sized

    assert encoder.preparer.decode_side == 520  # crossmodal-lite-4 resizes to 260
    for size, orientation in (((4000, 3000), 1), ((3264, 1836), 1), ((4000, 3000), 6)):
        data = camera_sized(size, orientation)
        whole, *_ = decode_for_model(data, 10**8)
        reduced, *_ = decode_for_model(data, 10**8, encoder.preparer.decode_side)
        assert min(reduced.shape[:2]) < min(whole.shape[:2]) // 2 + 1  # reduced: at least 1/2
        a, b = (encoder.encode_image_tensors(stack([encoder.prepare(x)]))[0] for x in (whole, reduced))
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.998, (size, orientation)


def test_decode_threads_follow_the_photos_size(encoder):
    from crossmodal.indexer.builder import decode_threads
    from crossmodal.indexer.collection import FileEntry

    small = [FileEntry(f"{i}.jpg", Path(f"{i}.jpg"), 40_000, 0.0) for i in range(9)]
    camera = [FileEntry(f"{i}.jpg", Path(f"{i}.jpg"), 4_000_000, 0.0) for i in range(9)]
    assert decode_threads(-1, encoder, small) == 0 and decode_threads(-1, encoder, camera) == 2
    assert decode_threads(-1, encoder, small[:3] + camera[:7]) == 2 and decode_threads(3, encoder, small) == 3
