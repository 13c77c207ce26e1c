"""Scanning folders, decoding every supported format safely, and reading caption files."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from crossmodal.indexer import collection
from crossmodal.indexer.collection import (BadImage, FileEntry, decode_for_model, decode_image, load_image,
                                           read_captions, scan)
from tests.conftest import solid_image


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_supported_format_decodes_to_rgb(fmt):
    image = decode_image(encoded(solid_image((10, 200, 10)), fmt), max_pixels=10**7)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert image.getpixel((5, 5))[1] > 150  # still green


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encoded(solid_image((50, 50, 50), (80, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data, 10**7).size == (20, 80)


def test_unusual_modes_become_rgb():
    cmyk = decode_image(encoded(solid_image((200, 0, 0)).convert("CMYK"), "JPEG"), 10**7)
    sixteen = decode_image(encoded(Image.fromarray(np.full((8, 8), 60000, dtype=np.uint16)), "PNG"), 10**7)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    transparent = decode_image(encoded(palette, "PNG", transparency=0), 10**7)
    assert cmyk.mode == sixteen.mode == transparent.mode == "RGB"
    assert sixteen.getpixel((0, 0))[0] > 200  # 16-bit white stays white
    assert transparent.getpixel((0, 0)) == (255, 255, 255)  # transparency composited on white


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    first = decode_image(buffer.getvalue(), 10**7).getpixel((3, 3))
    assert first[0] > 200 and first[2] < 50


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image", "not an image"),
    (encoded(solid_image((1, 2, 3)), "JPEG")[:200], "corrupt image"),
])
def test_bad_bytes_raise_bad_image_with_reason(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_image(data, 10**7)


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(BadImage, match="too many pixels"):
        decode_image(encoded(Image.new("L", (4000, 4000)), "PNG"), max_pixels=1_000_000)


def decode_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """The indexer's pixels of a photo decoded whole."""
    return decode_for_model(data, max_pixels)[0]


def _jpegs() -> dict[str, bytes]:
    """JPEGs for each route through decode_pixels, all with detail (noise) to decode."""
    rotated, upright = Image.Exif(), Image.Exif()
    rotated[0x0112], upright[0x0112] = 6, 1
    photo = solid_image((120, 60, 30), (80, 20))
    fine = encoded(photo, "JPEG", quality=100)
    return {
        "colour": encoded(photo, "JPEG"),
        "grey": encoded(photo.convert("L"), "JPEG"),
        "exif upright": encoded(photo, "JPEG", exif=upright.tobytes()),
        "exif rotated": encoded(photo, "JPEG", exif=rotated.tobytes()),
        "cmyk": encoded(photo.convert("CMYK"), "JPEG"),
        "progressive": encoded(photo, "JPEG", progressive=True),
        "damaged scan data": fine[:800] + bytes(200) + fine[1000:],  # simplejpeg refuses it, Pillow decodes it
        "png": encoded(photo, "PNG"),
    }


@pytest.mark.parametrize("name", list(_jpegs()))
def test_decode_pixels_gives_decode_image_pixels(name):
    data = _jpegs()[name]
    pixels = decode_pixels(data, 10**7)
    assert pixels.dtype == np.uint8 and pixels.flags.writeable
    np.testing.assert_array_equal(pixels, np.asarray(decode_image(data, 10**7)))
    assert pixels.shape == ((80, 20, 3) if name == "exif rotated" else (20, 80, 3))


def test_decode_pixels_decodes_plain_jpegs_itself_and_hands_the_rest_to_pillow(monkeypatch):
    def pillow(*args):
        raise AssertionError("went through Pillow")

    monkeypatch.setattr(collection, "_decode", pillow)
    jpegs = _jpegs()
    for name in ("colour", "grey", "exif upright", "progressive"):
        decode_pixels(jpegs[name], 10**7)
    for name in ("exif rotated", "cmyk", "damaged scan data", "png"):
        with pytest.raises(AssertionError, match="Pillow"):
            decode_pixels(jpegs[name], 10**7)


def camera_sized(size: tuple[int, int], orientation: int = 1) -> bytes:
    """A JPEG of a camera's size with detail at every scale (noise over smooth gradients)."""
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (size[1] // 50, size[0] // 50, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize(size, Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(Image.fromarray(noisy), "JPEG", quality=90, exif=exif.tobytes())


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_keeps_its_own_size():
    """Issue 18: a camera photo is decoded at 1/2 to 1/8 scale in the DCT domain (its short side at least
    what the model needs), on both routes; its recorded size stays its own, as shown."""
    pixels, width, height = decode_for_model(camera_sized((2400, 1600)), 10**8, min_side=448)
    assert (width, height) == (2400, 1600)
    assert pixels.shape == (800, 1200, 3)  # 1/2 scale: 1/4 would leave 400 < 448 (and never 3/8)
    pixels, width, height = decode_for_model(camera_sized((4000, 3000)), 10**8, min_side=448)
    assert (width, height) == (4000, 3000) and pixels.shape == (750, 1000, 3)  # 1/4: 1/8 would leave 375
    # EXIF-rotated: Pillow's route (draft), the size as shown (turned).
    pixels, width, height = decode_for_model(camera_sized((4000, 3000), orientation=6), 10**8, 448)
    assert (width, height) == (3000, 4000) and pixels.shape == (1000, 750, 3)
    # A photo under twice the side is decoded whole: exactly the pixels it always had.
    data = camera_sized((800, 600))
    pixels, width, height = decode_for_model(data, 10**8, 448)
    assert (width, height) == (800, 600)
    np.testing.assert_array_equal(pixels, decode_pixels(data, 10**8))


def test_decode_pixels_limits_and_errors():
    with pytest.raises(BadImage, match="too many pixels: 80x20"):
        decode_pixels(_jpegs()["colour"], max_pixels=1000)
    with pytest.raises(BadImage, match="corrupt image"):
        decode_pixels(_jpegs()["colour"][:-100], 10**7)  # truncated: Pillow's verdict, as before


def test_file_size_limit(tmp_path):
    path = tmp_path / "big.png"
    solid_image((1, 1, 1)).save(path)
    entry = FileEntry("big.png", path, path.stat().st_size, 0.0)
    with pytest.raises(BadImage, match="file too large"):
        load_image(entry, max_bytes=10, max_pixels=10**7)


def test_scan_is_recursive_sorted_and_reports_escaping_symlinks(tmp_path):
    (tmp_path / "b").mkdir()
    solid_image((1, 2, 3)).save(tmp_path / "b" / "x.JPG")
    solid_image((1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image extension, ignored")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    solid_image((1, 2, 3)).save(outside)
    (tmp_path / "link.png").symlink_to(outside)
    (tmp_path / "loop").symlink_to(tmp_path)  # folder symlinks are not followed
    entries, skipped = scan(tmp_path)
    assert [e.path for e in entries] == ["a.png", "b/x.JPG"]
    assert [(s.path, s.reason) for s in skipped] == [("link.png", "symlink points outside the collection")]


def test_scan_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NotADirectoryError, match="collection folder not found"):
        scan(tmp_path / "nope")


def test_read_captions_tsv_csv_jsonl_keep_good_rows(tmp_path):
    (tmp_path / "c.tsv").write_text("image\tcaption\na.jpg\ta dog\na.jpg\t  two   spaces \nb.jpg\t\n")
    (tmp_path / "c.csv").write_text('image,caption\na.jpg,"a dog, running"\n')
    rows = [json.dumps({"image": "a.jpg", "caption": "x"}), "{broken", json.dumps(["list"])]
    (tmp_path / "c.jsonl").write_text("\n".join(rows))
    tsv = read_captions(tmp_path / "c.tsv")
    assert tsv.rows == [("a.jpg", "a dog"), ("a.jpg", "two spaces")]
    assert [b.reason for b in tsv.bad_rows] == ["missing caption"]
    assert read_captions(tmp_path / "c.csv").rows == [("a.jpg", "a dog, running")]
    jsonl = read_captions(tmp_path / "c.jsonl")
    assert jsonl.rows == [("a.jpg", "x")] and len(jsonl.bad_rows) == 2


def test_read_captions_bad_encoding_drops_only_that_row(tmp_path):
    (tmp_path / "c.tsv").write_bytes(b"image\tcaption\na.jpg\tgood\nb.jpg\tbad \xff\xfe bytes\n")
    captions = read_captions(tmp_path / "c.tsv")
    assert captions.rows == [("a.jpg", "good")]
    assert captions.bad_rows[0].reason == "not valid UTF-8"


def test_read_captions_without_required_columns(tmp_path):
    (tmp_path / "c.tsv").write_text("file\ttext\na\tb\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        read_captions(tmp_path / "c.tsv")


def test_a_caption_over_the_csv_field_limit_drops_that_row_only(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,first\nb.jpg," + "x" * 140_000 + "\nc.jpg,last\n")
    captions = read_captions(tmp_path / "c.csv")
    assert captions.rows == [("a.jpg", "first"), ("c.jpg", "last")]
    assert len(captions.bad_rows) == 1 and "field limit" in captions.bad_rows[0].reason
    (tmp_path / "c.tsv").write_text("image\tcaption\na.jpg\t" + "word " * 1000 + "\nb.jpg\t" + "y" * 100_000 + "\n"
                                    "c.jpg\tlast\n")
    captions = read_captions(tmp_path / "c.tsv")
    assert captions.rows == [("c.jpg", "last")]
    assert [b.reason for b in captions.bad_rows] == ["caption longer than 2000 characters",
                                                    "line longer than 65536 characters"]


def test_a_stray_quote_in_a_tsv_is_a_character_not_the_start_of_a_quoted_field(tmp_path):
    (tmp_path / "c.tsv").write_text('image\tcaption\na.jpg\t"a dog\nb.jpg\ta cat\nc.jpg\ta 6" ruler\n')
    assert read_captions(tmp_path / "c.tsv").rows == [("a.jpg", '"a dog'), ("b.jpg", "a cat"),
                                                      ("c.jpg", 'a 6" ruler')]


def test_caption_file_errors_never_quote_the_file(tmp_path):
    """A rebuild request may name any readable file; its error must not become a way to read it."""
    (tmp_path / "env.csv").write_text("AWS_SECRET_ACCESS_KEY=abc123,x\nmore,secrets\n")
    with pytest.raises(ValueError) as raised:
        read_captions(tmp_path / "env.csv")
    assert "AWS" not in str(raised.value) and "abc123" not in str(raised.value)


def test_caption_files_are_checked_before_they_are_read(tmp_path):
    with pytest.raises(ValueError, match="must be .tsv, .csv or .jsonl"):
        read_captions(tmp_path / "notes.txt")  # refused by name: it does not even exist
    sparse = tmp_path / "huge.tsv"
    with open(sparse, "wb") as handle:
        handle.truncate(3 * 2**30)  # 3 GB of nothing, no disk used
    with pytest.raises(ValueError, match="over the limit"):
        read_captions(sparse)
    os.mkfifo(tmp_path / "pipe.tsv")  # opening it for reading would wait for a writer forever
    with pytest.raises(ValueError, match="not a regular file"):
        read_captions(tmp_path / "pipe.tsv")
