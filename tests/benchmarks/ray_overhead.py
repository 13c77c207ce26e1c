"""Ray's overhead: the image phase of one build in-process against the same build with `--ray`.

    .venv/bin/python tests/benchmarks/ray_overhead.py                 # 7,000 Flickr8k photos, records
    .venv/bin/python tests/benchmarks/ray_overhead.py --limit 300 --no-record

Both builds embed the same copied photos (Flickr8k train, then dev) into fresh index
directories, with no captions, on this machine's cores, each as `crossmodal index` runs it:
in a fresh process, whose image phase includes importing open_clip and loading the model.
The Ray build runs first, on a local cluster started beforehand and left to settle (`ray
start --head --num-cpus N`, as a cluster is up before anyone indexes on it); its phase also
pays Ray's start-up: the driver joins the cluster and the encoder actors start, import torch
and load the model. The cluster is stopped before the in-process build. Figures: each image
phase's seconds and throughput, the seconds to its first stored batch (what a build pays
once), and the ratios, whole and steady state (after the first batch).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder, Progress  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests import ray_cluster  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402


class ImageClock:
    """When the image phase started, when its first batch landed, and when it ended."""

    def __init__(self):
        self.start = self.first = self.end = 0.0
        self.first_done = 0
        self.total = 0

    def __call__(self, progress: Progress) -> None:
        now = time.perf_counter()
        if progress.phase == "images":
            if not self.start:
                self.start, self.total = now, progress.total
            elif progress.done and not self.first:
                self.first, self.first_done = now, progress.done
            if progress.done == progress.total:
                self.end = now

    def figures(self) -> dict[str, float]:
        return {"seconds": self.end - self.start, "images_per_second": self.total / (self.end - self.start),
                "first_batch_seconds": self.first - self.start,
                "steady_images_per_second": (self.total - self.first_done) / (self.end - self.first)}


def photos(data: Path, work: Path, limit: int) -> Path:
    folder = work / "photos"
    folder.mkdir(parents=True)
    every = [path for split in ("train", "dev") for path in sorted((data / split / "images").iterdir())]
    for path in every[:limit]:
        shutil.copyfile(path, folder / path.name)
    return folder


def build(settings: Settings, folder: Path) -> dict[str, float]:
    """One build in a fresh process, as `crossmodal index` runs it: it imports torch and open_clip itself."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(_build_here, (settings, folder))
    finally:
        pool.close()  # lets the child exit by itself (a Ray driver reports a SIGTERM loudly)
        pool.join()


def _build_here(settings: Settings, folder: Path) -> dict[str, float]:
    clock = ImageClock()
    report = IndexBuilder(settings).build(folder, progress=clock)
    assert not report.skipped and report.n_images == len(list(folder.iterdir())), report
    return clock.figures()


def on_ray(settings: Settings, folder: Path, work: Path, cpus: int, settle: float) -> dict[str, float]:
    """The build with --ray on a local cluster that is up and idle before it starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = ray_cluster.start_head(port, work / "ray_token", cpus=cpus)
    try:
        time.sleep(settle)
        return build(settings.model_copy(update={"index_dir": work / "ray", "ray_address": address}), folder)
    finally:
        ray_cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--limit", type=int, default=7000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--settle", type=float, default=15.0, help="seconds the new cluster idles before the build")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    try:
        folder = photos(args.data, work, args.limit)
        base = Settings(device="cpu", index_dir=work / "local")
        ray_figures = on_ray(base, folder, work, args.cpus, args.settle)
        print(f"--ray:      {ray_figures['images_per_second']:.1f} images/s ({ray_figures['seconds']:.1f} s, "
              f"first batch after {ray_figures['first_batch_seconds']:.1f} s, "
              f"steady {ray_figures['steady_images_per_second']:.1f})")
        local = build(base, folder)
        print(f"in-process: {local['images_per_second']:.1f} images/s ({local['seconds']:.1f} s, "
              f"first batch after {local['first_batch_seconds']:.1f} s, "
              f"steady {local['steady_images_per_second']:.1f})")
        figures = {"photos": len(list(folder.iterdir())), "ray_cpus": args.cpus, "in_process": local,
                   "ray": ray_figures, "ratio": ray_figures["images_per_second"] / local["images_per_second"],
                   "steady_ratio": ray_figures["steady_images_per_second"] / local["steady_images_per_second"]}
        print(f"ratio --ray / in-process: {figures['ratio']:.3f} (steady state {figures['steady_ratio']:.3f}); "
              f"overhead {100 * (1 - figures['ratio']):.1f} %")
        if not args.no_record:
            record("ray_overhead", figures, model=base.model, device="cpu", data="flickr8k train, then dev",
                   note="image phase of a build without captions, model loading included; the Ray figure includes "
                        "joining the cluster and starting the actors")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
