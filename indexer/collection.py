"""A collection on disk: image files under a root folder, and optional captions.

Everything that touches a user's files goes through here, so that a bad file becomes
a `SkippedFile` with a reason instead of an exception in the middle of a build.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO
from stat import S_ISREG

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
CAPTION_FILE_NAMES = ("captions.tsv", "captions.csv", "captions.jsonl")


@dataclass(frozen=True)
class FileEntry:
    """A candidate image file: `path` is relative to the collection root, with '/' separators."""

    path: str
    abs_path: Path
    bytes: int
    mtime: float
    folder_id: int = 0  # the index's folder it was found in (store.FolderRow)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class PhotoFacts:
    """What a photo says about itself, for search filters: when and with what it was taken.

    `taken_at` is the wall-clock time of EXIF DateTimeOriginal (seconds, as if it were UTC: EXIF
    stores no zone), falling back to the file's modification time in local wall-clock time;
    `taken_from` says which ("exif" or "mtime").
    """

    taken_at: float
    taken_from: str
    camera_make: str | None = None
    camera_model: str | None = None


@dataclass
class LoadedImage:
    entry: FileEntry
    content_hash: str
    pixels: np.ndarray  # [h, w, 3] uint8 RGB, as decode_for_model gives them (maybe at reduced scale)
    width: int  # the photo's own size, as shown (after EXIF orientation)
    height: int
    facts: PhotoFacts


class BadImage(Exception):
    """An image that cannot be indexed; the message is the reason shown to the user."""


def scan(root: Path, folder_id: int = 0) -> tuple[list[FileEntry], list[SkippedFile]]:
    """All image files under root, sorted; unreadable entries are reported, not raised.

    The walk keeps its own stack (a tree deeper than Python's recursion limit is fine).
    Symlinked folders are not followed (no loops); symlinked files are, when they stay
    inside the root. Only regular files are taken: a named pipe called `x.jpg` would
    block the build forever.
    """
    root = root.resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"collection folder not found: {root}")
    entries: list[FileEntry] = []
    skipped: list[SkippedFile] = []
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as listing:
                children = sorted(listing, key=lambda child: child.name)
        except OSError as err:
            skipped.append(SkippedFile(_relative(folder, root), f"unreadable folder: {err.strerror}"))
            continue
        subfolders = []
        for child in children:
            if child.name.startswith("."):
                continue
            if _is_folder(child):
                subfolders.append(Path(child.path))
            elif Path(child.name).suffix.lower() in IMAGE_EXTENSIONS:
                entry_or_skip = _entry(child, root, folder_id)
                (entries if isinstance(entry_or_skip, FileEntry) else skipped).append(entry_or_skip)
        pending.extend(reversed(subfolders))  # depth first, in name order, as os.walk would go
    return entries, skipped


def _is_folder(child: os.DirEntry) -> bool:
    try:
        return child.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _entry(child: os.DirEntry, root: Path, folder_id: int) -> FileEntry | SkippedFile:
    """A file's entry from its directory listing. Only a symlink is resolved (a path walk per
    file), to check it stays inside the root: a plain file under root is inside it."""
    path = Path(child.path)
    rel = child.path[len(os.path.join(root, "")):]  # the walk joins names onto root: relative_to took 5x longer
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return SkippedFile(rel.encode("utf-8", "replace").decode(), "file name is not valid UTF-8")
    try:
        if child.is_symlink():
            real = path.resolve(strict=True)
            if root not in real.parents:
                return SkippedFile(rel, "symlink points outside the collection")
            stat = real.stat()
        else:
            real, stat = path, child.stat(follow_symlinks=False)
    except (OSError, RuntimeError) as err:
        return SkippedFile(rel, f"unreadable: {getattr(err, 'strerror', None) or err}")
    if not S_ISREG(stat.st_mode):
        return SkippedFile(rel, "not a regular file")
    if not os.access(real, os.R_OK):
        return SkippedFile(rel, "unreadable: permission denied")
    return FileEntry(rel, path, stat.st_size, stat.st_mtime, folder_id)


class NotRegularFile(OSError):
    """A FIFO, device or socket where a file was expected."""


def open_regular_file(path: Path) -> BinaryIO:
    """Open for reading so that nothing but a regular file is ever read or waited on.

    O_NONBLOCK makes opening a FIFO (or a device) return at once; it is then refused. A
    file swapped for one after a check is refused the same way. Every reader of a user's
    files opens them here: images, caption files, and files the service serves.
    """
    handle = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb")
    if not S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise NotRegularFile(f"not a regular file: {path}")
    return handle


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """A regular file's bytes (open_regular_file), refused when larger than `max_bytes`."""
    try:
        handle = open_regular_file(path)
    except NotRegularFile as err:
        raise BadImage("not a regular file") from err
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise BadImage(f"file too large: {size} bytes exceeds the limit of {max_bytes}")
        return handle.read(max_bytes + 1)


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # what a query upload may be
QUERY_SIDE = 1024  # an upload's short side is decoded no larger than needed for this (models use 224-448)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to RGB with EXIF orientation applied; first frame of animations.

    The pixel count is checked from the header, before any pixel is decoded.
    """
    def load(image: Image.Image) -> Image.Image:
        image.load()
        return image

    return _decode(data, max_pixels, None, load)


def decode_reduced(data: bytes, max_pixels: int, max_decoded_pixels: int) -> Image.Image:
    """An image decoded no larger than a query (or a thumbnail) needs, in bounded memory.

    A JPEG is decoded at reduced scale (libjpeg's DCT scaling, down to 1/8 a side) and
    other formats are box-reduced right after decoding, each keeping a short side of at
    least QUERY_SIDE; orientation and colour conversion then work on the small image. What
    is decoded must stay within `max_decoded_pixels` (the header's count, after JPEG's
    scaling), which bounds an upload's memory; only common photo formats are accepted.
    Measured on the worst uploads the limits let through: see tests/test_upload_limits.py.
    """
    def load(image: Image.Image) -> Image.Image:
        image.draft("RGB", _scaled_to_side(image.size, QUERY_SIDE))  # only JPEG decoders act on it
        weight = DECODE_WEIGHT.get(image.format, 1)
        if image.width * image.height * weight > max_decoded_pixels:
            counted = f" (a {image.format} counts {weight}x)" if weight > 1 else ""
            raise BadImage(f"too many pixels: {image.width}x{image.height}{counted} exceeds the upload limit of "
                           f"{max_decoded_pixels}")
        image.load()
        if image.mode.startswith("I;16"):
            image = _to_8bit_grey(image)  # Pillow cannot reduce these modes
        elif image.mode in ("P", "PA", "1", "LAB", "HSV", "YCbCr"):
            image = image.convert("RGBA" if "transparency" in image.info or image.mode == "PA" else "RGB")
        factor = min(image.size) // QUERY_SIDE
        return image.reduce(factor) if factor >= 2 and image.mode in REDUCIBLE_MODES else image

    return _decode(data, max_pixels, UPLOAD_FORMATS, load)


# Pillow decodes a WebP through several full-size RGBA buffers: measured ~4x a PNG's peak memory.
DECODE_WEIGHT = {"WEBP": 4}
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")


def _scaled_to_side(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The size whose short side is `side` (never larger than `size`), aspect kept."""
    scale = min(1.0, side / max(1, min(size)))
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


def _decode(data: bytes, max_pixels: int, formats: tuple[str, ...] | None,
            load: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """Open, check the header's pixel count, `load` (decode), orient, convert to RGB."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's notes on broken metadata
            image = Image.open(io.BytesIO(data), formats=formats)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(f"too many pixels: {width}x{height} exceeds the limit of {max_pixels}")
            image.seek(0)
            return to_rgb(_oriented(load(image)))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"too many pixels: {err}") from err
    except Image.UnidentifiedImageError as err:
        kinds = ", ".join(formats) if formats else "a known image format"
        raise BadImage(f"not an image (unrecognised content; expected {kinds})") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"corrupt image: {err}") from err
    except MemoryError as err:
        raise BadImage("image too large to decode") from err


def _oriented(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; a broken EXIF block leaves the pixels as stored (they are fine).

    Pillow raises AttributeError, struct.error, OSError and others on malformed tags, so
    any error here means "orientation unknown", never "corrupt image".
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def decode_for_model(data: bytes, max_pixels: int, min_side: int = 0) -> tuple[np.ndarray, int, int]:
    """(pixels, width, height) for the indexer: a writable [h, w, 3] uint8 array, and the photo's own size.

    Plain JPEGs (colour or grey, no EXIF rotation) are decoded by libjpeg-turbo through
    simplejpeg: the same pixels as Pillow's (equal on all 7,000 Flickr8k photos), 0.15 ms
    against 0.29 ms for a 224 px photo through Pillow and the copy out of its image.
    Everything else, and any JPEG simplejpeg refuses, goes through decode_image, which has
    the last word on what is corrupt.

    With `min_side`, a JPEG at least twice that on its short side is decoded at reduced scale in
    the DCT domain (libjpeg's 1/2 to 1/8), its short side kept at `min_side` or more: a model
    resizing to half of that sees nearly the same pixels (see ImagePreparer.decode_side), and a
    camera photo decodes several times faster.
    """
    size = _plain_jpeg_size(data)
    if size is not None:
        if size[0] * size[1] > max_pixels:
            raise BadImage(f"too many pixels: {size[0]}x{size[1]} exceeds the limit of {max_pixels}")
        with contextlib.suppress(ValueError):
            return simplejpeg.decode_jpeg(data, colorspace="RGB", **_jpeg_scale(size, min_side)), *size
    sizes: list[tuple[int, int]] = []

    def load(image: Image.Image) -> Image.Image:
        sizes.append(image.size)
        if min_side and min(image.size) >= 2 * min_side:
            image.draft(image.mode, _scaled_to_side(image.size, min_side))  # only JPEG decoders act on it
        sizes.append(image.size)
        image.load()
        return image

    image = _decode(data, max_pixels, None, load)
    stored, loaded = sizes
    turned = image.size != loaded and image.size == loaded[::-1]  # EXIF orientation swapped the sides
    width, height = stored[::-1] if turned else stored
    return np.array(image), width, height


def _jpeg_scale(size: tuple[int, int], min_side: int) -> dict[str, int]:
    """simplejpeg's arguments to decode a (width, height) JPEG at the smallest power-of-two scale (1/2,
    1/4, 1/8) keeping min_side. libjpeg also scales by 3/8, 5/8...: on six phone photos those moved the
    vectors to a cosine of 0.987, powers of two to 0.9989 (tests/benchmarks/large_photos.py)."""
    factor = 1
    while factor < 8 and min(size) // (2 * factor) >= min_side > 0:
        factor *= 2
    if factor == 1:
        return {}
    return {"min_height": -(-size[1] // factor)} if size[1] <= size[0] else {"min_width": -(-size[0] // factor)}


def _plain_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG whose pixels need nothing but decoding: YCbCr or grey (CMYK
    conversions differ between decoders) and shown as stored (no EXIF rotation or mirroring)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or _exif_orientation(data) != 1:
        return None
    return width, height


def _exif(data: bytes) -> Image.Exif | None:
    """The EXIF block of an image file's bytes, parsing only its header; None where it has none.
    Raises what Pillow raises on a broken block."""
    if data.find(b"Exif\x00\x00", 0, 65536) < 0:
        return None
    return Image.open(io.BytesIO(data)).getexif()


def _exif_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag (1: as stored); None where Pillow cannot read the block."""
    try:
        exif = _exif(data)
    except Exception:  # a broken EXIF block: decode_image handles (or reports) the file
        return None
    return 1 if exif is None else int(exif.get(ExifTags.Base.Orientation, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparency is composited onto white, 16-bit and float scaled down."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit_grey(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        rgba = image.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _to_8bit_grey(image: Image.Image) -> Image.Image:
    """Integer (16- or 32-bit, either byte order) and float greyscale as 8-bit: 16-bit ranges
    are scaled by 1/256, floats in [0, 1] by 255; anything else is clipped.

    Memory matters here (an upload may be 24 MP): a 16-bit image's high bytes are taken as a
    view, and wider types are shifted and clipped in place.
    """
    values = np.array(image)
    if values.dtype.kind == "f":
        if np.nanmax(values, initial=0.0) <= 1.0:
            values *= 255.0
        np.nan_to_num(values, copy=False)
    elif values.itemsize == 2 and values.max(initial=0) > 255:
        high = 0 if values.dtype.byteorder == ">" or (values.dtype.byteorder == "=" and sys.byteorder == "big") else 1
        return Image.fromarray(np.ascontiguousarray(values.view(np.uint8)[:, high::2]), mode="L")
    elif values.max(initial=0) > 255:
        np.right_shift(values, 8, out=values)
    np.clip(values, 0, 255, out=values)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def load_image(entry: FileEntry, max_bytes: int, max_pixels: int, min_side: int = 0) -> LoadedImage:
    """Read a file once: hash its bytes and decode them to pixels (decode_for_model)."""
    if entry.bytes > max_bytes:
        raise BadImage(f"file too large: {entry.bytes} bytes exceeds the limit of {max_bytes}")
    try:
        data = read_regular_file(entry.abs_path, max_bytes)
    except OSError as err:
        raise BadImage(f"unreadable: {err.strerror or err}") from err
    return LoadedImage(entry, hash_bytes(data), *decode_for_model(data, max_pixels, min_side),
                       photo_facts(data, entry.mtime))


_DATE_TAKEN = 0x9003  # DateTimeOriginal, in the Exif sub-IFD
_EXIF_DATE = "%Y:%m:%d %H:%M:%S"


def photo_facts(data: bytes, mtime: float) -> PhotoFacts:
    """The date taken and camera from a file's EXIF block (only its header is parsed), else its mtime."""
    make = model = taken = None
    with contextlib.suppress(Exception):  # a broken EXIF block is no date, never a skipped photo
        exif = _exif(data)
        if exif is not None:
            make, model = _exif_text(exif.get(ExifTags.Base.Make)), _exif_text(exif.get(ExifTags.Base.Model))
            raw = exif.get_ifd(ExifTags.IFD.Exif).get(_DATE_TAKEN) or exif.get(ExifTags.Base.DateTime)
            taken = _exif_time(raw)
    if taken is not None:
        return PhotoFacts(taken, "exif", make, model)
    wall = datetime.fromtimestamp(mtime).replace(tzinfo=timezone.utc)  # local wall clock, as EXIF has it
    return PhotoFacts(wall.timestamp(), "mtime", make, model)


def _exif_text(value: object) -> str | None:
    text = str(value).replace("\x00", "").strip() if value is not None else ""
    return text[:128] or None


def _exif_time(raw: object) -> float | None:
    try:
        return datetime.strptime(str(raw).replace("\x00", "").strip()[:19], _EXIF_DATE).replace(
            tzinfo=timezone.utc).timestamp()
    except ValueError:  # absent, blank ("    :  :  ") or malformed
        return None


@dataclass
class Captions:
    """Parsed captions: good (image, caption) rows in file order, and the rows we dropped."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    bad_rows: list[SkippedFile] = field(default_factory=list)


def find_captions_file(root: Path) -> Path | None:
    return next((root / n for n in CAPTION_FILE_NAMES if (root / n).is_file()), None)


CAPTION_SUFFIXES = (".tsv", ".csv", ".jsonl")
MAX_CAPTION_CHARS = 2_000  # a longer "caption" is a mistake (or an attack), never a description
MAX_LINE_CHARS = 64 * 1024  # a TSV or JSONL line; longer ones are skipped unread


def read_captions(path: Path, max_bytes: int = 512 * 2**20) -> Captions:
    """Read a TSV, CSV or JSONL file with `image` and `caption` fields, streaming it.

    The suffix, the kind of file and its size are checked before a byte is read. TSV has no
    quoting: one row per line, fields split at tabs (a stray quote is just a character).
    Undecodable bytes, missing fields, over-long and unparseable rows drop that row only.
    No error message quotes the file's content: a rebuild request may name any file.
    """
    suffix = path.suffix.lower()
    if suffix not in CAPTION_SUFFIXES:
        raise ValueError(f"captions file must be .tsv, .csv or .jsonl: {path}")
    try:
        raw = open_regular_file(path)
    except NotRegularFile as err:
        raise ValueError(f"captions file is not a regular file: {path}") from err
    with raw:
        size = os.fstat(raw.fileno()).st_size
        if size > max_bytes:
            raise ValueError(f"captions file is {size} bytes, over the limit of {max_bytes}: {path}")
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        reader = {".jsonl": _read_jsonl, ".tsv": _read_tsv, ".csv": _read_csv}[suffix]
        return reader(text, path.name)


def _lines(stream: io.TextIOBase, name: str, captions: Captions) -> Iterator[tuple[int, str]]:
    """(line number, line without its line break); over-long lines are reported and skipped."""
    line_no = 0
    while line := stream.readline(MAX_LINE_CHARS):
        line_no += 1
        if len(line) == MAX_LINE_CHARS and not line.endswith("\n"):
            while (rest := stream.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
                pass
            captions.bad_rows.append(SkippedFile(f"{name}:{line_no}", f"line longer than {MAX_LINE_CHARS} characters"))
            continue
        yield line_no, line.rstrip("\r\n")


def _header_error(name: str, fields: int) -> ValueError:
    return ValueError(f"{name}: the first line must name the columns 'image' and 'caption' "
                      f"(it has {fields} field{'s' if fields != 1 else ''} without both names)")


def _read_tsv(stream: io.TextIOBase, name: str) -> Captions:
    captions = Captions()
    lines = _lines(stream, name, captions)
    header = next(lines, (1, ""))[1].split("\t")
    if "image" not in header or "caption" not in header:
        raise _header_error(name, len(header))
    image_col, caption_col = header.index("image"), header.index("caption")
    for line_no, line in lines:
        fields = line.split("\t")
        if len(fields) != len(header):
            captions.bad_rows.append(SkippedFile(f"{name}:{line_no}", _field_count(len(fields), len(header))))
            continue
        _add_row(captions, f"{name}:{line_no}", fields[image_col], fields[caption_col])
    return captions


def _field_count(found: int, expected: int) -> str:
    return f"expected {expected} fields as in the header, found {found}"


def _read_csv(stream: io.TextIOBase, name: str) -> Captions:
    captions = Captions()
    reader = csv.reader(stream)
    try:
        header = next(reader, [])
    except csv.Error:
        header = []
    if "image" not in header or "caption" not in header:
        raise _header_error(name, len(header))
    image_col, caption_col = header.index("image"), header.index("caption")
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return captions
        except csv.Error as err:  # e.g. a field over the csv module's 128 KiB limit: that row only
            captions.bad_rows.append(SkippedFile(f"{name}:{reader.line_num}", f"unreadable CSV row: {err}"))
            continue
        where = f"{name}:{reader.line_num}"
        if len(fields) != len(header):
            captions.bad_rows.append(SkippedFile(where, _field_count(len(fields), len(header))))
            continue
        _add_row(captions, where, fields[image_col], fields[caption_col])


def _read_jsonl(stream: io.TextIOBase, name: str) -> Captions:
    captions = Captions()
    for line_no, line in _lines(stream, name, captions):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            captions.bad_rows.append(SkippedFile(f"{name}:{line_no}", f"invalid JSON: {err.msg}"))
            continue
        if not isinstance(row, dict):
            captions.bad_rows.append(SkippedFile(f"{name}:{line_no}", "row is not a JSON object"))
            continue
        _add_row(captions, f"{name}:{line_no}", row.get("image"), row.get("caption"))
    return captions


def _add_row(captions: Captions, where: str, image: object, caption: object) -> None:
    """Image names are NFC-normalised (as file names are when matched), so a caption file
    written on one system names the files of another."""
    if not isinstance(image, str) or not image.strip():
        captions.bad_rows.append(SkippedFile(where, "missing image"))
    elif not isinstance(caption, str) or not caption.strip():
        captions.bad_rows.append(SkippedFile(where, "missing caption"))
    elif "\ufffd" in caption or "\ufffd" in image:
        captions.bad_rows.append(SkippedFile(where, "not valid UTF-8"))
    elif len(caption) > MAX_CAPTION_CHARS:
        captions.bad_rows.append(SkippedFile(where, f"caption longer than {MAX_CAPTION_CHARS} characters"))
    else:
        captions.rows.append((nfc(image.strip().replace("\\", "/")), " ".join(caption.split())))


def nfc(text: str) -> str:
    """Unicode NFC: macOS writes file names decomposed (NFD), most editors write text composed."""
    return unicodedata.normalize("NFC", text)
