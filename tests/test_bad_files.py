"""Every class of bad file in one real build: each is skipped with a reason (or, where it is a
valid if unusual image, indexed), and the rest of the build is unaffected."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.sample_collection import write_sample_collection
from crossmodal.indexer.settings import Settings
from tests.conftest import solid_image

GOOD_SAMPLE_IMAGES = 16


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims width x height: a decompression bomb's signature."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 200, 0] * 256)
    return encoded(image, "PNG", transparency=0)


# Two real-world EXIF blocks Pillow cannot parse (found by fuzzing): a Model tag typed as a float,
# and a signed-short tag out of range; both with orientation 6. The pixels are fine.
BROKEN_EXIF = ("4578696600004d4d002a0000000800020112000300000001000600000110000b000000017386848900000000ff364a4b9ec69d"
               "9d401175e8d96f55d6ba1fd2ab655957d3f45de5c486a0f561fe6b30be62cb2d19",
               "4578696600004d4d002a000000080002011200030000000100060000010a000800000001f8b243a7000000006e97d282f0c0"
               "68dfbc6d8528c40a9c9d3a8201dbcd8afc5807a784444fdbc1a77234c4ab52766fa0")


def jpeg_with_exif(exif_hex: str, color: tuple[int, int, int]) -> bytes:
    return encoded(solid_image(color), "JPEG", exif=bytes.fromhex(exif_hex))


def grey16_big_endian_tiff() -> bytes:
    values = np.linspace(0, 65535, 48 * 32, dtype=">u2").reshape(32, 48)
    return encoded(Image.frombytes("I;16B", (48, 32), values.tobytes()), "TIFF")


# file name -> (bytes, expected outcome: "indexed" or a fragment of the skip reason)
BAD_FILES = {
    "zero-bytes.jpg": (b"", "empty file"),
    "truncated.jpg": (None, "corrupt image"),  # filled in from a real photo below
    "png-named-as.jpg": (encoded(solid_image((10, 10, 240)), "PNG"), "indexed"),  # lying extension, real image
    "text-named-as.jpg": (b"hello, I am a text file", "not an image"),
    "document.png": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\n", "not an image"),
    "bomb.png": (png_claiming_size(100_000, 100_000), "too many pixels"),
    "sixteen-bit.png": (encoded(Image.fromarray(np.full((24, 24), 50_000, dtype=np.uint16)), "PNG"), "indexed"),
    "cmyk.jpg": (encoded(solid_image((200, 0, 0)).convert("CMYK"), "JPEG"), "indexed"),
    "palette-transparent.png": (palette_with_transparency(), "indexed"),
    "animated.gif": (animated_gif(), "indexed"),
    "grey16-big-endian.tif": (grey16_big_endian_tiff(), "indexed"),
    "broken-exif-float.jpg": (jpeg_with_exif(BROKEN_EXIF[0], (220, 220, 20)), "indexed"),
    "broken-exif-range.jpg": (jpeg_with_exif(BROKEN_EXIF[1], (20, 220, 220)), "indexed"),
}


@pytest.fixture(scope="module")
def bad_build(tmp_path_factory, encoder):
    root = write_sample_collection(tmp_path_factory.mktemp("bad") / "collection")
    for name, (data, _) in BAD_FILES.items():
        (root / name).write_bytes(data if data is not None else (root / "cat.jpg").read_bytes()[:3000])
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would wait for a writer forever
    (root / "loop-a.jpg").symlink_to(root / "loop-b.jpg")
    (root / "loop-b.jpg").symlink_to(root / "loop-a.jpg")
    non_utf8 = os.fsencode(str(root)) + b"/caf\xe9.jpg"  # Latin-1 bytes: not a valid UTF-8 name
    with open(non_utf8, "wb") as handle:
        handle.write((root / "coffee.jpg").read_bytes())
    with open(root / "captions.tsv", "ab") as captions:
        captions.write(b"horse.png\t\n")  # malformed: empty caption
        captions.write(b"ghost.jpg\ta photo that is not in the folder\n")  # unknown image
        captions.write(b"horse.png\ta horse in \xff\xfe broken bytes\n")  # bad encoding
        captions.write(b"only-one-column\n")  # malformed: missing field
        captions.write(b"cmyk.jpg\ta red square printed in CMYK\n")  # good row after the bad ones
    settings = Settings(index_dir=tmp_path_factory.mktemp("bad-index"), device="cpu")
    report = IndexBuilder(settings, encoder=encoder).build(root)
    return report, {s.path: s.reason for s in report.skipped}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_is_skipped_with_its_reason_or_indexed(bad_build, name):
    _, skipped = bad_build
    expected = BAD_FILES[name][1]
    if expected == "indexed":
        assert name not in skipped
    else:
        assert expected in skipped[name], skipped.get(name)


def test_symlink_loop_is_skipped(bad_build):
    _, skipped = bad_build
    assert "loop-a.jpg" in skipped and "unreadable" in skipped["loop-a.jpg"]
    assert "loop-b.jpg" in skipped


def test_a_named_pipe_is_skipped_not_waited_on(bad_build):
    _, skipped = bad_build
    assert skipped["pipe.jpg"] == "not a regular file"


def test_non_utf8_file_name_is_skipped(bad_build):
    _, skipped = bad_build
    assert any("not valid UTF-8" in reason for reason in skipped.values())


def test_the_rest_of_the_build_is_unaffected(bad_build):
    report, skipped = bad_build
    indexed_odd = sum(1 for _, outcome in BAD_FILES.values() if outcome == "indexed")
    assert report.n_images == GOOD_SAMPLE_IMAGES + indexed_odd
    assert len(skipped) == len(BAD_FILES) - indexed_odd + 4  # + two loop links, the non-UTF-8 name, the pipe


def test_bad_caption_rows_are_reported_and_good_rows_kept(bad_build):
    report, _ = bad_build
    reasons = [row.reason for row in report.bad_caption_rows]
    assert sorted(reasons) == ["expected 2 fields as in the header, found 1", "missing caption", "not valid UTF-8"]
    assert report.captions_for_unknown_images == 1
    assert report.n_captions == 22 + 1  # the sample's captions plus the good row for cmyk.jpg


def test_unreadable_file_is_skipped(tmp_path):
    """Root reads anything; under root the scan runs without the capabilities that bypass permissions."""
    solid_image((1, 2, 3)).save(tmp_path / "readable.png")
    solid_image((3, 2, 1)).save(tmp_path / "secret.png")
    (tmp_path / "secret.png").chmod(0o000)
    script = ("import json, sys; from pathlib import Path; from crossmodal.indexer.collection import scan\n"
              "entries, skipped = scan(Path(sys.argv[1]))\n"
              "print(json.dumps([[e.path for e in entries], [[s.path, s.reason] for s in skipped]]))")
    command = [sys.executable, "-c", script, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without util-linux's setpriv: cannot make a file unreadable to root")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                            timeout=60)
    assert result.returncode == 0, result.stderr
    entries, skipped = json.loads(result.stdout)
    assert entries == ["readable.png"]
    assert skipped == [["secret.png", "unreadable: permission denied"]]


def test_file_removed_after_the_scan_is_skipped(tmp_path, monkeypatch, encoder):
    """Between the scan and the read (and the read-ahead before it), a file may go away."""
    import crossmodal.indexer.builder as builder

    for i, color in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        solid_image(color).save(tmp_path / f"{i}.jpg")

    real_scan = builder.scan

    def scan_then_remove(root, folder_id):
        found = real_scan(root, folder_id)
        (tmp_path / "1.jpg").unlink()
        return found

    monkeypatch.setattr(builder, "scan", scan_then_remove)
    report = IndexBuilder(Settings(index_dir=tmp_path / "index"), encoder=encoder).build(tmp_path)
    assert report.n_images == 2
    assert [(s.path, s.reason.split(":")[0]) for s in report.skipped] == [("1.jpg", "unreadable")]


def test_folders_nested_deeper_than_pythons_recursion_limit_are_walked(tmp_path, encoder):
    root = tmp_path / "deep"
    folder = root
    root.mkdir()
    for _ in range(1_100):  # one level at a time: pathlib's mkdir(parents=True) recurses too
        folder = folder / "d"
        folder.mkdir()
    solid_image((90, 30, 160)).save(folder / "bottom.png")
    solid_image((160, 30, 90)).save(root / "top.png")
    try:
        report = IndexBuilder(Settings(index_dir=tmp_path / "index", device="cpu"), encoder=encoder).build(root)
        assert report.n_images == 2 and not report.skipped
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)  # shutil.rmtree recurses too
