"""Filtered text-to-image search at 100k vectors over HTTP: p50/p95 for filters matching 0.1 %, 1 %,
10 % and 50 % of the collection, beside the same queries unfiltered, on a real `crossmodal serve`.

    .venv/bin/python tests/benchmarks/indexing.py          # first: the real Flickr8k index
    .venv/bin/python tests/benchmarks/filter_latency.py    # then this (about 5 minutes on 2 cores)

The collection is search_scale.py's (7,000 real Flickr8k image embeddings, then mixtures of two),
with photo facts spread at random over it, so that a filter's photos lie anywhere in the vector
space: nested folders holding 50 %, 10 %, 1 % and 0.1 % of the photos, dates over ten years, five
cameras. Each filter's regime is printed: `prefilter` runs inside FAISS (an IDSelector, every IVF
list probed), `postfilter` searches deeper candidates (faiss_index.prefilters decides). Each run
counts requests answered with fewer than k results. Queries are real captions, each text used once.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer import faiss_index, hubness  # noqa: E402
from crossmodal.indexer.attributes import Attributes  # noqa: E402
from crossmodal.indexer.folders import FolderNames  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from crossmodal.indexer.store import ImageRow, Store  # noqa: E402
from crossmodal.search.engine import SearchEngine  # noqa: E402
from crossmodal.search.options import SearchOptions  # noqa: E402
from tests.benchmarks.http_latency import run as run_clients  # noqa: E402
from tests.benchmarks.results_file import record  # noqa: E402
from tests.benchmarks.search_scale import _NoEncoder, real_embeddings, serve, synthesize, write_index_dir  # noqa: E402

SHARES = {"0.1%": "p50/p10/p01/p001", "1%": "p50/p10/p01", "10%": "p50/p10", "50%": "p50"}
CAMERAS = ["Canon EOS 5D", "NIKON D750", "iPhone 12", "Pixel 7", "X-T4"]
YEAR = 365.25 * 86400


def spread_facts(index_dir: Path, n: int, seed: int = 0) -> None:
    """Folders, dates and cameras at random over the rows; then the build's attribute table."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # order[rank] = row: the first 0.1 % of ranks are the innermost folder
    depth = np.searchsorted(np.array([n * 0.001, n * 0.01, n * 0.1, n * 0.5]), np.arange(n), side="right")
    folders = ["p50/p10/p01/p001", "p50/p10/p01", "p50/p10", "p50", "rest"]
    taken = 1.45e9 + rng.uniform(0, 10 * YEAR, n)
    cameras = rng.integers(0, len(CAMERAS), n)
    store = Store(Settings(index_dir=index_dir).resolved_database_url())
    rows = [{"id": int(order[rank]) + 1, "path": f"{folders[depth[rank]]}/{order[rank]:07d}.jpg",
             "taken_at": float(taken[rank]), "taken_from": "exif", "camera_make": "",
             "camera_model": CAMERAS[cameras[rank]]} for rank in range(n)]
    with store.session() as s, s.begin():
        s.execute(update(ImageRow), rows)
    build = store.published_build()
    build_dir = faiss_index.build_dir_for(index_dir, build.id)
    names = FolderNames({f.id: f.name for f in store.folders()})
    Attributes.tabulate(*store.photo_attributes(set(range(1, n + 1))), names).write(build_dir)
    store.close()


def filter_regimes(index_dir: Path, model: str, filters: dict[str, dict]) -> dict[str, dict]:
    """Each filter's share of the collection, and whether the served index pre- or post-filters it."""
    engine = SearchEngine(Settings(index_dir=index_dir), encoder=_NoEncoder(model, 0))
    found = {}
    for name, params in filters.items():
        selection = engine.selection(SearchOptions(**params))
        share = selection.share if selection is not None else 1.0
        prefilter = selection is not None and faiss_index.prefilters(engine.snapshot.images, selection,
                                                                     ranking_candidates())
        found[name] = {"share": share, "regime": "none" if selection is None else
                       "prefilter" if prefilter else "postfilter"}
    engine.store.close()
    return found


def ranking_candidates() -> int:
    """The candidates a served text query asks the index for (ranking.ranked: re-rank and hubness depth)."""
    return max(faiss_index.RERANK_CANDIDATES, hubness.CANDIDATES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/bench/indexing/index"))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/filters"))
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=300, help="requests per filter")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    model, real, texts, _ = real_embeddings(args.source)
    query_texts = [texts[i] for i in np.random.default_rng(2).permutation(len(texts))]
    index_dir = args.work / f"n{args.n}"
    subprocess.run(["rm", "-rf", str(index_dir)], check=True)
    built = write_index_dir(index_dir, synthesize(real, args.n), model, Settings(index_dir=index_dir))
    spread_facts(index_dir, args.n)
    print(f"n={args.n:,}: {built['index_type']} {built['search_params']}")
    filters = {"none": {}, **{share: {"folder": folder} for share, folder in SHARES.items()},
               "2 years + 1 camera (~4%)": {"taken_after": "2016-01-01", "taken_before": "2017-12-31",
                                            "camera": "iPhone 12"},
               "50% + date sort (top 100)": {"folder": "p50", "sort": "date_desc"}}
    regimes = filter_regimes(index_dir, model, filters)
    process, _ = serve(index_dir, args.port, query_texts[0])
    figures, used = {}, 1
    try:
        api = f"http://127.0.0.1:{args.port}"
        run_clients(api, query_texts[used:used + 30], 1, 10)  # warm-up
        used += 30
        for name, params in filters.items():
            result = run_clients(api, query_texts[used:used + args.requests], 1, 10, params)
            used += args.requests
            figures[name] = {"params": params, **regimes[name], **result}
            print(f"  {name:<28} {regimes[name]['share']:>7.2%} {regimes[name]['regime']:<11} "
                  f"p50={result['p50_ms']:.1f} ms p95={result['p95_ms']:.1f} ms "
                  f"p99={result['p99_ms']:.1f} ms errors={result['errors']} fewer than k={result['short']}")
    finally:
        process.terminate()
        process.wait(30)
    if not args.no_record:
        record("filter_latency", {"n": args.n, "index_type": built["index_type"],
                                  "search_params": built["search_params"],
                                  "filters": figures},
               model=model, queries="real Flickr8k captions, each used once; one client; text encoding included",
               facts="nested folders of 50/10/1/0.1 % of the photos, dates over 10 years, 5 cameras, at random")


if __name__ == "__main__":
    main()
