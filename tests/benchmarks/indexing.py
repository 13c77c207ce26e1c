"""Indexing throughput on Flickr8k (train + dev: 7,000 photos, 35,000 captions).

    .venv/bin/python tests/benchmarks/indexing.py            # full run, records results.json
    .venv/bin/python tests/benchmarks/indexing.py --limit 500 --no-record   # a quick look

Measured in one run, on one machine:
- model only: the encoder on already decoded and preprocessed tensors, at each batch size,
  best of 3 rounds, after the build; the default batch size also before it (this VM's speed
  drifts by several percent over minutes). The best of all is the ceiling the pipeline is
  compared with;
- end to end: a real `IndexBuilder` build (read, hash, decode, preprocess, encode, write
  to SQLite), timed over its image phase, from its first photo to the start of its captions
  phase; the model is loaded and warmed up beforehand so its load time is not counted. Its
  ratio to the ceiling is the pipeline's efficiency;
- the whole build (captions and FAISS indexes included), and a re-run with nothing
  changed, by a fresh builder as `crossmodal index` would run it.
The index it leaves (`--work`/index) feeds tests/benchmarks/search_scale.py.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder, Progress  # noqa: E402
from crossmodal.indexer.collection import decode_image  # noqa: E402
from crossmodal.indexer.encoder import Encoder, keep_freed_memory, load_encoder  # noqa: E402
from crossmodal.indexer.model_names import resolve_model_name  # noqa: E402
from crossmodal.indexer.pixels import stack  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402

SPLITS = ("train", "dev")


def merged_captions(data: Path, names: set[str] | None, dest: Path) -> Path:
    """One captions file for both splits, paths relative to the data folder."""
    with dest.open("w", newline="") as out:
        writer = csv.writer(out, delimiter="\t")
        writer.writerow(["image", "caption"])
        for split in SPLITS:
            with (data / split / "captions.tsv").open(newline="") as handle:
                for row in csv.DictReader(handle, delimiter="\t"):
                    if names is None or row["image"] in names:
                        writer.writerow([f"{split}/images/{row['image']}", row["caption"]])
    return dest


def collection(data: Path, work: Path, limit: int | None) -> tuple[Path, Path, list[Path]]:
    """The folder to index: Flickr8k in place, or a copy of its first `limit` photos."""
    images = sorted(p for split in SPLITS for p in (data / split / "images").glob("*.jpg"))
    if limit is None:
        return data, merged_captions(data, None, work / "captions.tsv"), images
    root = work / "subset"
    shutil.rmtree(root, ignore_errors=True)
    for path in images[:limit]:
        target = root / path.relative_to(data)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return root, merged_captions(data, {p.name for p in images[:limit]}, work / "captions.tsv"), images[:limit]


def model_only(encoder: Encoder, images: list[Path], batch_sizes: list[int], n: int = 256,
               rounds: int = 3) -> dict[str, float]:
    """Images/s of the model alone on ready tensors (`Encoder.prepare` outputs, as the build feeds
    it), per batch size: the best of `rounds` passes over n images, after warm-up batches (a
    traced model re-optimises for each new shape). The best round is the highest ceiling."""
    tensors = stack([encoder.prepare(decode_image(p.read_bytes(), 10**9)) for p in images[:n]])
    rates = {}
    for batch in batch_sizes:
        for _ in range(3):
            encoder.encode_image_tensors(tensors[:batch])
        seconds = []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(0, len(tensors), batch):
                encoder.encode_image_tensors(tensors[i:i + batch])
            seconds.append(time.perf_counter() - start)
        rates[str(batch)] = len(tensors) / min(seconds)
        print(f"  model only, batch {batch:>3}: {rates[str(batch)]:.1f} images/s "
              f"(rounds: {', '.join(f'{len(tensors) / s:.1f}' for s in seconds)})")
    return rates


def warm_up(encoder: Encoder, image: Path) -> None:
    """Trace the image tower and let TorchScript optimise it for batches of the build's size,
    as the model-only runs do, so neither figure carries that one-off cost."""
    batch = stack([encoder.prepare(decode_image(image.read_bytes(), 10**9))] * encoder.image_batch_size)
    for _ in range(3):
        encoder.encode_image_tensors(batch)


class PhaseClock:
    """Start times of the build's phases, from its progress callback."""

    def __init__(self):
        self.started: dict[str, float] = {}

    def __call__(self, progress: Progress) -> None:
        self.started.setdefault(progress.phase, time.perf_counter())

    def seconds(self, phase: str, next_phase: str) -> float:
        return self.started[next_phase] - self.started[phase]


def rerun_processes(root: Path, captions: Path, index_dir: Path, device: str, model: str,
                    runs: int = 3) -> list[float]:
    """Wall clock of `crossmodal index` over the unchanged collection, as a user runs it (imports
    included): issue 18's goal is 1.5 s at 7,000 photos, no model loaded."""
    command = [sys.executable, "-m", "crossmodal.cli", "index", str(root), "--captions", str(captions),
               "--index-dir", str(index_dir), "--device", device, "--model", model]
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if done.returncode != 0 or "nothing changed" not in done.stdout:
            sys.exit(f"the re-run did not keep the build:\n{done.stdout}\n{done.stderr}")
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/indexing"))
    parser.add_argument("--limit", type=int, help="index only the first N photos (a copy)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", help="encoder name (default: the settings' model), e.g. ViT-B-32:/path/to/file.pt")
    parser.add_argument("--batch-sizes", default="1,4,8,16,32,64")
    parser.add_argument("--no-record", action="store_true", help="print only; leave results.json alone")
    args = parser.parse_args()
    if not (args.data / "train" / "captions.tsv").is_file():
        sys.exit(f"{args.data} has no Flickr8k train/ split (see ../shared/datasets/flickr8k/README.md)")
    args.work.mkdir(parents=True, exist_ok=True)
    root, captions, images = collection(args.data, args.work, args.limit)
    index_dir = args.work / "index"
    shutil.rmtree(index_dir, ignore_errors=True)
    settings = Settings(index_dir=index_dir, device=args.device, **({"model": args.model} if args.model else {}))

    start = time.perf_counter()
    keep_freed_memory()  # as IndexBuilder does when it loads the model for `crossmodal index`
    encoder = load_encoder(resolve_model_name(settings.model), settings.device)  # the alias names the current version
    load_seconds = time.perf_counter() - start
    print(f"{len(images)} photos; model {encoder.name} on {encoder.device} loaded in {load_seconds:.1f} s")
    warm_up(encoder, images[0])
    print("before the build:")
    before = model_only(encoder, images, [encoder.image_batch_size])
    clock = PhaseClock()
    report = IndexBuilder(settings, encoder=encoder).build(root, captions, progress=clock)
    image_seconds = clock.seconds("images", "captions")
    end_to_end = report.n_images / image_seconds
    print(f"  the build measured its CPU batch size: {encoder.cpu_batch_size} (batch_size.py)")
    print("after the build:")
    rates = model_only(encoder, images, [int(b) for b in args.batch_sizes.split(",")])
    best_batch, ceiling = max([*rates.items(), *before.items()], key=lambda item: item[1])
    print(f"  end to end (image phase): {report.n_images} images in {image_seconds:.1f} s = {end_to_end:.1f} "
          f"images/s; efficiency {end_to_end / ceiling:.2f} of the model-only {ceiling:.1f} (batch {best_batch})")
    print(f"  whole build: {report.seconds:.1f} s ({report.n_captions} captions, "
          f"captions phase {clock.seconds('captions', 'indexing'):.1f} s); skipped {len(report.skipped)}")

    start = time.perf_counter()
    rerun = IndexBuilder(settings).build(root, captions)
    rerun_seconds = time.perf_counter() - start
    print(f"  re-run, nothing changed: {rerun_seconds:.1f} s ({rerun.n_embedded} embedded, "
          f"{rerun.n_reused} reused)")
    process_walls = rerun_processes(root, captions, index_dir, args.device, settings.model)
    print(f"  the same re-run as a `crossmodal index` process, wall clock: "
          f"{', '.join(f'{w:.2f}' for w in process_walls)} s")

    figures = {"photos": report.n_images, "captions": report.n_captions, "model_load_seconds": load_seconds,
               "model_only_images_per_second": rates, "model_only_before_build": before,
               "best_batch": int(best_batch), "ceiling_images_per_second": ceiling,
               "measured_cpu_batch": encoder.cpu_batch_size,
               "end_to_end_images_per_second": end_to_end, "efficiency": end_to_end / ceiling,
               "image_phase_seconds": image_seconds, "whole_build_seconds": report.seconds,
               "captions_phase_seconds": clock.seconds("captions", "indexing"),
               "rerun_unchanged_seconds": rerun_seconds, "rerun_embedded": rerun.n_embedded,
               "rerun_unchanged_kept_build": rerun.unchanged, "rerun_process_wall_seconds": process_walls,
               "decode_threads": settings.decode_threads}
    if not args.no_record:
        record("indexing", figures, model=encoder.name, device=str(encoder.device),
               image_index_type=report.image_index_type, caption_index_type=report.caption_index_type,
               data="flickr8k train+dev" if args.limit is None else f"flickr8k first {args.limit} photos")


if __name__ == "__main__":
    main()
