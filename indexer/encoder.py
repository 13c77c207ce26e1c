"""The encoder interface: images and texts in, L2-normalised float32 vectors out.

Every model is an open_clip model, so one class serves them all; the names it loads are
listed in model_names.py.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Resize

from crossmodal.indexer import batch_size
from crossmodal.indexer.default_model import create_default_model, default_preprocess
from crossmodal.indexer.model_names import (CURRENT_DEFAULT_MODEL, ModelSpec, check_model_name, default_model_version,
                                            split_variant)
from crossmodal.indexer.pixels import PixelPipeline, Pixels, as_pil, bounded_aspect, stack

if TYPE_CHECKING:
    from crossmodal.indexer.onnx_towers import OnnxTowers

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present and not overridden; CPU otherwise."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available")
    return device


def keep_freed_memory() -> None:
    """Stop glibc from handing each batch's activations back to the OS (Linux/glibc only).

    By default large buffers are mmap'd and unmapped on every forward pass; each batch
    then page-faults its activations in again. Measured in the indexing benchmark: 42 ->
    55 images/s end to end, system time 6.6 -> 2.4 s per 500 images. Costs that freed
    memory stays with the process for reuse, so only the indexer asks for it: in the service,
    each worker thread's arena kept what its uploads had decoded (888 MB for 4 concurrent
    uploaders against 218 MB for the worst single one).
    """
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum: buffers come from the heap
        libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def _quiet_model_loading() -> None:
    """Tower loading prints load reports and 'initialized partially' warnings that are expected here."""
    logging.getLogger("root").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


@dataclass(frozen=True)
class ImagePreparer:
    """The per-image half of preprocessing, apart from the model: what Ray's decode tasks carry."""

    preprocess: Callable
    pixels: PixelPipeline | None

    @property
    def decode_side(self) -> int:
        """The short side a photo is decoded at, at least (collection.decode_for_model): twice what the
        transform resizes it to, so that decoding at reduced scale barely moves the vector (measured on
        phone photos: see tests/benchmarks/large_photos.py). 0: decode whole (no plain Resize first)."""
        resize = next((step for step in getattr(self.preprocess, "transforms", ()) if type(step) is Resize), None)
        if resize is None:
            return 0
        return 2 * (resize.size if isinstance(resize.size, int) else max(resize.size))

    def __call__(self, image: Pixels) -> torch.Tensor:
        """uint8 pixels where the transform allows (see pixels.py), else the whole transform. Extreme
        aspect ratios are cropped first (pixels.bounded_aspect), so the work is bounded."""
        image = bounded_aspect(image)
        if self.pixels is None:
            return self.preprocess(as_pil(image))
        return self.pixels.pixels(image)


def preparer_from_config(name: str) -> ImagePreparer | None:
    """`name`'s image preparer without loading the model, where its config says it all
    (crossmodal-lite); None for open_clip models, whose preprocessing is settled as they load."""
    version = default_model_version(name)
    if version is None:
        return None
    preprocess = default_preprocess(version)
    return ImagePreparer(preprocess, PixelPipeline.of(preprocess))


class Encoder:
    """A loaded dual encoder. `name`, `dim` and `device` describe it; encode_* embed.

    Images go in as `prepare(image)` tensors (batched by pixels.stack) or as PIL images.
    `prepare` takes a PIL image or decode_for_model's [H, W, 3] uint8 array.
    """

    def __init__(self, name: str, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 device: torch.device):
        self.name = name
        self.towers: OnnxTowers | None = None  # a compressed variant's towers (onnx_towers.py), set by load_encoder
        self.model = model
        self.preprocess = preprocess
        self.preparer = ImagePreparer(preprocess, PixelPipeline.of(preprocess))
        self._pixels = self.preparer.pixels
        self.tokenizer = tokenizer
        self.device = device
        self.use_fp16 = device.type == "cuda"
        self._traced_visual: torch.nn.Module | None = None
        self._traced_text: torch.nn.Module | None = None
        self.cpu_batch_size: int | None = None  # measured for this model and machine (batch_size.py)
        # Every forward pass holds this lock, whoever calls (queries, a rebuild in the service):
        # torch already uses every core for one pass, so passes queue rather than oversubscribe.
        self.lock = threading.Lock()
        # Depthwise and regular convs run ~2x faster in NHWC on CPU (oneDNN) and with tensor cores on GPU.
        self.model.to(memory_format=torch.channels_last)
        self.dim = int(self.encode_texts(["probe"]).shape[1])

    def _autocast(self):
        if self.use_fp16:
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def prepare(self, image: Pixels) -> torch.Tensor:
        """The per-image half of preprocessing (the indexer runs it while decoding; see ImagePreparer)."""
        return self.preparer(image)

    def pixels_as_floats(self, batch: torch.Tensor) -> torch.Tensor:
        """The image tower's input: `prepare` outputs (uint8) normalised; preprocessed floats as they are."""
        return self._pixels.normalise(batch) if batch.dtype == torch.uint8 else batch

    @torch.inference_mode()
    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a batch [n, 3, H, W] of `prepare` outputs (uint8) or of preprocessed floats."""
        with self.lock, self._autocast():
            batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            batch = self.pixels_as_floats(batch)  # float ops keep the channels-last layout
            features = torch.nn.functional.normalize(self._image_tower(batch), dim=-1)
        return features.float().cpu().numpy()

    def _image_tower(self, batch: torch.Tensor) -> torch.Tensor:
        """On CPU, the image tower traced and frozen into TorchScript on first use.

        Frozen batch norms and no Python dispatch per layer: measured 107 -> 135 images/s
        at batch 4, outputs equal to 1e-5. Any model that cannot be traced runs eagerly.
        A compressed variant runs its ONNX tower.
        """
        if self.towers is not None:
            return torch.from_numpy(self.towers.image(batch.numpy()))
        if self._traced_visual is None and self.device.type == "cpu":
            self._traced_visual = _trace(self.model.visual, batch) or self.model.visual
        return (self._traced_visual or self.model.visual)(batch)

    @property
    def image_batch_size(self) -> int:
        """GPUs want large batches; on a CPU the best size depends on the model: measured by the
        indexer (batch_size.py) and set as `cpu_batch_size`, 4 until then."""
        return 128 if self.device.type == "cuda" else self.cpu_batch_size or batch_size.DEFAULT

    def encode_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch_size = batch_size or self.image_batch_size
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            out.append(self.encode_image_tensors(stack([self.prepare(im) for im in chunk])))
        return np.concatenate(out)

    def _text_tower(self, tokens: torch.Tensor) -> torch.Tensor:
        """On CPU, the text tower traced into TorchScript once it has proven itself on another
        shape (lengths and batch sizes vary): measured 6.4 -> 5.4 ms per query, outputs equal.
        A compressed variant runs its ONNX tower, where it has one (onnx_towers._exports_text)."""
        if self.towers is not None and self.towers.text_session is not None:
            return torch.from_numpy(self.towers.text(tokens.cpu().numpy()))
        if self._traced_text is None and self.device.type == "cpu":
            tower = _TextTower(self.model)
            self._traced_text = _trace(tower, tokens, check=self.tokenize(SHAPE_CHECK)) or tower
        return (self._traced_text or _TextTower(self.model))(tokens)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Tokens padded to the longest text of the batch, not the context length, where the tower
        allows it (see `pad_token_id`): the vectors are the same, ~5x cheaper."""
        tokens = self.tokenizer(list(texts))
        pad = self.pad_token_id
        if pad is not None:
            positions = torch.arange(1, tokens.shape[1] + 1)
            longest = int(torch.where(tokens != pad, positions, 0).max())  # the last token that is not padding
            tokens = tokens[:, :max(1, longest)]
        return tokens.to(self.device)

    @property
    def pad_token_id(self) -> int | None:
        """The padding token of a tower whose vectors do not depend on trailing padding, else None:
        Hugging Face towers mask it; CLIP's own towers are causal (no token sees those after it) and
        pool at the end token, so cutting the padding after it changes nothing (_TextTower)."""
        from open_clip.hf_model import HFTextEncoder

        if isinstance(getattr(self.model, "text", None), HFTextEncoder):
            return self.model.text.config.pad_token_id
        return 0 if _causal_clip_text(self.model) else None

    @property
    def trims_padding(self) -> bool:
        return self.pad_token_id is not None

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths share a batch
        out = np.zeros((len(texts), 0), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            with self.lock, self._autocast():
                features = torch.nn.functional.normalize(self._text_tower(self.tokenize([texts[i] for i in rows])),
                                                         dim=-1)
            if out.shape[1] == 0:
                out = np.zeros((len(texts), features.shape[1]), dtype=np.float32)
            out[rows] = features.float().cpu().numpy()
        return out


class _TextTower(torch.nn.Module):
    """open_clip's text path as one module (CLIP keeps it in several attributes, HF towers in .text).

    CLIP's own causal towers take tokens cut after the longest text (Encoder.tokenize): the steps of
    open_clip's CLIP.encode_text, with its positional embedding and causal mask cut to those positions,
    whose outputs the cut padding never reached (ViT-B-32's context is 77 tokens; a query, ~10).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        if not _causal_clip_text(model):
            return model.encode_text(tokens)
        from open_clip.transformer import text_global_pool

        length = tokens.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        if model.text_projection is None:
            return x
        return model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection


def _causal_clip_text(model: torch.nn.Module) -> bool:
    """open_clip's CLIP class with a causal text mask, pooled at the end token (ViT-B-32 and the other CLIPs)."""
    from open_clip.model import CLIP

    return isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None and \
        getattr(model, "text_pool_type", None) in ("argmax", "eos")


SHAPE_CHECK = ["a", "two dogs play in the snow beside a red fence while a man watches them"]


def _trace(module: torch.nn.Module, example: torch.Tensor, check: torch.Tensor | None = None) -> torch.nn.Module | None:
    """TorchScript for `module`, or None where tracing fails or the trace disagrees with eager
    execution on `check` (an input of another shape), so a wrong trace is never used."""
    import warnings

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(module.eval(), example))
            if check is not None and not torch.allclose(traced(check), module(check), atol=1e-4):
                raise RuntimeError("the trace does not generalise to other input shapes")
        return traced
    except Exception as err:  # an exotic tower: eager is correct, only slower
        log.warning("%s runs eagerly (tracing: %s)", type(module).__name__, err)
        return None


def load_encoder(name: str = CURRENT_DEFAULT_MODEL, device: str = "auto", tower_dir: Path | None = None) -> Encoder:
    """Load any supported model by its recorded name (see model_names.py for the forms).

    Names are literal here: a build's recorded "crossmodal-lite" is version 1 (see model_names.py);
    a user's request for the alias is resolved by the builder before it gets here. A compressed
    variant's towers are exported into `tower_dir` once, or into a temporary folder (onnx_towers.py).
    """
    check_model_name(name)
    base, variant = split_variant(name)
    torch_device = pick_device(device)
    if variant and torch_device.type != "cpu":
        log.warning("%s is a CPU variant: it runs on the CPU (the plain model uses the GPU)", name)
        torch_device = torch.device("cpu")
    encoder = Encoder(name, *_load_model(base, torch_device), torch_device)
    if variant:
        from crossmodal.indexer import onnx_towers

        try:
            encoder.towers = onnx_towers.load(encoder, variant, tower_dir)
        except onnx_towers.VariantUnavailable as err:
            raise ValueError(f"cannot load model {name!r}: {err}") from err
    log.info("loaded encoder %s on %s", name, torch_device)
    return encoder


def _load_model(name: str, torch_device: torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, preprocess, tokenizer) of a model name without variant."""
    import open_clip

    _quiet_model_loading()
    version = default_model_version(name)
    if version:
        model, preprocess, tokenizer = create_default_model(torch_device, version=version)
    else:
        spec = ModelSpec.parse(name)
        if spec.pretrained and not os.path.isfile(spec.pretrained) and "/" in spec.pretrained:
            raise FileNotFoundError(f"checkpoint file not found: {spec.pretrained}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch, pretrained=spec.pretrained, device=torch_device
            )
        except RuntimeError as err:
            raise ValueError(f"cannot load model {name!r}: {err}") from err
        tokenizer = open_clip.get_tokenizer(spec.arch)
        model = model.eval()
    return model, preprocess, tokenizer
