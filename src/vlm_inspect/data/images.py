"""Robust photo loading for prepare, predict and serve: every input becomes an upright RGB image.

Photos from a line arrive in every shape: rotated phone shots (EXIF orientation), CMYK scans,
palette PNGs, 16-bit greyscale from machine cameras, transparent PNGs, half-copied files and files
that only look like images. Each is either converted to plain RGB or refused with a `DataError`
that names the file and the reason. Whether a file is an image is decided by decoding it, never
by its extension.

Every input costs a bounded amount of memory. The limits below are checked before anything is
decoded (Pillow reads the header alone first) and a photo over any of them is refused with a
`DataError` naming it; change them here:

| limit | value | what it bounds |
|---|---|---|
| `MAX_FILE_BYTES` | 256 MiB | a file's size, checked before it is read (it is read whole, to hash what is decoded) |
| `max_pixels` | argument; 100 MP in prepare and predict, 50 MP in serve | width x height |
| `MAX_ASPECT_RATIO` | 20 | longer side / shorter side (a 1 x 20000 strip would pad to a 20000 x 20000 square) |
| `MAX_DECODE_BYTES` | 512 MiB | the decoded raster plus its RGB copy, by the bytes per pixel of the file's mode |
| `MODEL_INPUT_MAX_SIDE` | 2048 | the longer side of what goes to the image processor (see `fit_model_input`) |

So one photo costs at most its file (256 MiB), its decoded raster and RGB copy (512 MiB), and a model
input of at most 2048 x 2048 (about 70 MB with the processor's float copy): under 0.9 GiB, whatever it is.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_inspect.data.safe_read import show_path
from vlm_inspect.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""Suffixes `find_images` picks up inside folders (files named explicitly are always taken)."""

# Transparent pixels are shown on a neutral grey, so neither black nor white edges look like defects.
ALPHA_BACKGROUND = (128, 128, 128)

MAX_FILE_BYTES = 256 * 1024**2
"""Files (and uploads) larger than this are refused before they are read."""
MAX_ASPECT_RATIO = 20
"""Photos whose longer side is more than this many times the shorter are refused before decoding."""
MAX_DECODE_BYTES = 512 * 1024**2
"""Decoded raster plus RGB copy, by the bytes per pixel of the file's mode; larger photos are refused."""
MODEL_INPUT_MAX_SIDE = 2048
"""Photos with a longer side are shrunk to it before padding and the image processor (which shrinks to ~336)."""

# Bytes per pixel as Pillow holds each mode in memory: multi-band modes take 4, 16-bit greyscale 2.
_ONE_BYTE_MODES = frozenset({"1", "L", "P"})
_TWO_BYTE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "BGR;15", "BGR;16"})
# High-depth greyscale is scaled to 8 bits this many pixels at a time, so the float copy stays small.
_STRIP_PIXELS = 1 << 20

# What a malformed file can make Pillow raise while opening or decoding it.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, TypeError)


def load_image(source: str | Path | bytes, max_pixels: int = 100_000_000, name: str | None = None) -> Image.Image:
    """Decode a photo into an upright RGB image, or say why it cannot be used.

    Args:
        source: A file path, or the file's bytes (an upload).
        max_pixels: Larger images are refused before decoding (decompression-bomb guard).
        name: How the input is named in error messages; defaults to the path, or "image".

    Returns:
        A fully loaded RGB image with its EXIF orientation applied. CMYK, palette, LA,
        16-bit and 32-bit greyscale are converted; transparency is composited on grey.

    Raises:
        DataError: `"{name}: <reason>"` for missing, zero-byte, truncated, non-image or
            oversized inputs (see the limits at the top of this module).
    """
    name = name or (show_path(source) if not isinstance(source, bytes) else "image")
    data = _read_bytes(source, name)
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check replaces Pillow's warning; its hard limit still raises.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image, max_pixels, name)
            image.load()
            _upright(image)
            return to_rgb(image)
    except Image.DecompressionBombError as err:
        raise DataError(f"{name}: too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (no known image format could decode it)") from None
    except _DECODE_ERRORS as err:
        raise DataError(f"{name}: cannot be decoded, probably truncated or corrupt ({err})") from None


def read_file_bytes(path: str | Path, name: str | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes, refused before reading when it is larger than `max_bytes`.

    Raises:
        DataError: `"{name}: <reason>"` for a missing, non-regular (folder, FIFO, device),
            unreadable or oversized file.
    """
    path = Path(path)
    name = name or show_path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then says what was opened.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{name}: is a folder, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{name}: not a regular file (a FIFO, socket or device), so it is not read")
        _check_file_size(info.st_size, max_bytes, name)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    _check_file_size(len(data), max_bytes, name)
    return data


def _check_file_size(size: int, max_bytes: int, name: str) -> None:
    if size > max_bytes:
        raise DataError(
            f"{name}: {size:,} bytes is more than the limit of {max_bytes:,} bytes per photo "
            "(vlm_inspect.data.images.MAX_FILE_BYTES)"
        )


def _read_bytes(source: str | Path | bytes, name: str) -> bytes:
    if isinstance(source, bytes):
        _check_file_size(len(source), MAX_FILE_BYTES, name)
        return source
    return read_file_bytes(source, name)


def _upright(image: Image.Image) -> None:
    # A photo whose EXIF block is damaged is still a photo: use it as stored.
    # In place: the rotated copy replaces the decoded raster instead of sitting beside it.
    with contextlib.suppress(*_DECODE_ERRORS):
        ImageOps.exif_transpose(image, in_place=True)


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    """Refuse, from the header alone, a photo whose decoding would cost more than the limits allow."""
    width, height = image.size
    if width == 0 or height == 0:
        raise DataError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DataError(
            f"{name}: {width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_image_pixels if the photo is genuine)"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DataError(
            f"{name}: {width}x{height} is a strip, not a photo (sides more than {MAX_ASPECT_RATIO}:1 apart; "
            "padded to a square it would take too much memory)"
        )
    cost = decode_bytes(image.mode, width, height)
    if cost > MAX_DECODE_BYTES:
        raise DataError(
            f"{name}: {width}x{height} {image.mode} would take {cost / 1024**2:,.0f} MiB to decode, more than "
            f"the limit of {MAX_DECODE_BYTES / 1024**2:,.0f} MiB per photo (vlm_inspect.data.images.MAX_DECODE_BYTES)"
        )


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Memory to decode a photo of this mode and size and to hold its RGB copy."""
    per_pixel = 1 if mode in _ONE_BYTE_MODES else 2 if mode in _TWO_BYTE_MODES else 4
    rgb_copy = 0 if mode == "RGB" else 4
    return width * height * (per_pixel + rgb_copy)


def fit_model_input(image: Image.Image, max_side: int = MODEL_INPUT_MAX_SIDE) -> Image.Image:
    """The photo shrunk (aspect kept) so its longer side is at most `max_side`; smaller photos unchanged.

    The image processor shrinks every photo to ~336 pixels anyway; shrinking first keeps the padded
    square and the processor's float copy of a 50 MP photo to a few tens of MB.
    """
    size = model_input_size(image.width, image.height, max_side)
    if size == image.size:
        return image
    return image.resize(size, Image.BICUBIC, reducing_gap=3.0)


def exif_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened (not yet decoded) photo as it is viewed: EXIF rotations of 90° swap them."""
    width, height = image.size
    return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def model_input_size(width: int, height: int, max_side: int = MODEL_INPUT_MAX_SIDE) -> tuple[int, int]:
    """The size `fit_model_input` gives a `width` × `height` photo."""
    if max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on neutral grey."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite_on_grey(image.convert("RGBA"))
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale → 8-bit, mapping the 16-bit range onto 0..255.

    Scaled in strips of rows, so the float copy is a few MB, not 8 bytes per pixel of the photo.
    """
    grey = Image.new("L", image.size)
    rows = max(1, _STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        box = (0, top, image.width, min(image.height, top + rows))
        values = np.asarray(image.crop(box), dtype=np.float64)
        # Integer modes hold 16-bit camera data; float images are taken as already in 0..255.
        scaled = values if image.mode == "F" else values / 257.0
        grey.paste(Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)), box)
    return grey.convert("RGB")


def _composite_on_grey(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files among `paths`: files are taken as given, folders searched recursively.

    Inside folders only files with an image suffix (any case) are taken; hidden files and
    folders are left out. The result is sorted and without repeats.

    Raises:
        DataError: naming every path that does not exist.
    """
    found: set[Path] = set()
    missing = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(_images_in_folder(path))
        else:
            missing.append(show_path(path))
    if missing:
        raise DataError("no such file or folder: " + ", ".join(missing))
    return sorted(found)


def _images_in_folder(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]


def square_image(image: Image.Image, image_mean: list[float], aspect: str) -> Image.Image:
    """LLaVA-1.5 'pad': centre on a square of the processor's mean colour; 'crop' leaves it.

    Either way a photo over `MODEL_INPUT_MAX_SIDE` (2048) is shrunk first, so memory stays bounded.
    """
    image = fit_model_input(image)
    if aspect != "pad" or image.width == image.height:
        return image
    side = max(image.size)
    fill = tuple(int(x * 255) for x in image_mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas
