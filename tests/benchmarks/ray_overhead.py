"""Ray's overhead: the image phase of one build in-process against the same build with `--ray`.

    .venv/bin/python tests/benchmarks/ray_overhead.py                 # 2,000 Flickr8k photos, records
    .venv/bin/python tests/benchmarks/ray_overhead.py --limit 300 --no-record

Both builds embed the same copied photos into fresh index directories, with no captions,
on this machine's cores: in-process, then on a local Ray cluster started here (`ray start
--head --num-cpus N`). Figures: each image phase's throughput, and their ratio. The Ray
figure includes starting the encoder actors (loading the model once per actor), which a
long build pays once; the steady-state ratio leaves out the first batch of each.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder, Progress  # noqa: E402
from crossmodal.indexer.encoder import load_encoder  # noqa: E402
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
                "steady_images_per_second": (self.total - self.first_done) / (self.end - self.first)}


def photos(data: Path, work: Path, limit: int) -> Path:
    folder = work / "photos"
    folder.mkdir(parents=True)
    for path in sorted((data / "train" / "images").iterdir())[:limit]:
        shutil.copyfile(path, folder / path.name)
    return folder


def build(settings: Settings, folder: Path, encoder=None) -> dict[str, float]:
    clock = ImageClock()
    report = IndexBuilder(settings, encoder=encoder).build(folder, progress=clock)
    assert report.n_embedded == report.n_images, report
    return clock.figures()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    try:
        folder = photos(args.data, work, args.limit)
        base = Settings(device="cpu", index_dir=work / "local")
        encoder = load_encoder(base.model, "cpu")
        local = build(base, folder, encoder)
        print(f"in-process: {local['images_per_second']:.1f} images/s ({local['seconds']:.1f} s)")
        del encoder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = ray_cluster.start_head(port, work / "ray_token", cpus=args.cpus)
        try:
            on_ray = build(base.model_copy(update={"index_dir": work / "ray", "ray_address": address}), folder)
        finally:
            import ray

            ray.shutdown()
            ray_cluster.stop()
        print(f"--ray:      {on_ray['images_per_second']:.1f} images/s ({on_ray['seconds']:.1f} s, "
              f"steady {on_ray['steady_images_per_second']:.1f})")
        figures = {"photos": args.limit, "ray_cpus": args.cpus, "in_process": local, "ray": on_ray,
                   "ratio": on_ray["images_per_second"] / local["images_per_second"],
                   "steady_ratio": on_ray["steady_images_per_second"] / local["steady_images_per_second"]}
        print(f"ratio --ray / in-process: {figures['ratio']:.3f} (steady state {figures['steady_ratio']:.3f}); "
              f"overhead {100 * (1 - figures['ratio']):.1f} %")
        if not args.no_record:
            record("ray_overhead", figures, model=base.model, device="cpu", data="flickr8k train, first photos",
                   note="image phase of a build without captions; the Ray figure includes starting the actors")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
