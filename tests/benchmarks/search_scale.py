"""Search at 10k, 100k and 1M vectors: ANN recall and memory, build time, cold start, and
text-to-image latency and QPS over HTTP against a real `crossmodal serve`.

    .venv/bin/python tests/benchmarks/indexing.py            # first: the real Flickr8k index
    .venv/bin/python tests/benchmarks/search_scale.py        # then this (about 15 minutes on 2 cores)

How the vectors are made: the 7,000 real Flickr8k image embeddings come first; every
further vector mixes two random real ones, x = a*u + (1-a)*v with a ~ U(0.5, 1), adds
Gaussian noise of norm 0.1, and is re-normalised. So the collection keeps the real
embeddings' geometry (no vector is a copy, neighbourhoods are realistic) at any size.
Each size gets a complete index directory (database rows, FAISS index chosen by the
production rule, manifest), served by the real service with the real text encoder, so
the latencies include text encoding. Queries are real captions, each text used once.
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import insert, select

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer import faiss_index, onnx_text  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from crossmodal.indexer.store import (Build, CaptionRow, Embedding, FolderRow, ImageRow, Store, load_embeddings, utcnow,  # noqa: E402
                           vector_to_bytes, vectors_from_bytes)
from crossmodal.search.engine import SearchEngine  # noqa: E402
from tests.benchmarks.http_latency import run as run_clients  # noqa: E402
from tests.benchmarks.results_file import record  # noqa: E402
from crossmodal.indexer.collection import hash_bytes  # noqa: E402
from crossmodal.indexer.hubness import Penalties, load_bank  # noqa: E402

RECALL_QUERIES = 1000


def real_embeddings(source: Path) -> tuple[str, np.ndarray, list[str], np.ndarray]:
    """(model, image vectors, caption texts, caption vectors) of a published real index."""
    store = Store(Settings(index_dir=source).resolved_database_url())
    build = store.published_build()
    if build is None:
        sys.exit(f"no published index in {source}: run tests/benchmarks/indexing.py first")
    with store.session() as s:
        hashes = sorted(set(s.scalars(select(ImageRow.content_hash))))
        texts = sorted(set(s.scalars(select(CaptionRow.text))))
        images = load_embeddings(s, build.model, "image", hashes)
        text_vectors = load_embeddings(s, build.model, "text", [hash_bytes(t.encode()) for t in texts])
    image_matrix = vectors_from_bytes([images[h] for h in hashes], build.dim)
    text_matrix = vectors_from_bytes([text_vectors[hash_bytes(t.encode())] for t in texts], build.dim)
    return build.model, image_matrix, texts, text_matrix


def synthesize(real: np.ndarray, n: int, seed: int = 0, keep_real: bool = True) -> np.ndarray:
    """`n` vectors: the real ones first (unless `keep_real` is false), then mixtures of two plus noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    head = min(n, len(real)) if keep_real else 0
    out[:head] = real[:head]
    for start in range(head, n, 100_000):
        m = min(100_000, n - start)
        a = rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32)
        mixed = a * real[rng.integers(0, len(real), m)] + (1 - a) * real[rng.integers(0, len(real), m)]
        mixed += rng.standard_normal(mixed.shape, dtype=np.float32) * (0.1 / np.sqrt(real.shape[1]))
        out[start:start + m] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    return out


def synthetic_build(s, model: str, root: Path) -> tuple[int, list]:
    """A building build over one folder `root` (rows in the caller's transaction): its id and the
    manifest's folder list."""
    build = Build(model=model, collection_root=str(root), status="building")
    folder = FolderRow(path=str(root), name=root.name)
    s.add_all([build, folder])
    s.flush()
    return build.id, [[folder.id, folder.name, folder.path]]


def synthetic_rows(start: int, stop: int, build_id: int, folders: list, digits: int = 7) -> list[dict]:
    """Image rows stop - start photos in the synthetic folder, ids start + 1 ... stop."""
    return [{"id": i + 1, "folder_id": folders[0][0], "path": f"synthetic/{i:0{digits}d}.jpg",
             "content_hash": f"{i:032x}", "bytes": 0, "width": 224, "height": 224, "mtime": 0.0,
             "build_id": build_id} for i in range(start, stop)]


def write_index_dir(index_dir: Path, vectors: np.ndarray, model: str, settings: Settings) -> dict:
    """A complete, published index directory, written with the indexer's own index code."""
    store = Store(settings.resolved_database_url())
    with store.session() as s, s.begin():
        build_id, folders = synthetic_build(s, model, index_dir)
        for start in range(0, len(vectors), 50_000):
            chunk = range(start, min(start + 50_000, len(vectors)))
            s.execute(insert(ImageRow), synthetic_rows(chunk.start, chunk.stop, build_id, folders))
            s.execute(insert(Embedding), [  # the exact vectors, as the indexer stores them
                {"model": model, "kind": "image", "key": f"{i:032x}", "vector": vector_to_bytes(vectors[i])}
                for i in chunk])
    index_type = faiss_index.choose_index_type(len(vectors), vectors.shape[1], settings.index_factory,
                                               settings.exact_search_max)
    start = time.perf_counter()
    index = faiss_index.build_index(vectors, np.arange(1, len(vectors) + 1), index_type, settings.use_gpu_faiss)
    build_seconds = time.perf_counter() - start
    build_dir = faiss_index.build_dir_for(index_dir, build_id)
    build_dir.mkdir(parents=True)
    faiss_index.write_build_index(build_dir, faiss_index.IMAGES_FILE, index, index_type,
                                  np.arange(1, len(vectors) + 1), vectors)
    empty = faiss_index.build_index(np.zeros((0, vectors.shape[1]), np.float32), np.zeros(0, np.int64), "Flat")
    faiss_index.write_index(empty, build_dir / faiss_index.CAPTIONS_FILE)
    params = faiss_index.default_search_params(index_type)
    bank = load_bank(model)  # served text queries are hubness-corrected, as after a real build
    if bank is not None:
        Penalties.of(np.arange(1, len(vectors) + 1), bank.penalties(vectors, "image")).save(
            build_dir / faiss_index.PENALTY_FILES[faiss_index.IMAGES_FILE])
    faiss_index.Manifest(build_id, model, vectors.shape[1], index_type, "Flat", len(vectors), 0, params,
                         bank.describe() if bank else {}, folders=folders).write(build_dir)
    with store.session() as s, s.begin():
        row = s.get(Build, build_id)
        row.status, row.dim, row.n_images, row.finished_at = "published", vectors.shape[1], len(vectors), utcnow()
        row.image_index_type, row.caption_index_type = index_type, "Flat"
    store.close()
    return {"index_type": index_type, "search_params": params, "build_seconds": build_seconds,
            "file": build_dir / faiss_index.IMAGES_FILE}


def index_memory(path: Path) -> int:
    """Resident bytes the loaded index adds to a fresh process (ids and hash maps included)."""
    code = ("import os, sys, faiss\n"
            "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            "before = rss(); index = faiss.read_index(sys.argv[1]); print(rss() - before)")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


def recall_and_memory(index_dir: Path, model: str, path: Path, params: dict, vectors: np.ndarray,
                      queries: np.ndarray) -> dict:
    """Recall@10 of what the engine serves (the index, plus re-ranking for lossy ones) against
    exact search over the same vectors; and the FAISS index's bytes per vector. A lossy index's
    exact vectors (for re-ranking) are counted apart: they stay on disk, read through the page cache."""
    in_memory = index_memory(path)
    engine = SearchEngine(Settings(index_dir=index_dir), encoder=_NoEncoder(model, vectors.shape[1]))
    start = time.perf_counter()
    found = [[hit.id for hit in engine.images_by_vector(q, 10)] for q in queries]
    engine_ms = (time.perf_counter() - start) / len(queries) * 1000
    exact = np.zeros((len(queries), 10), dtype=np.int64)
    best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), 200_000):  # exact top-10, chunk by chunk
        scores = queries @ vectors[start:start + 200_000].T
        top = np.argpartition(-scores, 10, axis=1)[:, :10] if scores.shape[1] > 10 else \
            np.tile(np.arange(scores.shape[1]), (len(queries), 1))
        merged_scores = np.concatenate([best, np.take_along_axis(scores, top, 1)], axis=1)
        merged_ids = np.concatenate([exact, top + start + 1], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :10]
        best, exact = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged_ids, keep, 1)
    recall = float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))
    n = len(vectors)
    exact_files = [path.parent / name for name in faiss_index.EXACT_FILES[path.name]]
    return {"recall_at_10": recall, "bytes_per_vector_disk": path.stat().st_size / n,
            "exact_vectors_bytes_per_vector_disk": sum(f.stat().st_size for f in exact_files if f.is_file()) / n,
            "bytes_per_vector_memory": in_memory / n, "engine_search_ms": engine_ms,
            "rerank_candidates": faiss_index.rerank_depth(engine.snapshot.manifest.image_index_type)}


class _NoEncoder:
    """Recall is measured from query vectors: the engine needs no model for it."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim


def serve(index_dir: Path, port: int, probe: str) -> tuple[subprocess.Popen, float]:
    """Start `crossmodal serve`; seconds until it answered its first query (the cold start)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "crossmodal.cli", "serve", "--index-dir", str(index_dir),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1/images/search"
    while time.perf_counter() - start < 600:
        try:
            if httpx.get(url, params={"q": probe}, timeout=5).status_code == 200:
                cold = time.perf_counter() - start
                wait_for_the_model(url)
                return process, cold
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"crossmodal serve exited with {process.returncode}")
        time.sleep(0.05)
    raise TimeoutError("the service did not answer within 600 s")


def wait_for_the_model(url: str) -> None:
    """Text queries are answered before the model has loaded (Fast start); it loads behind them and takes
    both cores for a few seconds. An image query waits for it, so latencies are measured after."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 30)).save(buffer, format="PNG")
    httpx.post(url, params={"k": 1}, files={"file": ("probe.png", buffer.getvalue(), "image/png")},
               timeout=300).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path(".cache/bench/indexing/index"))
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/scale"))
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--requests", type=int, default=300, help="requests per latency run")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    model, real, texts, text_vectors = real_embeddings(args.source)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(texts))
    recall_queries = text_vectors[order[:RECALL_QUERIES]]
    query_texts = [texts[i] for i in order[RECALL_QUERIES:]]
    print(f"{len(real)} real image vectors, {len(texts)} captions, model {model}")
    figures = {}
    for n in (int(x) for x in args.sizes.split(",")):
        index_dir = args.work / f"n{n}"
        subprocess.run(["rm", "-rf", str(index_dir)], check=True)
        settings = Settings(index_dir=index_dir)
        vectors = synthesize(real, n)
        built = write_index_dir(index_dir, vectors, model, settings)
        if (args.source / onnx_text.FOLDER).is_dir():  # the text tower `crossmodal index` exports (Fast start)
            shutil.copytree(args.source / onnx_text.FOLDER, index_dir / onnx_text.FOLDER)
            onnx_text.quantize_queries(index_dir, model)  # the int8 query tower, as a build would add it
        quality = recall_and_memory(index_dir, model, built["file"], built["search_params"], vectors, recall_queries)
        del vectors
        print(f"n={n:>9,}: {built['index_type']} {built['search_params']} built in {built['build_seconds']:.1f} s; "
              f"recall@10 {quality['recall_at_10']:.3f} (engine {quality['engine_search_ms']:.1f} ms/query); "
              f"{quality['bytes_per_vector_memory']:.0f} B/vector in memory, {quality['bytes_per_vector_disk']:.0f} "
              f"on disk (+ {quality['exact_vectors_bytes_per_vector_disk']:.0f} of exact vectors)")
        process, cold = serve(index_dir, args.port, query_texts[0])
        try:
            api = f"http://127.0.0.1:{args.port}"
            run_clients(api, query_texts[1:21], 1, 10)  # warm-up
            runs, used = [], 21
            for clients in (int(c) for c in args.clients.split(",")):
                batch = query_texts[used:used + args.requests]
                used += args.requests
                result = run_clients(api, batch, clients, 10)
                runs.append(result)
                print(f"    clients={clients:>3} p50={result['p50_ms']:.1f} ms p95={result['p95_ms']:.1f} ms "
                      f"p99={result['p99_ms']:.1f} ms qps={result['qps']:.1f} errors={result['errors']}")
        finally:
            process.terminate()
            process.wait(30)
        print(f"    cold start (serve -> first answered query): {cold:.1f} s")
        figures[str(n)] = {**{k: v for k, v in built.items() if k != "file"}, **quality,
                           "cold_start_seconds": cold, "http": runs}
    if not args.no_record:
        record("search_scale", figures, model=model,
               vectors="7,000 real Flickr8k image embeddings, then mixtures of two real ones plus noise (norm 0.1)",
               queries="real Flickr8k captions, each text used once; text encoding included")


if __name__ == "__main__":
    main()
