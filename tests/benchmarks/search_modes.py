"""Text-to-image recall of the vector, keyword and hybrid search modes on the Flickr8k dev split
(1,000 photos, 5,000 captions), ranked exactly as the service ranks them (`crossmodal eval --modes`).

    .venv/bin/python tests/benchmarks/search_modes.py     # about 2 minutes on 2 cores

The keyword index holds every caption, so each query (one of the 5,000 captions) is held out of it:
either its own text only (the photo keeps its 4 other captions), or all 5 of its photo's captions
(the photo searched for is uncaptioned; the other 999 keep theirs).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder  # noqa: E402
from crossmodal.indexer.evaluate import evaluate_modes, format_modes_table  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K / "dev")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/modes"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    settings = Settings(index_dir=args.work / "index")
    report = IndexBuilder(settings).build(args.data / "images", args.data / "captions.tsv")
    result = evaluate_modes(settings)
    print(f"model {result['model']}, {result['n_images']} images, {result['n_captions']} captions")
    print(format_modes_table(result))
    if not args.no_record:
        record("search_modes", result, model=report.model, data="Flickr8k dev split",
               protocol="text->image Recall@K in %, each caption a query; keyword index without the query caption "
                        "(query_caption_held_out) or without any caption of its photo (query_photo_uncaptioned)")


if __name__ == "__main__":
    main()
