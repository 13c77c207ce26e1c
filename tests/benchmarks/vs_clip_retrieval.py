"""`crossmodal index` against clip-retrieval's `clip-retrieval inference`, same photos, same ViT-B-32 weights.

clip-retrieval wants numpy<2 and open-clip<3, so it lives in its own virtual environment, with torch
pinned at ours (it installs from local disk on our machines). Once:

    python3.11 -m venv .cache/clip-retrieval-venv
    .cache/clip-retrieval-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
    .cache/clip-retrieval-venv/bin/pip install clip-retrieval "numpy<2" "open-clip-torch<3" "setuptools<80" \
        torch==2.14.1 torchvision==0.29.1

(setuptools: clip-retrieval's `clip` package still imports pkg_resources.) Then, ~15 min:

    .venv/bin/python tests/benchmarks/vs_clip_retrieval.py --clip-retrieval-venv .cache/clip-retrieval-venv

Photos: the first 1,000 Flickr8k train photos, copied to a work folder, no captions (clip-retrieval
runs with --enable_text False). Weights: --checkpoint FILE (an open_clip ViT-B-32 state dict); without
one, random weights are saved to a file first (no internet here; speed does not depend on them).
`--make-checkpoint FILE` only writes such a file.

Each run is a whole process, from start to exit, into a fresh output folder or index directory: ours
pays its model load, ONNX export (+int8) and batch-size measurement every time, as a first index does;
clip-retrieval pays its warm-up. Runs alternate (clip-retrieval, float32, +int8) for three rounds;
images/s = photos / wall seconds, median of the three, and its ratio to clip-retrieval's is recorded.
clip-retrieval's own steady rate (its last `sample_per_sec`) is printed beside it. Vectors: the
cosine of ours to clip-retrieval's on the first 200 photos (the weights are the same; the resize differs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402

CROSSMODAL = Path(sys.executable).parent / "crossmodal"
COMPARED = 200  # photos whose vectors are compared


def make_checkpoint(path: Path) -> None:
    """open_clip ViT-B-32 with random weights, saved as a state dict both programs load."""
    import open_clip
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)


def photos_folder(data: Path, work: Path, n: int) -> Path:
    folder = work / f"photos-{n}"
    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for photo in sorted((data / "train" / "images").glob("*.jpg"))[:n]:
            shutil.copyfile(photo, folder / photo.name)
    return folder


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{command[0]} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def clip_retrieval(venv: Path, photos: Path, checkpoint: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """(wall seconds, clip-retrieval's last reported sample_per_sec)."""
    shutil.rmtree(out, ignore_errors=True)
    seconds, output = timed([str(venv / "bin" / "clip-retrieval"), "inference", "--input_dataset", str(photos),
                             "--output_folder", str(out), "--enable_text", "False", "--batch_size", str(batch_size),
                             "--clip_model", f"open_clip:ViT-B-32/{checkpoint}"])
    rates = re.findall(r"sample_per_sec (\d+)", output)
    return seconds, float(rates[-1]) if rates else float("nan")


def crossmodal(photos: Path, model: str, index_dir: Path) -> float:
    shutil.rmtree(index_dir, ignore_errors=True)
    seconds, _ = timed([str(CROSSMODAL), "index", str(photos), "--model", model],
                       env={"CROSSMODAL_INDEX_DIR": str(index_dir), "CROSSMODAL_DEVICE": "cpu"})
    return seconds


def their_vectors(venv: Path, out: Path) -> dict[str, np.ndarray]:
    """clip-retrieval's image vectors by file name (its metadata is parquet: read in its own environment)."""
    names = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import json, sys, pandas; print(json.dumps(list(pandas.read_parquet(sys.argv[1])"
                            "['image_path'])))", str(out / "metadata" / "metadata_0.parquet")],
                           capture_output=True, text=True, check=True).stdout
    vectors = np.load(out / "img_emb" / "img_emb_0.npy").astype(np.float32)
    return {Path(name).name: vector for name, vector in zip(json.loads(names), vectors)}


def cosines(model: str, index_dir: Path, photos: list[Path], theirs: dict[str, np.ndarray]) -> tuple[float, float]:
    """Lowest and mean cosine of our vectors (the model `crossmodal index` ran, its towers as exported) to theirs."""
    from crossmodal.indexer.collection import decode_image
    from crossmodal.indexer.encoder import load_encoder
    from crossmodal.indexer.settings import Settings

    encoder = load_encoder(model, "cpu", Settings(index_dir=index_dir).compressed_tower_dir)
    ours = encoder.encode_images([decode_image(p.read_bytes(), 10**9) for p in photos])
    reference = np.stack([theirs[p.name] for p in photos])
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    values = (ours * reference).sum(1)
    return float(values.min()), float(values.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-retrieval-venv", type=Path, help="the virtual environment set up as above")
    parser.add_argument("--checkpoint", type=Path, help="ViT-B-32 weights (default: random weights, written once)")
    parser.add_argument("--make-checkpoint", type=Path, metavar="FILE", help="only write random ViT-B-32 weights")
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cr-batch-size", type=int, default=64,
                        help="clip-retrieval's batch (its default, 256, spends ~55 s of a run warming up here)")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/vs-clip-retrieval"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint)
        return
    venv = args.clip_retrieval_venv
    if venv is None or not (venv / "bin" / "clip-retrieval").is_file():
        sys.exit("--clip-retrieval-venv: a virtual environment with clip-retrieval installed (see above)")
    if not (args.data / "train" / "images").is_dir():
        sys.exit(f"{args.data} has no Flickr8k train split (see ../shared/datasets/flickr8k/README.md)")
    checkpoint = (args.checkpoint or args.work / "vit-b-32-random.pt").resolve()
    if not checkpoint.is_file():
        make_checkpoint(checkpoint)
    photos = photos_folder(args.data, args.work, args.photos)
    models = {"float32": f"ViT-B-32:{checkpoint}", "int8": f"ViT-B-32:{checkpoint}+int8"}
    walls: dict[str, list[float]] = {"clip-retrieval": [], **{name: [] for name in models}}
    steady = []
    for round_ in range(1, args.rounds + 1):
        seconds, rate = clip_retrieval(venv, photos, checkpoint, args.work / "clip-retrieval-out", args.cr_batch_size)
        walls["clip-retrieval"].append(seconds)
        steady.append(rate)
        for name, model in models.items():
            walls[name].append(crossmodal(photos, model, args.work / f"index-{name}"))
        print(f"round {round_}: " + ", ".join(f"{name} {w[-1]:.1f} s" for name, w in walls.items())
              + f" (clip-retrieval's own rate: {rate:.0f} images/s)", flush=True)
    rates = {name: args.photos / statistics.median(w) for name, w in walls.items()}
    theirs = their_vectors(venv, args.work / "clip-retrieval-out")
    compared = sorted(photos.iterdir())[:COMPARED]
    figures = {"photos": args.photos, "rounds": args.rounds, "clip_retrieval_batch_size": args.cr_batch_size,
               "clip_retrieval_steady_images_per_second": statistics.median(steady)}
    for name, rate in rates.items():
        figures[name] = {"wall_seconds": walls[name], "images_per_second": rate,
                         "ratio_to_clip_retrieval": rate / rates["clip-retrieval"]}
        if name in models:
            figures[name]["cosine_to_clip_retrieval_lowest"], figures[name]["cosine_to_clip_retrieval_mean"] = \
                cosines(models[name], args.work / f"index-{name}", compared, theirs)
        print(f"{name:>14}: {rate:.1f} images/s (median wall {statistics.median(walls[name]):.1f} s), "
              f"{figures[name]['ratio_to_clip_retrieval']:.2f}x clip-retrieval"
              + (f"; cosine to its vectors: lowest {figures[name]['cosine_to_clip_retrieval_lowest']:.4f}, "
                 f"mean {figures[name]['cosine_to_clip_retrieval_mean']:.4f}" if name in models else ""))
    if not args.no_record:
        record("vs_clip_retrieval", figures, model="ViT-B-32", device="cpu",
               weights=str(args.checkpoint) if args.checkpoint else "random weights saved to a file (no internet)",
               data=f"first {args.photos} Flickr8k train photos")


if __name__ == "__main__":
    main()
