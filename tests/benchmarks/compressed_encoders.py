"""Compressed CPU encoders side by side (issue 18): every variant of a model on the same photos, in one run.

    .venv/bin/python tests/benchmarks/compressed_encoders.py --vit FILE   # ~12 min; records results.json
    .venv/bin/python tests/benchmarks/compressed_encoders.py --limit 200 --no-record   # a quick look

FILE holds ViT-B-32 weights (open_clip's state dict). Without internet, random weights saved to a
file stand in (tests/benchmarks/vs_clip_retrieval.py --make-checkpoint FILE writes them): speed
does not depend on the weights, but retrieval quality does, so for ViT-B-32 the table gives the
vectors' cosine to float32's instead of recall.

Per model and variant (float32 = the model in torch, as shipped; "+onnx" and "+int8", see
indexer/onnx_towers.py; and torch's own int8 dynamic quantization of the linear layers,
`torch.ao.quantization.quantize_dynamic`, model-only, not shipped), on Flickr8k dev:
- model only: images/s on ready tensors, best batch of 4, 16 and 32 (indexing.model_only);
- end to end: the image phase of a real build (IndexBuilder) over the dev photos, images/s;
- text query: one query encoded, median of 50, in ms;
- vectors: cosine to float32's on 64 photos, lowest and mean;
- retrieval (crossmodal-lite): Recall@1/5/10 both ways through the published indexes, exactly as
  `crossmodal eval` measures it. A variant more than 0.5 points below float32 at R@1 or R@10 is
  not a candidate for the default.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder  # noqa: E402
from crossmodal.indexer.collection import decode_image  # noqa: E402
from crossmodal.indexer.encoder import Encoder, keep_freed_memory, load_encoder  # noqa: E402
from crossmodal.indexer.evaluate import evaluate_published  # noqa: E402
from crossmodal.indexer.model_names import CURRENT_DEFAULT_MODEL  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests.benchmarks.indexing import PhaseClock, model_only, warm_up  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402

VARIANTS = ("float32", "onnx", "int8")
QUERY = "two dogs play in the snow beside a red fence"


def subset(dev: Path, work: Path, limit: int | None) -> tuple[Path, Path]:
    """The dev photos (or the first `limit`) and their captions, as a folder to index."""
    if limit is None:
        return dev / "images", dev / "captions.tsv"
    folder = work / f"dev-{limit}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for photo in sorted((dev / "images").glob("*.jpg"))[:limit]:
            shutil.copyfile(photo, folder / photo.name)
    names = {p.name for p in folder.iterdir()}
    lines = (dev / "captions.tsv").read_text().splitlines()
    captions = work / f"dev-{limit}.tsv"
    captions.write_text("\n".join([lines[0], *(line for line in lines[1:] if line.split("\t")[0] in names)]) + "\n")
    return folder, captions


def query_ms(encoder: Encoder, runs: int = 50) -> float:
    for _ in range(5):
        encoder.encode_texts([QUERY])
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        encoder.encode_texts([QUERY])
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1000


def vectors(encoder: Encoder, photos: list[Path]) -> np.ndarray:
    return encoder.encode_images([decode_image(p.read_bytes(), 10**9) for p in photos])


def end_to_end(encoder: Encoder, folder: Path, captions: Path | None, index_dir: Path) -> tuple[float, dict | None]:
    """Images/s of a build's image phase, and the published build's recall where it has captions."""
    shutil.rmtree(index_dir, ignore_errors=True)
    settings = Settings(index_dir=index_dir, device="cpu", export_text_tower=False)
    clock = PhaseClock()
    report = IndexBuilder(settings, encoder=encoder).build(folder, captions, model=encoder.name, progress=clock)
    rate = report.n_images / clock.seconds("images", "captions" if captions else "indexing")
    return rate, evaluate_published(settings)["recall"] if captions else None


def torch_int8(encoder: Encoder) -> Encoder:
    """The float32 encoder with torch's dynamic int8 quantization of its image tower's linear layers."""
    import torch

    quantized = load_encoder(encoder.name, "cpu")
    quantized.model.visual = torch.ao.quantization.quantize_dynamic(quantized.model.visual, {torch.nn.Linear},
                                                                    dtype=torch.qint8)
    return quantized


def measure_model(name: str, photos: list[Path], folder: Path, captions: Path | None, work: Path) -> dict[str, dict]:
    print(f"\n{name}")
    rows: dict[str, dict] = {}
    reference = None
    for variant in (*VARIANTS, "torch-int8"):
        if variant == "torch-int8":
            encoder = torch_int8(load_encoder(name, "cpu"))
        else:
            encoder = load_encoder(name if variant == "float32" else f"{name}+{variant}", "cpu", work / "towers")
        warm_up(encoder, photos[0])
        own = vectors(encoder, photos[:64])
        reference = own if reference is None else reference
        cosine = (own * reference).sum(1)
        row = {"model_only_images_per_second": max(model_only(encoder, photos, [4, 16, 32], n=96, rounds=2).values()),
               "text_query_ms": query_ms(encoder),
               "cosine_to_float32_lowest": float(cosine.min()), "cosine_to_float32_mean": float(cosine.mean())}
        if variant != "torch-int8":  # not shipped: nothing can build an index with it
            row["end_to_end_images_per_second"], recall = end_to_end(encoder, folder, captions, work / "index")
            if recall:
                row["recall"] = recall
        rows[variant] = row
        print(f"  {variant:>10}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if not isinstance(v, dict))
              + (f"; recall {row['recall']}" if "recall" in row else ""), flush=True)
    return rows


def print_table(results: dict[str, dict[str, dict]]) -> None:
    print("\n| model | variant | model only (img/s) | end to end (img/s) | text query (ms) | cosine to float32 "
          "(lowest) | T→I R@1 / R@10 | I→T R@1 / R@10 |\n|---|---|---|---|---|---|---|---|")
    for model, rows in results.items():
        for variant, row in rows.items():
            recall = row.get("recall")
            t2i, i2t = (f"{recall[d]['R@1']:.1f} / {recall[d]['R@10']:.1f}" if recall else "–"
                        for d in ("text_to_image", "image_to_text"))
            e2e = row.get("end_to_end_images_per_second")
            print(f"| {model} | {variant} | {row['model_only_images_per_second']:.1f} | "
                  f"{f'{e2e:.1f}' if e2e else '–'} | {row['text_query_ms']:.2f} | "
                  f"{row['cosine_to_float32_lowest']:.4f} | {t2i} | {i2t} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--vit", type=Path, help="ViT-B-32 weights file (see above); without it, crossmodal-lite only")
    parser.add_argument("--limit", type=int, help="index only the first N dev photos")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/compressed"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    dev = args.data / "dev"
    if not (dev / "captions.tsv").is_file():
        sys.exit(f"{args.data} has no Flickr8k dev split (see ../shared/datasets/flickr8k/README.md)")
    keep_freed_memory()
    folder, captions = subset(dev, args.work, args.limit)
    photos = sorted(folder.glob("*.jpg"))
    shutil.rmtree(args.work / "towers", ignore_errors=True)  # every export is part of this run
    results = {CURRENT_DEFAULT_MODEL: measure_model(CURRENT_DEFAULT_MODEL, photos, folder, captions, args.work)}
    if args.vit:
        results["ViT-B-32"] = measure_model(f"ViT-B-32:{args.vit.resolve()}", photos, folder, None, args.work)
    print_table(results)
    if not args.no_record:
        record("compressed_encoders", results, device="cpu", photos=len(photos),
               data=f"Flickr8k dev ({len(photos)} photos)",
               vit_weights="random weights saved to a file (no internet): speed and cosine only" if args.vit else None)


if __name__ == "__main__":
    main()
