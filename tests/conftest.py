"""Shared fixtures: one real encoder per session, real sample photos, a fresh index dir per test."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.encoder import Encoder, load_encoder
from indexer.sample_collection import write_sample_collection
from indexer.settings import Settings

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "flickr8k"


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return load_encoder("crossmodal-lite", device="cpu")


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    return write_sample_collection(tmp_path_factory.mktemp("sample"))


@pytest.fixture
def collection(tmp_path, sample_source) -> Path:
    """A private copy of the sample collection plus two generated images, safe to modify."""
    root = tmp_path / "collection"
    root.mkdir()
    for item in sample_source.iterdir():
        (root / item.name).write_bytes(item.read_bytes())
    nested = root / "generated"
    nested.mkdir()
    solid_image((200, 30, 30)).save(nested / "red.png")
    solid_image((30, 30, 200)).save(nested / "blue.jpg")
    return root


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(index_dir=tmp_path / "index", device="cpu")


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Image.Image:
    noise = np.random.default_rng(sum(color)).integers(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(color) + noise, 0, 255).astype(np.uint8))


def flickr8k_split(name: str) -> Path:
    split = FLICKR8K / name
    if not (split / "captions.tsv").is_file():
        pytest.skip(f"{split} not present (../shared/datasets/flickr8k is only beside CI and dev checkouts)")
    return split
