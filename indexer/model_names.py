"""Model names, without torch: the default model's name and files, open_clip's name forms,
and the check that refuses a name without weights.

Commands that only read or check a name (an unchanged re-run of `crossmodal index`, the
service validating a rebuild request) import this, not the encoder, so they import neither
torch nor open_clip. The forms:
- "crossmodal-lite": the offline default (see default_model.py), an alias of its current
  version ("crossmodal-lite-2"); earlier versions stay loadable by their versioned name;
- "ARCH:TAG", e.g. "ViT-B-32:laion2b_s34b_b79k": open_clip pretrained weights (downloads);
- "ARCH:/path/to/checkpoint.pt": a local checkpoint of an open_clip architecture;
- "local-dir:/path" or "hf-hub:org/repo": open_clip's own schemas;
- any of these + "+VARIANT": the same weights compressed for the CPU (onnx_towers.py), e.g.
  "crossmodal-lite+int8". A variant's vectors differ slightly from the model's, so the variant is
  part of the name a build records, and its vectors never share an index with another's.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from crossmodal.indexer.settings import DATA_DIR

DEFAULT_MODEL_NAME = "crossmodal-lite"  # what users ask for: always the current version
DEFAULT_MODEL_VERSIONS = ("crossmodal-lite-1", "crossmodal-lite-2", "crossmodal-lite-3", "crossmodal-lite-4")  # each a folder under MODELS_DIR
CURRENT_DEFAULT_MODEL = DEFAULT_MODEL_VERSIONS[-1]
MODELS_DIR = DATA_DIR / "models"
MODEL_DIR = MODELS_DIR / CURRENT_DEFAULT_MODEL
CONFIG_FILE_NAME = "open_clip_config.json"  # in each version's folder
# Compressed CPU variants (onnx_towers.py): both towers in ONNX Runtime, float32 or with int8 matrix products.
VARIANTS = ("onnx", "int8")


def read_config(version: str = CURRENT_DEFAULT_MODEL) -> dict[str, Any]:
    """A crossmodal-lite version's config: its open_clip model config plus our `crossmodal` settings."""
    return json.loads((MODELS_DIR / version / CONFIG_FILE_NAME).read_text())


def split_variant(name: str) -> tuple[str, str | None]:
    """("crossmodal-lite-2", "int8") for "crossmodal-lite-2+int8"; (name, None) for a name without one."""
    base, plus, variant = name.rpartition("+")
    return (base, variant) if plus and variant in VARIANTS else (name, None)


def resolve_model_name(name: str) -> str:
    """The name a build records for a requested name: the alias becomes the current version.

    Builds and stored embeddings are keyed by model name, so a new version of the default
    model must never share a name with vectors of an older one.
    """
    base, variant = split_variant(name)
    base = CURRENT_DEFAULT_MODEL if base == DEFAULT_MODEL_NAME else base
    return f"{base}+{variant}" if variant else base


def default_model_version(recorded: str) -> str | None:
    """Which default model version a recorded (or resolved) name loads; None for open_clip models.

    Builds made before versions existed recorded the bare alias: they hold version 1's vectors.
    A variant loads its version's weights.
    """
    recorded = split_variant(recorded)[0]
    if recorded == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_VERSIONS[0]
    return recorded if recorded in DEFAULT_MODEL_VERSIONS else None


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
    _, plus, tail = name.rpartition("+")
    if plus and re.fullmatch(r"[a-z0-9]+", tail) and tail not in VARIANTS:
        raise ValueError(f"model {name!r} names an unknown variant {tail!r}: the variants are {', '.join(VARIANTS)}")
    name = split_variant(name)[0]
    if default_model_version(name) or name.startswith(("hf-hub:", "local-dir:")):
        return
    spec = ModelSpec.parse(name)
    if not spec.pretrained:
        raise ValueError(f"model {name!r} names an architecture without weights: add a pretrained tag "
                         f"({spec.arch}:TAG, e.g. ViT-B-32:laion2b_s34b_b79k) or a checkpoint ({spec.arch}:/path.pt)")
