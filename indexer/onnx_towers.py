"""Compressed CPU variants of a model (issue 18): its towers run by ONNX Runtime, in float32
("+onnx"), or with int8 weights in the image tower's matrix products ("+int8": ONNX Runtime's
dynamic quantization, weights int8 per tensor, activations quantized per batch). CLIP's own text
towers stay the model's (see `_exports_text`).

A variant is named after its model ("crossmodal-lite+int8", "ViT-B-32:laion2b_s34b_b79k+int8";
see model_names.py), and the name is what a build records, so one index never mixes its vectors
with another variant's. Measured side by side in tests/benchmarks/compressed_encoders.py:
- int8 runs open_clip's ViT-B-32 image tower 2.5x as fast as float32 on this CPU;
- crossmodal-lite's image tower is mostly convolutions, which are left in float32: ONNX Runtime's
  int8 convolutions ran it 10x slower and moved its vectors to a cosine of 0.82;
- text towers stay float32 for the captions a build indexes: the int8 MiniLM, quantized as the
  image towers are (per tensor, every matrix product), moved caption vectors to a cosine of 0.24.
  Text queries get their own int8 tower, quantized with more care (`quantize_query_tower`), whatever
  the variant (onnx_text.py).
A quantized tower whose vectors stray from the model's on probe photos is refused at export.

The towers are exported once per model, torch and ONNX Runtime version (onnx_text.key) into
`tower_dir` (Settings.compressed_tower_dir, in the index directory), or into a temporary folder where none
is given. Variants run on the CPU, even beside a GPU: that is what they are for.
"""
from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crossmodal.indexer import onnx_text

if TYPE_CHECKING:
    import torch

    from crossmodal.indexer.encoder import Encoder

log = logging.getLogger(__name__)

AGREEMENT = 0.9999  # least cosine between a float32 export's vectors and the model's
INT8_AGREEMENT = 0.995  # least cosine between int8 and float32 image vectors on the probes (0.9996-0.9998 seen)


class VariantUnavailable(RuntimeError):
    """A model whose towers ONNX cannot reproduce: its variants are refused, not run wrong."""


@dataclass
class OnnxTowers:
    """A model's towers in ONNX Runtime: unnormalised vectors, as the model's towers return them.
    No text file: the text tower stays the model's (see `_exports_text`)."""

    image_file: Path
    text_file: Path | None
    _keep: object = field(default=None, repr=False)  # the temporary folder the files live in, if any

    def __post_init__(self) -> None:
        self.image_session = onnx_text.inference_session(self.image_file)
        self.text_session = onnx_text.inference_session(self.text_file) if self.text_file else None

    def image(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed float32 pixels [n, 3, H, W] -> image vectors."""
        return self.image_session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def text(self, tokens: np.ndarray) -> np.ndarray:
        """Token ids [n, length] -> text vectors."""
        return self.text_session.run(None, {"tokens": tokens.astype(np.int64)})[0]


def load(encoder: Encoder, variant: str, tower_dir: Path | None) -> OnnxTowers:
    """`encoder`'s towers as `variant`: exported (and quantized) unless `tower_dir` holds them already."""
    keep = None
    if tower_dir is None:
        keep = tempfile.TemporaryDirectory(prefix="crossmodal-towers-")
        tower_dir = Path(keep.name)
    base = tower_dir / onnx_text.key(encoder.name, onnx_text.installed_torch_version() or "")
    image_file = base.with_name(f"{base.name}.image.onnx")
    text_file = base.with_name(f"{base.name}.text.onnx") if _exports_text(encoder) else None
    if not image_file.is_file() or (text_file and not text_file.is_file()):
        tower_dir.mkdir(parents=True, exist_ok=True)
        log.info("exporting the towers of %s to ONNX (once per model)", encoder.name)
        _export(encoder, variant, image_file, text_file)
    return OnnxTowers(image_file, text_file, keep)


def _exports_text(encoder: Encoder) -> bool:
    """Whether the text tower runs in ONNX Runtime too. Not CLIP's own causal towers: ONNX's attention keeps
    the token count it was traced at, and the model runs them faster on only the tokens a query has
    (encoder._TextTower: ViT-B-32, 20 ms a query against 38-47 ms for ONNX at the full 77)."""
    from crossmodal.indexer.encoder import _causal_clip_text

    return not _causal_clip_text(encoder.model)


def _export(encoder: Encoder, variant: str, image_file: Path, text_file: Path | None) -> None:
    """The towers, checked against the model on inputs of other shapes than the export's; for int8, the
    image tower quantized and checked again. Files appear complete or not at all."""
    import os

    from crossmodal.indexer.encoder import SHAPE_CHECK, _TextTower

    pixels = _probe_pixels(encoder)
    probes = {"image": (encoder.model.visual, pixels[:1], pixels, image_file, "pixels")}
    if text_file:
        tokens, other_tokens = (encoder.tokenize(texts).cpu() for texts in (SHAPE_CHECK, ["a", "two dogs", "a cat"]))
        probes["text"] = (_TextTower(encoder.model), tokens, other_tokens, text_file, "tokens")
    for tower, (module, example, check, final, input_name) in probes.items():
        partial = final.with_name(f"{final.name}.{os.getpid()}.partial")
        try:
            _export_checked(module, example, check, partial, input_name, tower, variant == "int8" and tower == "image")
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)


def _export_checked(module, example, check, path: Path, input_name: str, tower: str, quantize: bool) -> None:
    import torch

    try:
        onnx_text.export_tower(module, example, path, input_name)
    except Exception as err:  # an operator ONNX has no form for, a tracing failure: no variant
        raise VariantUnavailable(f"the {tower} tower cannot be exported to ONNX ({type(err).__name__}: {err})") from err
    with torch.inference_mode():
        expected = module.eval()(check).float().numpy()
    _check(path, input_name, check.numpy(), expected, AGREEMENT, f"the {tower} tower's ONNX export")
    if quantize:
        _quantize(path)
        _check(path, input_name, check.numpy(), expected, INT8_AGREEMENT, f"the int8 {tower} tower")


def _probe_pixels(encoder: Encoder) -> torch.Tensor:
    """Two preprocessed photos-to-be (noise; a gradient) as float32, the image tower's input."""
    from PIL import Image

    from crossmodal.indexer.pixels import stack

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)),
              Image.linear_gradient("L").convert("RGB").resize((320, 240))]
    batch = stack([encoder.prepare(image) for image in images])
    return encoder.pixels_as_floats(batch)


def _quantize(path: Path) -> None:
    """int8 weights for the matrix products (convolutions stay float32: see the module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(path.name + ".int8")
    try:
        with _without_preprocessing_advice():
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        quantized.replace(path)
    finally:
        quantized.unlink(missing_ok=True)


def quantize_query_tower(source: Path, target: Path) -> None:
    """`source`'s text tower with int8 weights, one scale per output column, in the matrix products that
    keep or widen the width (attention projections, feed-forward inputs). Those that narrow (feed-forward
    outputs) stay float32: they read the activations after GELU, whose outliers one int8 scale a batch
    cannot hold. crossmodal-lite-2 on 512 Flickr8k captions, cosine to float32 (least / mean): every
    matrix product, per tensor 0.15 / 0.29 (attention scores included); weights only, per tensor
    0.91 / 0.96; per column 0.987 / 0.994; without the narrowing ones 0.994 / 0.997, the shipped choice."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(source)).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    nodes = [node.name for node in graph.node if node.op_type == "MatMul" and any(
        len(shapes.get(name, ())) == 2 and shapes[name][0] <= shapes[name][1] for name in node.input)]
    if not nodes or not all(nodes):
        raise VariantUnavailable("the text tower has no named matrix products with weights to quantize")
    with _without_preprocessing_advice():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=nodes, per_channel=True)


class _PreprocessingAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider")


@contextmanager
def _without_preprocessing_advice():
    """ONNX Runtime's quantizer advises every call, on the root logger, to pre-process the model first
    (shape inference and fusions for static quantization); dynamic quantization has no use for it,
    and a user running `crossmodal index` even less."""
    advice = _PreprocessingAdvice()
    logging.getLogger().addFilter(advice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(advice)


def _check(path: Path, input_name: str, inputs: np.ndarray, expected: np.ndarray, least: float, what: str) -> None:
    try:
        got = onnx_text.inference_session(path).run(None, {input_name: inputs})[0]
    except Exception as err:  # e.g. a graph that kept the shape it was traced at
        raise VariantUnavailable(f"{what} fails on inputs of another shape ({type(err).__name__}: {err})") from err
    cosine = float(_cosines(got, expected).min())
    if not cosine >= least:
        raise VariantUnavailable(f"{what} disagrees with the model (cosine {cosine:.4f} < {least})")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)
