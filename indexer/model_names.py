"""Model names, without torch: the default model's name and files, open_clip's name forms,
and the check that refuses a name without weights.

Commands that only read or check a name (an unchanged re-run of `crossmodal index`, the
service validating a rebuild request) import this, not the encoder, so they import neither
torch nor open_clip. The forms:
- "crossmodal-lite": the offline default (see default_model.py);
- "ARCH:TAG", e.g. "ViT-B-32:laion2b_s34b_b79k": open_clip pretrained weights (downloads);
- "ARCH:/path/to/checkpoint.pt": a local checkpoint of an open_clip architecture;
- "local-dir:/path" or "hf-hub:org/repo": open_clip's own schemas.
"""
from __future__ import annotations

from dataclasses import dataclass

from crossmodal.indexer.settings import DATA_DIR

DEFAULT_MODEL_NAME = "crossmodal-lite"
MODELS_DIR = DATA_DIR / "models"
MODEL_DIR = MODELS_DIR / DEFAULT_MODEL_NAME


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: open_clip architecture plus optional pretrained tag or file."""

    arch: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, name: str) -> "ModelSpec":
        if name.startswith(("hf-hub:", "local-dir:")) or ":" not in name:
            return cls(name)
        arch, _, pretrained = name.partition(":")
        return cls(arch, pretrained or None)


def check_model_name(name: str) -> None:
    """Refuse a name that would build a randomly initialised network, before any work.

    open_clip happily creates "RN50" with no weights: its vectors are meaningless, and a
    build with it would discard every stored embedding of the real model. A model must be
    the default, carry a pretrained tag or checkpoint ("ARCH:TAG", "ARCH:/path.pt"), or be
    one of open_clip's schemas that bring their weights ("hf-hub:", "local-dir:").
    """
    if name == DEFAULT_MODEL_NAME or name.startswith(("hf-hub:", "local-dir:")):
        return
    spec = ModelSpec.parse(name)
    if not spec.pretrained:
        raise ValueError(f"model {name!r} names an architecture without weights: add a pretrained tag "
                         f"({spec.arch}:TAG, e.g. ViT-B-32:laion2b_s34b_b79k) or a checkpoint ({spec.arch}:/path.pt)")
