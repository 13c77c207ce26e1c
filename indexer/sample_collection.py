"""The sample collection: real photos that the scikit-image wheel ships, with our captions.

It exists on any fresh machine without a download, so the demo and the end-to-end tests
have real photos to search. Formats are mixed on purpose (JPEG, PNG, WebP, greyscale,
RGBA) so the demo exercises the decoders too.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from crossmodal.indexer.settings import DATA_DIR

CAPTIONS = DATA_DIR / "sample" / "captions.tsv"
# file name -> scikit-image loader name
IMAGES = {
    "astronaut.jpg": "astronaut", "camera.png": "camera", "cat.jpg": "chelsea", "coffee.jpg": "coffee",
    "coins.png": "coins", "rocket.webp": "rocket", "moon.png": "moon", "clock.png": "clock",
    "brick.png": "brick", "grass.png": "grass", "gravel.png": "gravel", "horse.png": "horse",
    "page.png": "page", "text.png": "text", "colorwheel.png": "colorwheel", "logo.png": "logo",
}


def write_sample_collection(dest: Path) -> Path:
    """Write the images and captions.tsv into dest (created); returns dest."""
    import skimage.data

    dest.mkdir(parents=True, exist_ok=True)
    for file_name, loader in IMAGES.items():
        target = dest / file_name
        if target.exists():
            continue
        pixels = getattr(skimage.data, loader)()
        if pixels.dtype == bool:
            pixels = np.where(pixels, 0, 255).astype(np.uint8)  # black shapes on white
        Image.fromarray(pixels).save(target, quality=90)
    shutil.copyfile(CAPTIONS, dest / "captions.tsv")
    return dest
