"""Train the heads of `crossmodal-lite` (LiT-style: frozen pretrained towers, trained projections).

Tower features are computed once and cached, so training itself takes seconds per
epoch on a CPU. Settings are chosen on the dev split; the best dev epoch is kept. The label
bridge (label_bridge.py) is then fused beside the heads, the hubness bank is embedded from
training data with the fused model and its strength chosen on dev (see hubness.py), and the
bridge alone is measured as the zero-shot baseline. Given a zero-shot classes folder
(caltech101-dev), each seed is also measured there; it is never trained on. The training
captions' words become the glossary's known words (glossary.py); dev and zero-shot texts are
measured glossed, as the model will encode them.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from crossmodal.indexer import glossary
from crossmodal.indexer.collection import decode_image, read_captions
from crossmodal.indexer.default_model import HEADS_FILE_NAME, _package_dir, create_default_model, image_classifier
from crossmodal.indexer.encoder import Encoder
from crossmodal.indexer.evaluate import recall_at_k
from crossmodal.indexer.hubness import BANK_FILE_NAME, HubnessBank
from crossmodal.indexer.label_bridge import (CLASS_TEMPLATES, Familiarity, LabelBridge, class_names,
                                             class_text_from_pooled, defined_class_texts)
from crossmodal.indexer.model_names import CONFIG_FILE_NAME, MODEL_DIR, read_config
from crossmodal.indexer.prefetch import prefetched_batches

log = logging.getLogger(__name__)
VIEWS = ("center", "flip", "zoom", "zoomflip")  # cached augmented views of each training image
ZOOM = 0.8  # the zoom views keep the central 80% of the image (measured: +0.9 T->I R@1 on dev)
GLOSSARY_FILE_NAME = "glossary.txt"
BANK_SIZE = 2048  # bank queries per modality: 2 MB each at float16
HUBNESS_K = 10  # capped by the bank's size
HUBNESS_BETAS = (0.3, 0.5, 0.7)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.1
    input_dropout: float = 0.3
    warmup_epochs: float = 1.0
    seed: int = 0
    # Levers of the ImageNet head (see the model card of crossmodal-lite-2 for what each one measured).
    # Shipped: the bridge alone; the two training levers lift zero-shot search less than they cost on Flickr8k.
    pseudo_caption_min_prob: float = 0.0  # > 0: photos the head calls a class this surely get "a photo of a NAME."
    distil_weight: float = 0.0  # > 0: extra InfoNCE term pairing each class's direction with its name
    bridge_weight: float = 0.3  # the label bridge's share of the score (label_bridge.py); 0: heads alone
    bridge_temperature: float = 2.0  # of the ImageNet softmax; version 3 and before: 1
    unfamiliar_bridge_weight: float | None = 0.8  # a text unlike every training caption's share; None: bridge_weight
    familiar_similarity: tuple[float, float] = (0.45, 0.6)  # unfamiliar at or below the first; familiar from 2nd
    familiar_captions: int = 4096  # training captions the model keeps to measure that (float16: 3 MB)
    glossary: bool = True  # gloss words the training captions never used (glossary.py)
    class_definitions: bool = True  # the bridge's class names embedded with their WordNet definitions too


def _split_pairs(split_dir: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """Image names, caption->image row, caption texts of a Flickr-style split folder."""
    captions = read_captions(split_dir / "captions.tsv")
    names = sorted({image for image, _ in captions.rows})
    row = {name: i for i, name in enumerate(names)}
    caption_image = np.array([row[image] for image, _ in captions.rows])
    return names, caption_image, [text for _, text in captions.rows]


@functools.lru_cache(maxsize=1)
def _feature_model(device: torch.device):
    """The frozen towers only: projections replaced by identity, so outputs are tower features.
    Loaded once a run: each split, the class names and the glossed texts need it."""
    model, preprocess, tokenizer = create_default_model(device, load_heads=False)
    model.visual.head.proj = nn.Identity()
    model.text.proj = nn.Identity()
    return model.to(memory_format=torch.channels_last), preprocess, tokenizer


def _view(image: Image.Image, view: str) -> Image.Image:
    if view.startswith("zoom"):
        w, h = image.size
        low, high = (1 - ZOOM) / 2, (1 + ZOOM) / 2
        image = image.crop((int(w * low), int(h * low), int(w * high), int(h * high)))
    return ImageOps.mirror(image) if view.endswith("flip") else image


def feature_cache_file(cache_dir: Path, split: str, views: tuple[str, ...]) -> Path:
    """Named after what made the features (towers, pooling, views), so a changed recipe never reuses them.

    Only the towers' part of the config counts: settings of the heads or the score fusion do not
    change tower features, and recomputing them costs 20 minutes on a 2-core CPU.
    """
    import hashlib

    config = read_config()
    towers = [config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"], config["preprocess_cfg"],
              {k: config["crossmodal"][k] for k in ("image_backbone_package", "text_pool_width")}]
    recipe = json.dumps([towers, views, ZOOM], sort_keys=True).encode()
    return cache_dir / f"{split}-{hashlib.sha256(recipe).hexdigest()[:12]}.npz"


@torch.inference_mode()
def cache_features(split_dir: Path, cache_file: Path, device: torch.device, views: tuple[str, ...],
                   batch_size: int = 8) -> dict[str, np.ndarray]:
    if cache_file.exists():
        return dict(np.load(cache_file))
    model, preprocess, tokenizer = _feature_model(device)
    names, caption_image, texts = _split_pairs(split_dir)

    def load(name: str) -> torch.Tensor:
        path = split_dir / "images" / name
        image = decode_image(path.read_bytes(), max_pixels=10**9)
        return torch.stack([preprocess(_view(image, v)) for v in views])

    image_features = []
    for batch in tqdm(prefetched_batches(names, load, batch_size), total=math.ceil(len(names) / batch_size),
                      desc=f"image features {split_dir.name}", unit="batch"):
        tensors = torch.stack([t for _, t in batch])  # [n, views, 3, H, W]
        n, v = tensors.shape[:2]
        pixels = tensors.flatten(0, 1).to(device).contiguous(memory_format=torch.channels_last)
        feats = model.encode_image(pixels, normalize=False).float().cpu()
        image_features.append(feats.view(n, v, -1).transpose(0, 1).numpy())
    result = {"image": np.concatenate(image_features, axis=1),
              "text": _text_features(texts, device, f"text features {split_dir.name}"),
              "caption_image": caption_image}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, **result)
    return result


@functools.lru_cache(maxsize=1)
def _text_towers(device: torch.device) -> Encoder:
    """The frozen towers as an Encoder, for its tokenizer and width; built once a run, since its
    constructor runs a probe text through the tower."""
    return Encoder("towers", *_feature_model(device), device)


@torch.inference_mode()
def _text_features(texts: list[str], device: torch.device, desc: str | None = None) -> np.ndarray:
    """Frozen text-tower features [len(texts), pool width], in batches of similar lengths (a progress
    bar named `desc`, if given)."""
    towers = _text_towers(device)
    order = np.argsort([len(t) for t in texts], kind="stable")
    features = np.zeros((len(texts), towers.dim), dtype=np.float32)
    for start in tqdm(range(0, len(texts), 256), desc=desc, unit="batch", disable=desc is None):
        rows = order[start:start + 256]
        tokens = towers.tokenize([texts[i] for i in rows])
        features[rows] = towers.model.encode_text(tokens, normalize=False).float().cpu().numpy()
    return features


# The bridge's templates first: its class-name embeddings come from the same encoded features.
DISTIL_TEMPLATES = (*CLASS_TEMPLATES, "a close-up photo of a {}.", "a {} in the picture.", "a photo of the {}.", "{}")


@dataclass
class ImageNetHead:
    """What the image tower's ImageNet head (`_fc`) offers training: its weights, the class names'
    text-tower features under DISTIL_TEMPLATES, and the bridge's class-name embeddings."""

    weight: torch.Tensor  # [1000, image feature width]
    bias: torch.Tensor
    name_features: np.ndarray  # [templates, 1000, text pool width]
    bridge_text: torch.Tensor  # [1000, bridge width], unit rows (label_bridge.CLASS_TEMPLATES)
    defined_bridge_text: torch.Tensor  # the same averaged with each name followed by its definition

    def probabilities(self, image_features: np.ndarray) -> np.ndarray:
        return (torch.from_numpy(image_features) @ self.weight.T + self.bias).softmax(-1).numpy()

    def bridge(self, weight: float, definitions: bool = True, temperature: float = 1.0,
               familiar: Familiarity | None = None) -> LabelBridge:
        classifier = nn.Linear(self.weight.shape[1], self.weight.shape[0])
        classifier.load_state_dict({"weight": self.weight, "bias": self.bias})
        return LabelBridge.centred(classifier, self.defined_bridge_text if definitions else self.bridge_text, weight,
                                   temperature, familiar)


def model_bridge(head: ImageNetHead, cfg: TrainConfig, train: dict[str, np.ndarray]) -> LabelBridge | None:
    """The bridge `cfg` ships beside the heads (None: heads alone)."""
    if not cfg.bridge_weight:
        return None
    familiar = None
    if cfg.unfamiliar_bridge_weight is not None:
        familiar = Familiarity(familiar_captions(train["text"], cfg.familiar_captions, head.bridge_text.shape[1]),
                               cfg.unfamiliar_bridge_weight, *cfg.familiar_similarity)
    return head.bridge(cfg.bridge_weight, cfg.class_definitions, cfg.bridge_temperature, familiar)


def familiar_captions(text_features: np.ndarray, count: int, width: int) -> torch.Tensor:
    """A fixed sample of the training captions' unit last-layer means, rounded to float16 as shipped."""
    rows = np.sort(np.random.default_rng(0).choice(len(text_features), min(count, len(text_features)), replace=False))
    sample = nn.functional.normalize(torch.from_numpy(text_features[rows, :width]).float(), dim=-1)
    return sample.half().float()


@torch.inference_mode()
def imagenet_head(cache_dir: Path, device: torch.device) -> ImageNetHead:
    """Computed once (about 40 s of text encoding) and cached beside the tower features."""
    config = read_config()
    classifier = image_classifier(config["crossmodal"]["image_backbone_package"])
    width = config["crossmodal"]["text_pool_width"] // 2  # the pooler's first half is the last layer's mean
    names = class_names()
    features = _cached_text_features(cache_dir, "imagenet-names", DISTIL_TEMPLATES, device,
                                     [[t.format(n) for n in names] for t in DISTIL_TEMPLATES])
    defined = _cached_text_features(cache_dir, "imagenet-defined", ("defined",), device,
                                    [defined_class_texts(names, glossary.class_definitions())])
    plain = torch.from_numpy(features[:len(CLASS_TEMPLATES)])
    return ImageNetHead(classifier.weight.detach(), classifier.bias.detach(), features,
                        class_text_from_pooled(plain, width),
                        class_text_from_pooled(torch.cat([plain, torch.from_numpy(defined)]), width))


def _cached_text_features(cache_dir: Path, name: str, recipe: tuple[str, ...], device: torch.device,
                          texts: list[list[str]]) -> np.ndarray:
    """Frozen text-tower features [len(texts), len(texts[0]), pool width] of lists of texts, cached."""
    cache_file = feature_cache_file(cache_dir, name, recipe)
    if not cache_file.exists():
        features = np.stack([_text_features(group, device)
                             for group in tqdm(texts, desc=f"{name} features", unit="template")])
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, name_features=features)
    return np.load(cache_file)["name_features"]


def glossed_entries(train_captions: list[str]) -> list[str]:
    """What the model glosses (glossary.choose): its captions' words and its text tower's are known."""
    return glossary.choose(glossary.wordnet_definitions(), train_captions, _tower_words(), class_names())


def _tower_words() -> set[str]:
    """The whole words of the text tower's tokenizer (word pieces "##..." left out)."""
    from transformers import AutoTokenizer

    folder = _package_dir(read_config()["model_cfg"]["text_cfg"]["hf_tokenizer_name"])
    return {token for token in AutoTokenizer.from_pretrained(folder).get_vocab() if not token.startswith("##")}


@torch.inference_mode()
def glossed_features(feats: dict[str, np.ndarray], texts: list[str], words: glossary.Glossary,
                     device: torch.device) -> dict[str, np.ndarray]:
    """`feats` with the text features of texts the glossary changes re-encoded from the glossed text
    (a few hundred of Flickr8k dev's 5,000 captions: seconds, so not cached)."""
    glossed = words.expand_all(texts)
    changed = [i for i, (a, b) in enumerate(zip(glossed, texts)) if a != b]
    if not changed:
        return feats
    text = feats["text"].copy()
    text[changed] = _text_features([glossed[i] for i in changed], device)
    return {**feats, "text": text}


def class_directions(head: ImageNetHead, image_stats: tuple[np.ndarray, np.ndarray], norm: float) -> torch.Tensor:
    """One image feature per ImageNet class: the mean photo moved along the class's `_fc` row.

    In the heads' standardised space the move is std * row (the steepest rise of the class's
    logit per unit of standardised change), scaled to the typical length of a real photo's
    standardised feature; features are clamped at 0 because the tower's are (ReLU6, then pooled).
    """
    mean, std = (torch.from_numpy(x) for x in image_stats)
    move = head.weight * std[None, :]
    move = norm * move / move.norm(dim=1, keepdim=True)
    return (mean[None, :] + move * std[None, :]).clamp(min=0)


class Heads(nn.Module):
    """Standardise, drop out, project; standardisation is folded into the linear layers on export."""

    def __init__(self, image_stats, text_stats, dim: int = 512, dropout: float = 0.3):
        super().__init__()
        for prefix, (mean, std) in (("image", image_stats), ("text", text_stats)):
            self.register_buffer(f"{prefix}_mean", torch.as_tensor(mean))
            self.register_buffer(f"{prefix}_std", torch.as_tensor(std))
        self.image_proj = nn.Linear(len(image_stats[0]), dim)
        self.text_proj = nn.Linear(len(text_stats[0]), dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.dropout = nn.Dropout(dropout)

    def embed(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        x = (x - getattr(self, f"{kind}_mean")) / getattr(self, f"{kind}_std")
        return nn.functional.normalize(getattr(self, f"{kind}_proj")(self.dropout(x)), dim=-1)

    def folded(self) -> dict[str, torch.Tensor]:
        """Weights in open_clip's layout for crossmodal-lite (see default_model.py)."""
        out = {}
        for kind, key in (("image", "visual.head.proj"), ("text", "text.proj")):
            proj = getattr(self, f"{kind}_proj")
            weight = proj.weight / getattr(self, f"{kind}_std")[None, :]
            out[f"{key}.weight"] = weight.detach().clone().contiguous()
            out[f"{key}.bias"] = (proj.bias - weight @ getattr(self, f"{kind}_mean")).detach().clone().contiguous()
        out["logit_scale"] = self.logit_scale.detach().clone().reshape(())
        return out


def _stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0).astype(np.float32), (x.std(0) + 1e-6).astype(np.float32)


def embed_folded(heads: dict[str, torch.Tensor], features: np.ndarray, kind: str) -> np.ndarray:
    """What the model outputs for cached tower features, given exported heads."""
    key = "visual.head.proj" if kind == "image" else "text.proj"
    out = torch.from_numpy(features) @ heads[f"{key}.weight"].T + heads[f"{key}.bias"]
    return nn.functional.normalize(out, dim=-1).numpy()


def hubness_bank(embed, train: dict[str, np.ndarray], dev: dict[str, np.ndarray],
                 seed: int) -> tuple[HubnessBank, dict]:
    """Bank queries sampled from train; beta chosen on dev. Returns (bank, its dev metrics)."""
    rng = np.random.default_rng(seed)
    n_texts, n_images = len(train["text"]), train["image"].shape[1]
    texts = train["text"][np.sort(rng.choice(n_texts, min(BANK_SIZE, n_texts), replace=False))]
    images = train["image"][0][np.sort(rng.choice(n_images, min(BANK_SIZE, n_images), replace=False))]
    bank_text, bank_image = embed(texts, "text"), embed(images, "image")
    dev_image, dev_text = embed(dev["image"][0], "image"), embed(dev["text"], "text")
    best = None
    for beta in HUBNESS_BETAS:
        bank = HubnessBank(bank_text, bank_image, min(HUBNESS_K, len(bank_text), len(bank_image)), beta)
        metrics = corrected_recall(bank, dev_image, dev_text, dev["caption_image"])
        if best is None or rsum(metrics) > rsum(best[1]):
            best = (bank, metrics)
    return best


def corrected_recall(bank: HubnessBank, image: np.ndarray, text: np.ndarray, caption_image: np.ndarray) -> dict:
    """Recall with each gallery item's penalty folded in as one more dimension (exact, exhaustive)."""
    ones = lambda x: np.ones((len(x), 1), dtype=np.float32)  # noqa: E731
    image_gallery = np.hstack([image, -bank.penalties(image, "image")[:, None]])
    text_gallery = np.hstack([text, -bank.penalties(text, "text")[:, None]])
    return {"text_to_image": recall_at_k(image_gallery, np.hstack([text, ones(text)]), caption_image)["text_to_image"],
            "image_to_text": recall_at_k(np.hstack([image, ones(image)]), text_gallery, caption_image)["image_to_text"]}


def label_bridged_baseline(head: ImageNetHead, dev: dict[str, np.ndarray], temperature: float = 1.0) -> dict:
    """Zero-shot baseline with no trained parameters: the label bridge alone (label_bridge.py)."""
    embed = bridge_embedder(head, temperature)
    return recall_at_k(embed(dev["image"][0], "image"), embed(dev["text"], "text"), dev["caption_image"])


def bridge_embedder(head: ImageNetHead, temperature: float = 1.0):
    """embed(tower features, kind) through the label bridge alone, as feature_embedder does for the model."""
    bridge = head.bridge(1.0, temperature=temperature)

    def embed(features: np.ndarray, kind: str) -> np.ndarray:
        with torch.no_grad():
            pooled = torch.from_numpy(np.ascontiguousarray(features))
            return (bridge.image(pooled) if kind == "image" else bridge.text(pooled)).numpy()
    return embed


def evaluate_heads(heads: Heads, feats: dict[str, np.ndarray]) -> dict:
    heads.eval()
    with torch.no_grad():
        img = heads.embed(torch.from_numpy(feats["image"][0]), "image").numpy()
        txt = heads.embed(torch.from_numpy(feats["text"]), "text").numpy()
    return recall_at_k(img, txt, feats["caption_image"])


def rsum(metrics: dict) -> float:
    return sum(v for row in metrics.values() for v in row.values())


def _with_pseudo_captions(train: dict[str, np.ndarray], head: ImageNetHead | None,
                          min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """(text features, caption -> image) with "a photo of a NAME." added for photos the ImageNet head
    names with at least `min_prob` (none when min_prob is 0)."""
    if not min_prob or head is None:
        return train["text"], train["caption_image"]
    probs = head.probabilities(train["image"][0])
    sure = np.flatnonzero(probs.max(axis=1) >= min_prob)
    extra = head.name_features[0][probs[sure].argmax(axis=1)]
    log.info("pseudo-captions: %d of %d photos named with p >= %.2f", len(sure), len(probs), min_prob)
    return np.concatenate([train["text"], extra]), np.concatenate([train["caption_image"], sure])


def _contrastive(heads: Heads, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    logits = heads.logit_scale.exp().clamp(max=100) * img @ txt.T
    labels = torch.arange(len(img))
    return (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2


def train_heads(train: dict[str, np.ndarray], dev: dict[str, np.ndarray], cfg: TrainConfig,
                head: ImageNetHead | None = None):
    """Symmetric InfoNCE over all caption pairs (plus the ImageNet levers cfg switches on);
    returns (best heads, best dev metrics, history)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    image_stats = _stats(train["image"][0])
    heads = Heads(image_stats, _stats(train["text"]), dropout=cfg.input_dropout)
    decay = [p for n, p in heads.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in heads.named_parameters() if not n.endswith("weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    image_feats = torch.from_numpy(train["image"])  # [views, n_images, d]
    texts, pairs = _with_pseudo_captions(train, head, cfg.pseudo_caption_min_prob)
    text_feats, caption_image = torch.from_numpy(texts), torch.from_numpy(pairs)
    if cfg.distil_weight and head is not None:
        norm = float(np.median(np.linalg.norm((train["image"][0] - image_stats[0]) / image_stats[1], axis=1)))
        directions = class_directions(head, image_stats, norm)
        name_feats = torch.from_numpy(head.name_features)
    steps_per_epoch = len(text_feats) // cfg.batch_size
    total, warmup = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup)))))
    best, best_metrics, history = None, None, []
    for epoch in range(cfg.epochs):
        heads.train()
        order = torch.from_numpy(rng.permutation(len(text_feats)))
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            views = torch.from_numpy(rng.integers(0, image_feats.shape[0], len(idx)))
            loss = _contrastive(heads, heads.embed(image_feats[views, caption_image[idx]], "image"),
                                heads.embed(text_feats[idx], "text"))
            if cfg.distil_weight and head is not None:
                classes = torch.from_numpy(rng.choice(len(directions), 256, replace=False))
                templates = torch.from_numpy(rng.integers(0, len(name_feats), len(classes)))
                loss = loss + cfg.distil_weight * _contrastive(
                    heads, heads.embed(directions[classes], "image"), heads.embed(name_feats[templates, classes], "text"))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        metrics = evaluate_heads(heads, dev)
        history.append({"epoch": epoch + 1, "loss": float(loss.detach()), "dev": metrics})
        log.info("epoch %d loss %.3f dev %s", epoch + 1, float(loss.detach()), metrics)
        if best_metrics is None or rsum(metrics) > rsum(best_metrics):
            best, best_metrics = heads.folded(), metrics
    return best, best_metrics, history


def feature_embedder(heads: dict[str, torch.Tensor], bridge: LabelBridge | None):
    """embed(tower features, kind) -> what the exported model outputs for them (fused if bridged)."""
    def embed(features: np.ndarray, kind: str) -> np.ndarray:
        out = embed_folded(heads, features, kind)
        if bridge is None:
            return out
        with torch.no_grad():
            pooled = torch.from_numpy(np.ascontiguousarray(features))
            return bridge.fused(torch.from_numpy(out), pooled, kind).numpy()
    return embed


def zero_shot_on_features(embed, bank: HubnessBank | None, feats: dict[str, np.ndarray], texts: list[str]) -> dict:
    """The `crossmodal eval --zero-shot` figures, computed exhaustively on cached features."""
    from crossmodal.indexer.evaluate import class_metrics

    names = sorted(set(texts))
    first = {text: i for i, text in reversed(list(enumerate(texts)))}
    image_class = np.empty(feats["image"].shape[1], dtype=object)
    image_class[feats["caption_image"]] = texts
    images = embed(feats["image"][0], "image")
    classes = embed(feats["text"][[first[n] for n in names]], "text")
    image_penalty = bank.penalties(images, "image") if bank else 0.0
    class_penalty = bank.penalties(classes, "text") if bank else 0.0
    top = np.argsort(-(classes @ images.T - image_penalty), axis=1, kind="stable")[:, :10]
    hits = image_class[top] == np.array(names, dtype=object)[:, None]
    best = np.array(names, dtype=object)[np.argmax(images @ classes.T - class_penalty, axis=1)]
    return class_metrics(hits, best == image_class, names, list(image_class))


def export_heads(heads: dict[str, torch.Tensor], bridge: LabelBridge | None) -> dict[str, torch.Tensor]:
    """The heads file: with a bridge, each projection sits inside a FusedHead (default_model.py)."""
    if bridge is None:
        return heads
    out = {key.replace("visual.head.proj.", "visual.head.proj.proj.").replace("text.proj.", "text.proj.proj."): value
           for key, value in heads.items()}
    for name in ("class_text", "center"):
        out[f"visual.head.proj.bridge.{name}"] = getattr(bridge, name).detach().clone().contiguous()
    if bridge.familiar is not None:  # float16: the values familiar_captions rounded them to
        out["visual.head.proj.bridge.familiar.captions"] = bridge.familiar.captions.half().contiguous()
    return out


def _write_config(out_dir: Path, cfg: TrainConfig, bridge: LabelBridge | None) -> None:
    config = read_config()
    config["crossmodal"].pop("label_bridge", None)
    config["crossmodal"].pop("glossary", None)
    if bridge is not None:
        config["crossmodal"]["label_bridge"] = {"weight": bridge.weight, "temperature": bridge.temperature}
        if bridge.familiar is not None:
            config["crossmodal"]["label_bridge"]["unfamiliar"] = bridge.familiar.settings()
    if cfg.glossary:
        config["crossmodal"]["glossary"] = GLOSSARY_FILE_NAME
    (out_dir / CONFIG_FILE_NAME).write_text(json.dumps(config, indent=2) + "\n")


def run_training(data_dir: Path, cache_dir: Path, seeds: list[int], cfg: TrainConfig, device: torch.device,
                 out_dir: Path = MODEL_DIR, zero_shot_dir: Path | None = None) -> dict:
    """Cache features, train one model per seed, save the first seed's model; report all seeds
    (on Flickr8k dev and, given a zero-shot classes folder, on it too)."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    train = cache_features(data_dir / "train", feature_cache_file(cache_dir, "train", VIEWS), device, VIEWS)
    dev = cache_features(data_dir / "dev", feature_cache_file(cache_dir, "dev", ("center",)), device, ("center",))
    head = imagenet_head(cache_dir, device)
    zero_shot = None
    if zero_shot_dir is not None:
        zero_shot = (cache_features(zero_shot_dir, feature_cache_file(cache_dir, zero_shot_dir.name, ("center",)),
                                    device, ("center",)), _split_pairs(zero_shot_dir)[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GLOSSARY_FILE_NAME).unlink(missing_ok=True)
    if cfg.glossary:  # words of the training captions are never glossed, so `train` is unchanged by it
        words = glossary.write(out_dir / GLOSSARY_FILE_NAME, glossed_entries(_split_pairs(data_dir / "train")[2]))
        dev = glossed_features(dev, _split_pairs(data_dir / "dev")[2], words, device)
        if zero_shot is not None:
            zero_shot = (glossed_features(zero_shot[0], zero_shot[1], words, device), zero_shot[1])
    feature_seconds = time.perf_counter() - start
    bridge = model_bridge(head, cfg, train)  # the same for every seed
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        heads, metrics, history = train_heads(train, dev, TrainConfig(**{**asdict(cfg), "seed": seed}), head)
        embed = feature_embedder(heads, bridge)
        bank, corrected = hubness_bank(embed, train, dev, seed)
        run = {"seed": seed, "dev": corrected, "dev_without_hubness": metrics, "hubness": bank.describe(),
               "seconds": time.perf_counter() - t0, "history": history}
        if zero_shot is not None:
            found = zero_shot_on_features(embed, bank, *zero_shot)
            run["zero_shot"] = {k: found[k] for k in ("text_to_image_precision_at_10", "image_to_caption_top1")}
        runs.append(run)
        if seed == seeds[0]:
            save_file(export_heads(heads, bridge), str(out_dir / HEADS_FILE_NAME))
            bank.save(out_dir / BANK_FILE_NAME)
            _write_config(out_dir, cfg, bridge)
    saved = [out_dir / name for name in (HEADS_FILE_NAME, BANK_FILE_NAME, GLOSSARY_FILE_NAME)
             if (out_dir / name).exists()]
    report = {"config": asdict(cfg), "views": VIEWS, "feature_seconds": feature_seconds,
              "label_bridged_baseline": label_bridged_baseline(head, dev, cfg.bridge_temperature), "runs": runs,
              "saved": [str(f) for f in saved], "saved_bytes": sum(f.stat().st_size for f in saved)}
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report
