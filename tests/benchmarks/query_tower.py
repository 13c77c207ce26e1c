"""The int8 query tower against float32 (issue 18): CPU a text query costs, and retrieval through the
published indexes, exactly as `crossmodal eval` measures it with each CROSSMODAL_TEXT_QUERY_PRECISION.

    .venv/bin/python tests/benchmarks/query_tower.py            # ~3 min; records results.json
    .venv/bin/python tests/benchmarks/query_tower.py --no-record

Indexes Flickr8k dev (1,000 photos, 5,000 captions) and caltech101-dev (zero-shot classes) with the
default model into .cache/bench/query-tower (reused when there), then per precision:
- CPU per query: 512 Flickr8k train captions, each encoded as the service encodes it (int8 alone,
  float32 alone and in shared passes of 16), in ms of process CPU time;
- Flickr8k dev Recall@1/5/10 text-to-image (image-to-text does not depend on the text queries);
- caltech101-dev text-to-image precision@10 over classes.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer import onnx_text  # noqa: E402
from crossmodal.indexer.builder import IndexBuilder  # noqa: E402
from crossmodal.indexer.evaluate import evaluate_classes, evaluate_published  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402

CALTECH = FLICKR8K.parent / "caltech101-dev"


def indexed(folder: Path, index_dir: Path) -> Settings:
    settings = Settings(index_dir=index_dir, device="cpu")
    IndexBuilder(settings).build(folder / "images", folder / "captions.tsv")  # a re-run finds nothing changed
    return settings


def cpu_ms(encode, texts: list[str], batch: int) -> float:
    start = time.process_time()
    for i in range(0, len(texts), batch):
        encode(texts[i:i + batch])
    return (time.process_time() - start) / len(texts) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/query-tower"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    flickr = indexed(FLICKR8K / "dev", args.work / "flickr8k-dev")
    caltech = indexed(CALTECH, args.work / "caltech101-dev")
    with open(FLICKR8K / "train" / "captions.tsv", encoding="utf-8") as handle:
        queries = [row["caption"] for row in csv.DictReader(handle, delimiter="\t")][:512]
    model = evaluate_published(flickr)["model"]
    figures = {}
    for precision in onnx_text.QUERY_PRECISIONS:
        tower = onnx_text.load(flickr.index_dir, model, precision)
        assert tower is not None and tower.precision == precision, f"no {precision} query tower in {flickr.index_dir}"
        alone = cpu_ms(tower.encode_texts, queries, 1)
        shared = cpu_ms(tower.encode_texts, queries, 16) if tower.shares_passes else None
        retrieval = evaluate_published(flickr.model_copy(update={"text_query_precision": precision}))
        classes = evaluate_classes(caltech.model_copy(update={"text_query_precision": precision}))
        figures[precision] = {"cpu_ms_per_query_alone": round(alone, 2),
                              "cpu_ms_per_query_in_passes_of_16": shared and round(shared, 2),
                              "flickr8k_dev_text_to_image": retrieval["recall"]["text_to_image"],
                              "caltech101_dev_precision_at_10": classes["text_to_image_precision_at_10"]}
        recall = retrieval["recall"]["text_to_image"]
        print(f"{precision:>8}: {alone:.2f} ms CPU a query alone" + (f", {shared:.2f} in passes of 16" if shared else "")
              + f"; Flickr8k dev T->I R@1 {recall['R@1']:.1f} R@5 {recall['R@5']:.1f} R@10 {recall['R@10']:.1f}"
              + f"; caltech101-dev P@10 {classes['text_to_image_precision_at_10']:.3f}")
    if not args.no_record:
        record("query_tower", figures, model=model, queries="512 Flickr8k train captions (CPU); eval as crossmodal eval")


if __name__ == "__main__":
    main()
