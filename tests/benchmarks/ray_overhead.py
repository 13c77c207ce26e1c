"""Ray's overhead: the image phase of one build in-process against the same build with `--ray`.

    .venv/bin/python tests/benchmarks/ray_overhead.py                 # 7,000 Flickr8k photos, records
    .venv/bin/python tests/benchmarks/ray_overhead.py --limit 300 --no-record

Both builds embed the same copied photos (Flickr8k train, then dev) into fresh index
directories, with no captions, on this machine's cores, each as `crossmodal index` runs it:
in a fresh process, whose image phase includes importing open_clip and loading the model.
Each round runs two Ray builds on a local cluster started beforehand and left to settle (`ray
start --head --num-cpus N`, as a cluster is up before anyone indexes on it): the cluster's
first Ray Data job, which also starts Ray Data's own detached actors, and a later job, which
finds them. Their phases pay Ray's start-up: the driver joins the cluster and the encoder
actors start, import torch and load the model. The cluster is then stopped and the
in-process build runs. Rounds (default 2) average out this VM's drift of about 5 % between
minutes. Figures: each image phase's seconds and throughput, the seconds to its first stored
batch (what a build pays once), and the ratios of the mean throughputs, whole and steady
state (after the first batch).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder, Progress  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests import ray_cluster  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402
from tests.conftest import free_port  # noqa: E402


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


def on_ray(settings: Settings, folder: Path, work: Path, cpus: int, settle: float) -> list[dict[str, float]]:
    """Two builds with --ray on a local cluster that is up and idle before the first starts. The
    first is the cluster's first Ray Data job, and pays for Ray Data's own actors (statistics,
    autoscaling, actor locations, usage), which are detached: later jobs on the cluster find them."""
    address = ray_cluster.start_head(free_port(), work / "ray_token", cpus=cpus)
    try:
        time.sleep(settle)
        return [build(settings.model_copy(update={"index_dir": work / f"ray{run}", "ray_address": address}), folder)
                for run in (1, 2)]
    finally:
        ray_cluster.stop()
        for run in (1, 2):
            shutil.rmtree(work / f"ray{run}", ignore_errors=True)


KINDS = {"ray_first_job": "--ray, the cluster's first Ray Data job", "ray": "--ray, a later job",
         "in_process": "in-process"}


def mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--limit", type=int, default=7000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=15.0, help="seconds the new cluster idles before the build")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    try:
        folder = photos(args.data, work, args.limit)
        base = Settings(device="cpu", index_dir=work / "local")
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            first_job, later_job = on_ray(base, folder, work, args.cpus, args.settle)
            for kind, figures in zip(KINDS, (first_job, later_job, build(base, folder))):
                runs[kind].append(figures)
                print(f"{KINDS[kind]}: {figures['images_per_second']:.1f} images/s ({figures['seconds']:.1f} s, first "
                      f"batch after {figures['first_batch_seconds']:.1f} s, steady "
                      f"{figures['steady_images_per_second']:.1f})", flush=True)
            shutil.rmtree(work / "local")
        means = {kind: mean(kind_runs) for kind, kind_runs in runs.items()}
        local = means["in_process"]
        figures = {"photos": len(list(folder.iterdir())), "ray_cpus": args.cpus, "rounds": args.rounds, **means,
                   "ratio": means["ray"]["images_per_second"] / local["images_per_second"],
                   "steady_ratio": means["ray"]["steady_images_per_second"] / local["steady_images_per_second"],
                   "first_job_ratio": means["ray_first_job"]["images_per_second"] / local["images_per_second"],
                   "runs": runs}
        print(f"ratio --ray / in-process (means of {args.rounds} rounds): {figures['ratio']:.3f} (steady state "
              f"{figures['steady_ratio']:.3f}), overhead {100 * (1 - figures['ratio']):.1f} %; on the cluster's first "
              f"Ray Data job {figures['first_job_ratio']:.3f}, overhead {100 * (1 - figures['first_job_ratio']):.1f} %")
        if not args.no_record:
            record("ray_overhead", figures, model=base.model, device="cpu", data="flickr8k train, then dev",
                   note="image phase of a build without captions, model loading included; the Ray figures include "
                        "joining the cluster and starting the encoder actors; 'ray' is a later job on the cluster, "
                        "'ray_first_job' its first Ray Data job, which also starts Ray Data's detached actors")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
