"""Measure the default model's levers (issue 19) one by one, three seeds each, on cached features.

Each lever is trained on Flickr8k train exactly as `crossmodal train` does, then measured on
Flickr8k dev (Recall@K, with the hubness correction) and on a zero-shot classes folder such as
caltech101-dev (text->image precision@10, image->caption top-1), for several label-bridge
weights, with the shipped hubness bank and with a bank whose image side is the searched
collection itself. Usage:

    python tests/benchmarks/model_levers.py [--seeds 0,1,2] [--json levers.json]

Tower features are cached under .cache/train-features (about 20 minutes the first time).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from crossmodal.indexer import glossary
from crossmodal.indexer.hubness import HubnessBank
from crossmodal.indexer.train import (VIEWS, TrainConfig, _split_pairs, bridge_embedder, cache_features,
                                      feature_cache_file, feature_embedder, glossed_entries, glossed_features,
                                      hubness_bank, imagenet_head, model_bridge, train_heads,
                                      zero_shot_on_features)

VERSION_3 = {"bridge_temperature": 1.0, "unfamiliar_bridge_weight": None}
LEVERS = {  # TrainConfig fields: version 2's recipe, then what versions 3 and 4 added; the rest add to version 3
    "heads + bridge (version 2)": {**VERSION_3, "glossary": False, "class_definitions": False},
    "+ glossary": {**VERSION_3, "class_definitions": False},
    "+ glossary + class definitions (version 3)": VERSION_3,
    "+ softer bridge (temperature 2)": {"unfamiliar_bridge_weight": None},
    "+ unfamiliar texts lean on the bridge (version 4)": {},
    "+ unfamiliar texts at 0.7": {"unfamiliar_bridge_weight": 0.7},
    "+ unfamiliar texts from similarity 0.5 to 0.65": {"familiar_similarity": (0.5, 0.65)},
    "pseudo-captions p>=0.5": {**VERSION_3, "pseudo_caption_min_prob": 0.5},
    "distil class directions 0.5": {**VERSION_3, "distil_weight": 0.5},
    "pseudo-captions + distil 0.5": {**VERSION_3, "pseudo_caption_min_prob": 0.5, "distil_weight": 0.5},
    "distil class directions 0.1": {**VERSION_3, "distil_weight": 0.1},
    "distil class directions 0.25": {**VERSION_3, "distil_weight": 0.25},
    "distil class directions 1.0": {**VERSION_3, "distil_weight": 1.0},
}
BRIDGE_WEIGHTS = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6)


def measure(embed, bank: HubnessBank, dev, zero_shot, zero_shot_texts) -> dict:
    from crossmodal.indexer.train import corrected_recall

    dev_images, dev_texts = embed(dev["image"][0], "image"), embed(dev["text"], "text")
    flickr = corrected_recall(bank, dev_images, dev_texts, dev["caption_image"])
    own_dev = bank.with_collection_images(dev_images)  # the image side from the searched collection
    flickr_own = corrected_recall(own_dev, dev_images, dev_texts, dev["caption_image"])
    shipped = zero_shot_on_features(embed, bank, zero_shot, zero_shot_texts)
    own = bank.with_collection_images(embed(zero_shot["image"][0], "image"))
    collection = zero_shot_on_features(embed, own, zero_shot, zero_shot_texts)
    return {"flickr_t2i_r1": flickr["text_to_image"]["R@1"], "flickr_t2i_r10": flickr["text_to_image"]["R@10"],
            "flickr_i2t_r1": flickr["image_to_text"]["R@1"],
            "flickr_i2t_r1_own_bank": flickr_own["image_to_text"]["R@1"],
            "zs_p10": shipped["text_to_image_precision_at_10"], "zs_top1": shipped["image_to_caption_top1"],
            "zs_p10_own_bank": collection["text_to_image_precision_at_10"],
            "zs_top1_own_bank": collection["image_to_caption_top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flickr", type=Path, default=Path("../shared/datasets/flickr8k"))
    parser.add_argument("--zero-shot", type=Path, default=Path("../shared/datasets/caltech101-dev"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/train-features"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated names from LEVERS")
    parser.add_argument("--bridge-weights", default=",".join(map(str, BRIDGE_WEIGHTS)),
                        help="the model's share of the bridge (an unfamiliar text's share is the lever's own)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cpu")
    train = cache_features(args.flickr / "train", feature_cache_file(args.cache_dir, "train", VIEWS), device, VIEWS)
    dev = cache_features(args.flickr / "dev", feature_cache_file(args.cache_dir, "dev", ("center",)), device,
                         ("center",))
    zero_shot = cache_features(args.zero_shot, feature_cache_file(args.cache_dir, args.zero_shot.name, ("center",)),
                               device, ("center",))
    zero_shot_texts = _split_pairs(args.zero_shot)[2]
    head = imagenet_head(args.cache_dir, device)
    words = glossary.Glossary(glossary.wordnet_definitions(),
                              frozenset(glossed_entries(_split_pairs(args.flickr / "train")[2])))
    glossed = {False: (dev, zero_shot), True: (glossed_features(dev, _split_pairs(args.flickr / "dev")[2], words, device),
                                               glossed_features(zero_shot, zero_shot_texts, words, device))}
    results = []
    for temperature in (1.0, TrainConfig().bridge_temperature):
        zs = zero_shot_on_features(bridge_embedder(head, temperature), None, glossed[True][1], zero_shot_texts)
        print(f"label bridge alone at temperature {temperature} (no trained parameters, no correction): zero-shot "
              f"P@10 {zs['text_to_image_precision_at_10']:.3f} top-1 {zs['image_to_caption_top1']:.3f}", flush=True)
    for name in args.levers.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = replace(TrainConfig(), seed=seed, **LEVERS[name])
            lever_dev, lever_zero_shot = glossed[cfg.glossary]  # texts as the model would encode them
            start = time.perf_counter()
            heads, _, _ = train_heads(train, lever_dev, cfg, head)
            seconds = time.perf_counter() - start
            for weight in [float(w) for w in args.bridge_weights.split(",")]:
                embed = feature_embedder(heads, model_bridge(head, replace(cfg, bridge_weight=weight), train))
                bank, _ = hubness_bank(embed, train, lever_dev, seed)
                row = {"lever": name, "seed": seed, "bridge_weight": weight, "train_seconds": seconds,
                       "beta": bank.beta, "config": asdict(cfg),
                       **measure(embed, bank, lever_dev, lever_zero_shot, zero_shot_texts)}
                results.append(row)
                print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                  if k != "config"}), flush=True)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def print_table(results: list[dict]) -> None:
    keys = ["flickr_t2i_r1", "flickr_t2i_r10", "flickr_i2t_r1", "zs_p10", "zs_top1", "zs_p10_own_bank",
            "zs_top1_own_bank", "flickr_i2t_r1_own_bank"]
    print("\n| lever | bridge w | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        groups.setdefault((row["lever"], row["bridge_weight"]), []).append(row)
    for (lever, weight), rows in groups.items():
        cells = []
        for key in keys:
            values = np.array([r.get(key, np.nan) for r in rows])
            cells.append(f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"
                         if values.max() <= 1 else f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}")
        print(f"| {lever} | {weight} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
