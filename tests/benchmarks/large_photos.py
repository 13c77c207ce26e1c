"""Indexing camera-sized photos: decoding at reduced scale (DCT domain) against full decoding.

    .venv/bin/python tests/benchmarks/large_photos.py --phone-photos DIR   # ~3 min; records results.json
    CROSSMODAL_MODEL=ViT-B-32:FILE .venv/bin/python tests/benchmarks/large_photos.py --work .cache/bench/large-photos-vit

Three sets of 60 JPEGs, each a distinct file (a comment segment makes each copy new content):
- `small`: 30 Flickr8k dev photos as they are (about 500x375), two copies each: the rate the goal
  is measured against;
- `phone`: real phone photos (3.3-6 MP, one EXIF-rotated), ten copies each. Pass a folder of them
  with --phone-photos; the figures in the README used the six `originals/*.jpg` of
  github.com/tomsaleeba/test-data-site (an LG phone, under 4 MiB each);
- `12mp`, `24mp`: the 30 Flickr photos upscaled to 4000x3000 and 6000x4000 (Lanczos, JPEG
  quality 90): camera-sized files, smoother than a camera's.

For each set: the image phase of a real build (read, hash, decode, prepare, encode, write),
once decoding at reduced scale (the default) and once decoding whole; and how far the vectors
of the two decodings are apart (cosine).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from crossmodal.indexer.builder import IndexBuilder  # noqa: E402
from crossmodal.indexer.collection import decode_for_model  # noqa: E402
from crossmodal.indexer.encoder import ImagePreparer, load_encoder  # noqa: E402
from crossmodal.indexer.model_names import default_model_version, resolve_model_name, split_variant  # noqa: E402
from crossmodal.indexer.pixels import stack  # noqa: E402
from crossmodal.indexer.settings import Settings  # noqa: E402
from tests.benchmarks.indexing import PhaseClock, warm_up  # noqa: E402
from tests.benchmarks.results_file import FLICKR8K, record  # noqa: E402

PHOTOS = 60


class WholeDecode(ImagePreparer):
    """The same preparer, decoding every photo at full size (the comparison)."""

    decode_side = 0


def distinct_copies(sources: list[Path], folder: Path, total: int = PHOTOS) -> None:
    """`total` JPEGs from `sources`, each with its own comment segment (new bytes, same pixels)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(total):
        data = sources[i % len(sources)].read_bytes()
        note = f"copy {i}".encode()
        comment = b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note
        (folder / f"{i:03d}.jpg").write_bytes(data[:2] + comment + data[2:])


def upscaled(sources: list[Path], folder: Path, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for source in sources:
        target = folder / source.name
        if not target.exists():
            Image.open(source).convert("RGB").resize(size, Image.LANCZOS).save(target, quality=90)
        made.append(target)
    return made


def image_phase_rate(folder: Path, index_dir: Path, encoder) -> float:
    shutil.rmtree(index_dir, ignore_errors=True)
    clock = PhaseClock()
    report = IndexBuilder(Settings(index_dir=index_dir, device="cpu"), encoder=encoder).build(folder, progress=clock)
    return report.n_images / clock.seconds("images", "indexing" if "captions" not in clock.started else "captions")


def vector_distance(sources: list[Path], encoder) -> tuple[float, float]:
    """(lowest, mean) cosine between each photo's vector decoded whole and at reduced scale."""
    side = encoder.preparer.decode_side
    full = [decode_for_model(p.read_bytes(), 10**9)[0] for p in sources]
    reduced = [decode_for_model(p.read_bytes(), 10**9, side)[0] for p in sources]
    a = encoder.encode_image_tensors(stack([encoder.prepare(x) for x in full]))
    b = encoder.encode_image_tensors(stack([encoder.prepare(x) for x in reduced]))
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosines.min()), float(cosines.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=FLICKR8K)
    parser.add_argument("--phone-photos", type=Path, help="a folder of real camera or phone JPEGs")
    parser.add_argument("--work", type=Path, default=Path(".cache/bench/large-photos"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    flickr = sorted((args.data / "dev" / "images").glob("*.jpg"))[:30]
    if not flickr:
        sys.exit(f"{args.data} has no Flickr8k dev split (see ../shared/datasets/flickr8k/README.md)")
    sets = {"small": flickr,
            "12mp": upscaled(flickr, args.work / "sources-12mp", (4000, 3000)),
            "24mp": upscaled(flickr, args.work / "sources-24mp", (6000, 4000))}
    if args.phone_photos:
        sets["phone"] = sorted(args.phone_photos.glob("*.jpg"))
    encoder = load_encoder(resolve_model_name(Settings().model), "cpu")
    warm_up(encoder, flickr[0])
    print(f"model {encoder.name}; decoded at a short side of at least {encoder.preparer.decode_side} px")
    figures: dict[str, dict] = {}
    for name, sources in sets.items():
        folder = args.work / name
        distinct_copies(sources, folder)
        megapixels = np.mean([np.prod(Image.open(p).size) for p in sources]) / 1e6
        reduced = image_phase_rate(folder, args.work / "index", encoder)
        preparer, encoder.preparer = encoder.preparer, WholeDecode(encoder.preparer.preprocess, encoder.preparer.pixels)
        try:
            whole = image_phase_rate(folder, args.work / "index", encoder)
        finally:
            encoder.preparer = preparer
        lowest, mean = vector_distance(sources, encoder)
        figures[name] = {"photos": PHOTOS, "megapixels": round(float(megapixels), 1),
                         "images_per_second_reduced_decode": reduced, "images_per_second_full_decode": whole,
                         "cosine_reduced_vs_full_lowest": lowest, "cosine_reduced_vs_full_mean": mean}
        print(f"  {name:>6} ({megapixels:.1f} MP): {reduced:.1f} images/s decoding at reduced scale, {whole:.1f} "
              f"decoding whole; cosine to whole decoding: lowest {lowest:.5f}, mean {mean:.5f}")
    for name, values in figures.items():
        values["share_of_small_rate"] = values["images_per_second_reduced_decode"] / \
            figures["small"]["images_per_second_reduced_decode"]
        print(f"  {name}: {values['share_of_small_rate']:.0%} of the small-photo rate (goal: >= 80 %)")
    if not args.no_record:  # the default model's entry, or one per other model ("large_photos:ViT-B-32")
        base, variant = split_variant(encoder.name)
        name = "large_photos" if default_model_version(encoder.name) else \
            f"large_photos:{base.split(':')[0]}" + (f"+{variant}" if variant else "")
        record(name, figures, model=encoder.name, device=str(encoder.device),
               data="Flickr8k dev photos (small, and upscaled to 12 and 24 MP)"
                    + (f"; phone photos from {args.phone_photos.name}" if args.phone_photos else ""))


if __name__ == "__main__":
    main()
