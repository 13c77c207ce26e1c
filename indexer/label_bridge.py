"""The label bridge: a second route from an image into the text space, through the image
tower's own ImageNet classifier.

The trained heads learned the shared space from 30,000 Flickr captions, which never name most
everyday things; the image tower's ImageNet head (the `_fc` layer its wheel ships) separates
1,000 object classes. The bridge turns an image's class probabilities into the mix of those
class names' text embeddings; a text's bridge vector is its own text-tower embedding (the
last layer's mean). Both routes give unit vectors, and the model outputs their concatenation
scaled by sqrt(1 - w) and sqrt(w): one inner product is then (1 - w) cos_heads + w cos_bridge,
so FAISS, the hubness correction and every search path work unchanged.

From version 4 on, a text's w follows how unlike the training captions it is (Familiarity): the
heads never learned "gramophone", so such a text leans on the bridge, while a Flickr-like caption
keeps the model's w. An image's w is always the model's.
"""
from __future__ import annotations

import torch
from torch import nn

# "a photo of a {}." alone, as the model card's zero-shot baseline used; templates are averaged.
CLASS_TEMPLATES = ("a photo of a {}.",)


def class_names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def defined_class_texts(names: list[str], definitions: list[str]) -> list[str]:
    """Each class name with its WordNet definition: "impala: African antelope with ridged curved horns"
    brings the class near a glossed query's "gerenuk: slender East African antelope ..." (glossary.py).
    Averaged with CLASS_TEMPLATES' embedding: caltech101-dev +0.03 precision@10, Flickr8k dev unchanged."""
    return [f"a photo of a {n}. {n}: {d}." for n, d in zip(names, definitions)]


class Familiarity(nn.Module):
    """How much a text leans on the bridge, from how far it is from the captions the heads learned from.

    The heads know only Flickr8k's words: "a photo of a gramophone." is nearer no shipped training
    caption than 0.43 (cosine of the text tower's last-layer means); two thirds of Flickr8k dev's
    captions are nearer one than 0.6, and 2 % are at 0.45 or below. A text's bridge share rises
    linearly from the model's `weight` at similarity `familiar` to `unfamiliar_weight` at
    `unfamiliar` and below. `captions` are unit embeddings of a sample of the training captions
    (train.familiar_captions).
    """

    def __init__(self, captions: torch.Tensor, unfamiliar_weight: float, unfamiliar: float, familiar: float):
        super().__init__()
        self.register_buffer("captions", captions.float())
        self.unfamiliar_weight = float(unfamiliar_weight)
        self.unfamiliar, self.familiar = float(unfamiliar), float(familiar)

    def settings(self) -> dict:
        """As the model config's `label_bridge.unfamiliar` records them (read back by from_settings)."""
        return {"weight": self.unfamiliar_weight, "similarity": [self.unfamiliar, self.familiar],
                "captions": len(self.captions)}

    @classmethod
    def from_settings(cls, settings: dict, width: int) -> "Familiarity":
        """From the config's record; the captions themselves load with the heads."""
        return cls(torch.zeros(settings["captions"], width), settings["weight"], *settings["similarity"])

    def weight(self, texts: torch.Tensor, weight: float) -> torch.Tensor:
        nearest = (texts @ self.captions.T).amax(dim=-1, keepdim=True)
        strangeness = ((self.familiar - nearest) / (self.familiar - self.unfamiliar)).clamp(0, 1)
        return weight + (self.unfamiliar_weight - weight) * strangeness


class LabelBridge(nn.Module):
    """Image features -> ImageNet probabilities -> mix of class-name text embeddings.

    `class_text` rows are unit text embeddings of the class names (the text tower's last-layer
    mean, averaged over CLASS_TEMPLATES), centred: their mean (`center`) is what "a photo of a"
    contributes to every one of them, and removing it from both sides sharpens the cosine (on
    caltech101-dev, bridge alone: image->caption top-1 0.425 -> 0.490). `width` is that part's
    width in the text pooler's output. `temperature` softens the ImageNet softmax: at 2 the
    runner-up classes count too, so a gerenuk photo mixes impala with gazelle, and a class
    ImageNet lacks finds its neighbours (bridge alone on caltech101-dev: precision@10 0.657 -> 0.720).
    """

    def __init__(self, classifier: nn.Linear, class_text: torch.Tensor, center: torch.Tensor, width: int,
                 weight: float, temperature: float = 1.0, familiar: Familiarity | None = None):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_text", class_text.float())
        self.register_buffer("center", center.float())
        self.width, self.weight, self.temperature = width, float(weight), float(temperature)
        self.familiar = familiar

    @classmethod
    def centred(cls, classifier: nn.Linear, names: torch.Tensor, weight: float, temperature: float = 1.0,
                familiar: Familiarity | None = None) -> "LabelBridge":
        """From unit class-name embeddings, as class_text_from_pooled returns them."""
        center = names.mean(dim=0)
        return cls(classifier, nn.functional.normalize(names - center, dim=-1), center, names.shape[1], weight,
                   temperature, familiar)

    def image(self, pooled: torch.Tensor) -> torch.Tensor:
        probs = (self.classifier(pooled) / self.temperature).softmax(dim=-1)
        return nn.functional.normalize(probs @ self.class_text, dim=-1)

    def text(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self._last_layer(pooled) - self.center, dim=-1)

    def text_weight(self, pooled: torch.Tensor) -> torch.Tensor | float:
        """The bridge's share for each text: `weight`, or more for texts unlike any training caption."""
        if self.familiar is None:
            return self.weight
        return self.familiar.weight(self._last_layer(pooled), self.weight)

    def _last_layer(self, pooled: torch.Tensor) -> torch.Tensor:
        """A text's own embedding: the pooler's last-layer mean, at unit length."""
        return nn.functional.normalize(pooled[:, :self.width], dim=-1)

    def fused(self, heads: torch.Tensor, pooled: torch.Tensor, kind: str) -> torch.Tensor:
        """A tower's output: its head's projection of `pooled` beside its own route through the bridge."""
        if kind == "image":
            return self.fuse(heads, self.image(pooled))
        return self.fuse(heads, self.text(pooled), self.text_weight(pooled))

    def fuse(self, heads: torch.Tensor, bridge: torch.Tensor,
             weight: torch.Tensor | float | None = None) -> torch.Tensor:
        """`weight`: the bridge's share, one for all rows (the model's) or one a row ([n, 1], text_weight's)."""
        heads = nn.functional.normalize(heads, dim=-1)
        weight = torch.as_tensor(self.weight if weight is None else weight, dtype=heads.dtype)
        return torch.cat([(1 - weight).sqrt() * heads, weight.sqrt() * bridge], dim=-1)


class FusedHead(nn.Module):
    """A tower's projection head with the bridge beside it: what open_clip calls `proj`."""

    def __init__(self, proj: nn.Module, bridge: LabelBridge, kind: str):
        super().__init__()
        self.proj, self.bridge, self.kind = proj, bridge, kind

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.bridge.fused(self.proj(pooled), pooled, self.kind)


def class_text_from_pooled(pooled: torch.Tensor, width: int) -> torch.Tensor:
    """Unit class-name embeddings from the text pooler's outputs, [templates, classes, pool width]:
    each template's last-layer mean (the first `width` features) at unit length, averaged over
    the templates (CLASS_TEMPLATES)."""
    return nn.functional.normalize(nn.functional.normalize(pooled[..., :width].float(), dim=-1).mean(dim=0), dim=-1)
