"""open_clip's image transform, run the fast way: uint8 pixels per image, floats per batch.

open_clip builds each model's transform from torchvision's PIL steps (Resize, CenterCrop,
convert to RGB) followed by ToTensor and Normalize. Indexing runs it once per photo, and on
a CPU that is time the model does not get. So `PixelPipeline` runs:
- per image, the same resize and crop with torchvision's tensor kernels on uint8 pixels
  (antialiased bicubic, made to match PIL's: within 2 levels of 255, the same vectors to
  a cosine of 0.99998);
- per batch, ToTensor's and Normalize's arithmetic, inside the encoder.

Measured on Flickr8k photos (224 px to 260 px): 1.2 ms a photo for the PIL transform,
0.15 ms this way; a 500x375 photo: 1.4 ms against 0.2 ms. A transform with any other step
(a custom open_clip config) keeps its PIL steps per image and still normalises per batch;
one that does not end in ToTensor + Normalize runs whole, as open_clip wrote it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from open_clip.transform import MaybeConvertMode
from torchvision.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor, v2
from torchvision.transforms.v2 import functional as F

Pixels = Image.Image | np.ndarray  # a PIL image, or [H, W, 3] uint8 RGB (collection.decode_for_model)


def _tensor_step(step: object) -> Callable | None:
    """The uint8-tensor twin of one PIL step, or None where there is none we trust. The v2
    kernels are called directly: v2's transform objects add 20 us a photo of dispatch."""
    if type(step) is Resize:
        resize = v2.Resize(step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True)
        return partial(F.resize_image, size=resize.size, interpolation=resize.interpolation,
                       max_size=resize.max_size, antialias=True)
    if type(step) is CenterCrop:
        return partial(F.center_crop_image, output_size=v2.CenterCrop(step.size).size)
    if isinstance(step, MaybeConvertMode) or getattr(step, "__name__", "") == "_convert_to_rgb":
        return _unchanged  # pixels are made from RGB already
    return None


def _unchanged(pixels: torch.Tensor) -> torch.Tensor:
    return pixels


@dataclass(frozen=True)
class PixelPipeline:
    """`pixels(image)` per image ([3, H, W] uint8); `normalise(batch)` per batch (floats)."""

    per_image: Callable
    on_tensors: bool  # per_image takes uint8 tensors (else PIL images)
    mean: torch.Tensor  # [1, 3, 1, 1]
    std: torch.Tensor

    @classmethod
    def of(cls, preprocess: Callable) -> "PixelPipeline | None":
        """None for a transform that does not end in ToTensor + Normalize."""
        steps = list(getattr(preprocess, "transforms", ()))
        if len(steps) < 2 or type(steps[-1]) is not Normalize or not isinstance(steps[-2], ToTensor):
            return None
        tensor_steps = [_tensor_step(step) for step in steps[:-2]]
        on_tensors = all(step is not None for step in tensor_steps)
        norm = steps[-1]
        return cls(Compose(tensor_steps if on_tensors else steps[:-2]), on_tensors,
                   torch.tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1),
                   torch.tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1))

    def pixels(self, image: Pixels) -> torch.Tensor:
        if self.on_tensors:
            return self.per_image(_uint8(image))
        return _uint8(self.per_image(as_pil(image)))

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """ToTensor's scaling and Normalize's shift, in their order: the same floats."""
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return batch.float().div_(255).sub_(mean).div_(std)


def stack(pixels: Sequence[torch.Tensor]) -> torch.Tensor:
    """A batch [n, 3, H, W] of `pixels` outputs, stored channels-last as the encoder runs it.

    Resized pixels are channels-last views already, so this is one plain copy. torch.stack
    would gather them into NCHW and the encoder would convert them back: 93 against 12 us a
    photo, measured on Flickr8k batches of 4.
    """
    return torch.stack([p.permute(1, 2, 0) for p in pixels]).permute(0, 3, 1, 2)


MAX_ASPECT = 4.0  # long side / short side kept before resizing; models crop the centre square anyway


def bounded_aspect(image: Pixels, max_aspect: float = MAX_ASPECT) -> Pixels:
    """The centre of an image no longer than `max_aspect` times its short side.

    open_clip's transforms scale the short side to the model's size and then crop the centre,
    so the resize's output grows with the aspect ratio: a 7 KB PNG of 300,000x8 pixels was
    resized to 8.4 million x 260 (gigabytes) to keep 260x260 of it. Cropping the long side
    first bounds that work by the output size. Photos up to 4:1 (panoramas included) are
    untouched, so their vectors are exactly what they were.
    """
    width, height = (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
    short, long = min(width, height), max(width, height)
    keep = max(1, int(short * max_aspect))
    if long <= keep:
        return image
    start = (long - keep) // 2
    if isinstance(image, np.ndarray):
        return image[:, start:start + keep] if width > height else image[start:start + keep]
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def as_pil(image: Pixels) -> Image.Image:
    return Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")


def _uint8(image: Pixels) -> torch.Tensor:
    """[3, H, W] uint8, a view of an array's memory (channels-last, as the resize kernel likes it)."""
    array = image if isinstance(image, np.ndarray) else np.array(image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)
