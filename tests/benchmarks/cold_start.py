"""Start-up from a cold process (issue 18): a one-shot CLI search, and the service until it is ready.

    .venv/bin/python tests/benchmarks/indexing.py      # first: builds .cache/bench/indexing/index (7,000 photos)
    .venv/bin/python tests/benchmarks/cold_start.py    # ~1 min; records results.json

Measured as a user runs them, imports included, each a new process:
- `crossmodal search "two dogs play in the snow" -k 3`: wall clock from start to exit, five runs
  (issue 18's goal: 2 s);
- `crossmodal serve`: seconds until `/ready` says true (goal: 2 s), and until a text query is
  answered, three runs.
The unchanged re-run of `crossmodal index` is measured by indexing.py (its `rerun_process_wall_seconds`).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.results_file import record  # noqa: E402
from tests.conftest import free_port  # noqa: E402

QUERY = "two dogs play in the snow"
CLI = [sys.executable, "-m", "crossmodal.cli"]


def one_shot_search(index_dir: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([*CLI, "search", QUERY, "-k", "3", "--index-dir", str(index_dir)],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or "images" not in done.stdout:
        sys.exit(f"crossmodal search failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def service_start(index_dir: Path) -> tuple[float, float]:
    """(seconds until /ready is true, seconds until a text query is answered) of a new `crossmodal serve`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    process = subprocess.Popen([*CLI, "serve", "--index-dir", str(index_dir), "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ready = None
    try:
        while time.perf_counter() - start < 120:
            if process.poll() is not None:
                sys.exit(f"crossmodal serve exited with {process.returncode}")
            try:
                if ready is None and httpx.get(f"{base}/ready", timeout=5).json().get("ready"):
                    ready = time.perf_counter() - start
                if ready is not None and httpx.get(f"{base}/v1/images/search", params={"q": QUERY},
                                                   timeout=30).status_code == 200:
                    return ready, time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        sys.exit("the service did not answer within 120 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index-dir", type=Path, default=Path(".cache/bench/indexing/index"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not (args.index_dir / "builds").is_dir():
        sys.exit(f"no index in {args.index_dir}: run tests/benchmarks/indexing.py first (or give --index-dir)")
    one_shot_search(args.index_dir)  # the first run after a build also warms the page cache: not counted
    searches = [one_shot_search(args.index_dir) for _ in range(5)]
    print(f"crossmodal search, wall: {spread(searches)} (goal: 2 s)")
    starts = [service_start(args.index_dir) for _ in range(3)]
    ready, answered = [r for r, _ in starts], [a for _, a in starts]
    print(f"crossmodal serve, /ready: {spread(ready)} (goal: 2 s); first query answered: {spread(answered)}")
    if not args.no_record:
        record("cold_start", {"search_wall_seconds": searches, "serve_ready_seconds": ready,
                              "serve_first_answer_seconds": answered}, device="cpu", index=str(args.index_dir),
               query=QUERY)


if __name__ == "__main__":
    main()
