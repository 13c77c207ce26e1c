"""Text-to-image latency over HTTP against a running service: p50/p95/p99 and QPS.

    crossmodal serve --index-dir IDX &          # then:
    python tests/benchmarks/http_latency.py --api http://127.0.0.1:8000 \
        --queries ../shared/datasets/flickr8k/dev/captions.tsv --clients 1 8

Each query text is used once, so the service's query cache does not flatter the figures.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time

import httpx


def load_queries(path: str, n: int) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        texts = list(dict.fromkeys(row["caption"] for row in csv.DictReader(handle, delimiter="\t")))
    return texts[:n]


def run(api: str, queries: list[str], clients: int, k: int, params: dict | None = None) -> dict:
    """`params`: more query parameters on every request (filters, sort, mode)."""
    latencies: list[float] = []
    errors = short = 0  # short: answered with fewer than k results
    lock = threading.Lock()
    chunks = [queries[i::clients] for i in range(clients)]

    def worker(chunk: list[str]) -> None:
        nonlocal errors, short
        with httpx.Client(base_url=api, timeout=30) as http:
            for text in chunk:
                start = time.perf_counter()
                response = http.get("/v1/images/search", params={"q": text, "k": k, **(params or {})})
                elapsed = time.perf_counter() - start
                ok = response.status_code == 200
                with lock:
                    latencies.append(elapsed)
                    errors += not ok
                    short += ok and len(response.json()["results"]) < k

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = sorted(x * 1000 for x in latencies)
    pct = lambda p: ms[min(len(ms) - 1, int(p / 100 * len(ms)))]
    return {"clients": clients, "requests": len(ms), "errors": errors, "short": short, "p50_ms": pct(50),
            "p95_ms": pct(95), "p99_ms": pct(99), "mean_ms": statistics.mean(ms), "qps": len(ms) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--queries", required=True, help="TSV with a caption column (query texts)")
    parser.add_argument("--requests", type=int, default=300, help="requests per run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    texts = load_queries(args.queries, args.requests * len(args.clients) + 20)
    run(args.api, texts[:20], 1, args.k)  # warm-up
    for i, clients in enumerate(args.clients):
        batch = texts[20 + i * args.requests: 20 + (i + 1) * args.requests]
        r = run(args.api, batch, clients, args.k)
        print(f"clients={r['clients']:>3} requests={r['requests']} errors={r['errors']} p50={r['p50_ms']:.1f} ms "
              f"p95={r['p95_ms']:.1f} ms p99={r['p99_ms']:.1f} ms qps={r['qps']:.1f}")


if __name__ == "__main__":
    main()
