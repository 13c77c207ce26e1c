"""An index larger than memory: 10M synthetic vectors, built on disk and served over HTTP.

    .venv/bin/python tests/benchmarks/indexing.py          # first: the real Flickr8k index (the generator's seed)
    .venv/bin/python tests/benchmarks/ondisk_scale.py      # 10M vectors: about an hour on 2 cores, ~15 GB of disk

The vectors come from search_scale.py's generator (the real Flickr8k image embeddings, then
mixtures of two real ones plus noise), one shard at a time from a seed per shard, so the
10M vectors are never in memory together: made once for the build, again for exact recall.
The index is written by the indexer's own on-disk path (builder.write_ondisk_index: IVF-PQ
trained on a sample, shards, merge_ondisk, float16 exact vectors, hubness penalties); the
metadata database gets one row per vector, as a build writes, but no stored embeddings
(serving does not read them, and 20 GB of blobs would only cost time). A real
`crossmodal serve` then answers real caption queries with the real text encoder.

Figures: build seconds (rows, training, shards and merge), disk bytes per vector, the serving
process's memory after the queries (resident anonymous and file-backed, and its peak),
p50/p95 text-to-image over HTTP, and Recall@10 of the served ranking against exact search.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer import faiss_index  # noqa: E402
from crossmodal.indexer.builder import write_ondisk_index  # noqa: E402
from crossmodal.indexer.hubness import load_bank  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from crossmodal.indexer.store import Build, ImageRow, Store, utcnow  # noqa: E402
from tests.benchmarks.http_latency import run as run_clients  # noqa: E402
from tests.benchmarks.results_file import RESULTS, record  # noqa: E402
from tests.benchmarks.search_scale import (_NoEncoder, real_embeddings, serve, synthesize,  # noqa: E402
                                           synthetic_build, synthetic_rows)
from crossmodal.search.engine import SearchEngine  # noqa: E402

RECALL_QUERIES = 200


def shard(real: np.ndarray, number: int, size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of shard `number`: the same vectors every time it is asked for."""
    start = number * size
    m = min(size, n - start)
    vectors = synthesize(real, m, seed=number, keep_real=number == 0)
    return np.arange(start + 1, start + m + 1, dtype=np.int64), vectors


def write_rows(store: Store, model: str, n: int, root: Path) -> tuple[int, list]:
    """(build id, the manifest's folders) of a building build with n synthetic image rows."""
    with store.session() as s, s.begin():
        build_id, folders = synthetic_build(s, model, root)
    for start in range(0, n, 100_000):
        with store.session() as s, s.begin():
            s.execute(insert(ImageRow), synthetic_rows(start, min(start + 100_000, n), build_id, folders, digits=8))
    return build_id, folders


def exact_top10(real: np.ndarray, queries: np.ndarray, n: int, size: int) -> np.ndarray:
    best_ids = np.zeros((len(queries), 10), dtype=np.int64)
    best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    for number in range((n + size - 1) // size):
        ids, vectors = shard(real, number, size, n)
        scores = queries @ vectors.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        merged = np.concatenate([best, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([best_ids, ids[top]], axis=1)
        keep = np.argsort(-merged, axis=1)[:, :10]
        best, best_ids = np.take_along_axis(merged, keep, 1), np.take_along_axis(merged_ids, keep, 1)
    return best_ids


def process_memory(pid: int) -> dict[str, int]:
    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in
              Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(("Vm", "Rss"))}
    return {"rss_bytes": status["VmRSS"], "rss_anon_bytes": status["RssAnon"], "rss_file_bytes": status["RssFile"],
            "peak_rss_bytes": status["VmHWM"]}


def build(args, real: np.ndarray, model: str, index_dir: Path) -> dict:
    """Rows, then the index through the indexer's on-disk writer; returns the build's figures."""
    n, dim = args.vectors, real.shape[1]
    shutil.rmtree(index_dir, ignore_errors=True)
    settings = Settings(index_dir=index_dir, ondisk_min_vectors=1, ondisk_shard_vectors=args.shard)
    store = Store(settings.resolved_database_url())
    started = time.perf_counter()
    build_id, folders = write_rows(store, model, n, index_dir)
    rows_seconds = time.perf_counter() - started
    print(f"{n:,} rows written in {rows_seconds:.0f} s")
    build_dir = faiss_index.build_dir_for(index_dir, build_id)
    build_dir.mkdir(parents=True)
    index_type = faiss_index.ondisk_index_type(n, dim)
    sample = np.concatenate([shard(real, k, args.shard, n)[1] for k in range(1, 3)])  # two shards' worth
    sample = sample[np.random.default_rng(0).choice(len(sample), faiss_index.training_size(index_type, n),
                                                    replace=False)]
    bank = load_bank(model)
    started = time.perf_counter()
    write_ondisk_index(build_dir, faiss_index.IMAGES_FILE, index_type, np.arange(1, n + 1, dtype=np.int64), sample,
                       (shard(real, k, args.shard, n) for k in range((n + args.shard - 1) // args.shard)),
                       settings, bank, "image")
    index_seconds = time.perf_counter() - started
    empty = faiss_index.build_index(np.zeros((0, dim), np.float32), np.zeros(0, np.int64), "Flat")
    faiss_index.write_index(empty, build_dir / faiss_index.CAPTIONS_FILE)
    params = faiss_index.default_search_params(index_type)
    faiss_index.Manifest(build_id, model, dim, index_type, "Flat", n, 0, params,
                         bank.describe() if bank else {}, folders=folders).write(build_dir)
    with store.session() as s, s.begin():
        row = s.get(Build, build_id)
        row.status, row.dim, row.n_images, row.finished_at = "published", dim, n, utcnow()
        row.image_index_type, row.caption_index_type = index_type, "Flat"
    store.close()
    disk = {path.name: path.stat().st_size / n for path in build_dir.iterdir()}
    print(f"{index_type} {params}: index written in {index_seconds:.0f} s; on disk per vector: "
          + ", ".join(f"{name} {size:.1f} B" for name, size in sorted(disk.items())))
    return {"vectors": n, "index_type": index_type, "default_search_params": params, "shard_vectors": args.shard,
            "rows_seconds": rows_seconds, "index_seconds": index_seconds, "disk_bytes_per_vector": disk}


def set_nprobe(index_dir: Path, nprobe: int) -> None:
    store = Store(Settings(index_dir=index_dir).resolved_database_url())
    build_dir = faiss_index.build_dir_for(index_dir, store.published_build().id)
    store.close()
    manifest = faiss_index.Manifest.read(build_dir)
    manifest.search_params = {"nprobe": nprobe}
    manifest.write(build_dir)


def measure(args, index_dir: Path, model: str, dim: int, recall_queries: np.ndarray, exact: np.ndarray,
            query_texts: list[str]) -> dict:
    """What the published build serves: recall of the engine's ranking, then HTTP latency and memory."""
    engine = SearchEngine(Settings(index_dir=index_dir), encoder=_NoEncoder(model, dim))
    found = [[hit.id for hit in engine.images_by_vector(q, 10)] for q in recall_queries]  # ANN recall: no penalties
    del engine
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact.tolist())]))
    process, cold = serve(index_dir, args.port, query_texts[0])
    try:
        api = f"http://127.0.0.1:{args.port}"
        run_clients(api, query_texts[1:21], 1, 10)  # warm-up
        http = run_clients(api, query_texts[21:21 + args.requests], 1, 10)
        memory = process_memory(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    print(f"  Recall@10 {recall:.3f}; HTTP text->image, 1 client: p50 {http['p50_ms']:.1f} ms, "
          f"p95 {http['p95_ms']:.1f} ms, errors {http['errors']}; cold start {cold:.1f} s; serving process "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
    return {"recall_at_10": recall, "cold_start_seconds": cold, "http_1_client": http, "serving_memory": memory}


def previous_run() -> tuple[dict, dict]:
    """(build figures, measurements by nprobe) recorded by the run that built the index."""
    figures = json.loads(RESULTS.read_text())["ondisk_scale@cpu"]["figures"]
    if "build" in figures:
        return figures["build"], figures["by_nprobe"]
    # The first 10M run recorded one measurement beside its build figures.
    measured = ("recall_at_10", "cold_start_seconds", "http_1_client", "serving_memory")
    built = {k: v for k, v in figures.items() if k not in (*measured, "search_params", "recall_queries")}
    built["default_search_params"] = figures["search_params"]
    return built, {str(figures["search_params"]["nprobe"]): {k: figures[k] for k in measured}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/bench/indexing/index"))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/ondisk"))
    parser.add_argument("--vectors", type=int, default=10_000_000)
    parser.add_argument("--shard", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--nprobe", default="", help="comma-separated nprobe values to measure (default: the build's)")
    parser.add_argument("--reuse", action="store_true", help="measure the index a previous run built")
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    model, real, texts, text_vectors = real_embeddings(args.source)
    order = np.random.default_rng(1).permutation(len(texts))
    recall_queries, query_texts = text_vectors[order[:RECALL_QUERIES]], [texts[i] for i in order[RECALL_QUERIES:]]
    index_dir = args.work / f"n{args.vectors}"
    runs = {}
    if args.reuse:
        built, runs = previous_run()
    else:
        built = build(args, real, model, index_dir)
    exact = exact_top10(real, recall_queries, args.vectors, args.shard)
    for nprobe in [int(x) for x in args.nprobe.split(",") if x] or [built["default_search_params"]["nprobe"]]:
        set_nprobe(index_dir, nprobe)
        print(f"nprobe {nprobe}:")
        runs[str(nprobe)] = measure(args, index_dir, model, real.shape[1], recall_queries, exact, query_texts)
    set_nprobe(index_dir, built["default_search_params"]["nprobe"])
    if not args.no_record:
        record("ondisk_scale", {"build": built, "recall_queries": RECALL_QUERIES, "by_nprobe": runs}, model=model,
               vectors="search_scale.py's generator: real Flickr8k image embeddings, then mixtures of two plus noise",
               queries="real Flickr8k captions, each used once; text encoding included in the HTTP figures")


if __name__ == "__main__":
    main()
