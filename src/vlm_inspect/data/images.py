"""Robust photo loading for prepare, predict and serve: every input becomes an upright RGB image.

Photos from a line arrive in every shape: rotated phone shots (EXIF orientation), CMYK scans,
palette PNGs, 16-bit greyscale from machine cameras, transparent PNGs, half-copied files and files
that only look like images. Each is either converted to plain RGB or refused with a `DataError`
that names the file and the reason. Whether a file is an image is decided by decoding it, never
by its extension.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_inspect.errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""Suffixes `find_images` picks up inside folders (files named explicitly are always taken)."""

# Transparent pixels are shown on a neutral grey, so neither black nor white edges look like defects.
ALPHA_BACKGROUND = (128, 128, 128)

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
            oversized inputs.
    """
    name = name or (str(source) if not isinstance(source, bytes) else "image")
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
            return to_rgb(_upright(image))
    except Image.DecompressionBombError as err:
        raise DataError(f"{name}: too large to decode safely ({err})") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (no known image format could decode it)") from None
    except _DECODE_ERRORS as err:
        raise DataError(f"{name}: cannot be decoded, probably truncated or corrupt ({err})") from None


def _read_bytes(source: str | Path | bytes, name: str) -> bytes:
    if isinstance(source, bytes):
        return source
    path = Path(source)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a folder, not an image file") from None
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None


def _upright(image: Image.Image) -> Image.Image:
    # A photo whose EXIF block is damaged is still a photo: use it as stored.
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise DataError(
            f"{name}: {width}x{height} = {width * height:,} pixels is more than the limit of {max_pixels:,} "
            "(decompression-bomb guard; raise max_image_pixels if the photo is genuine)"
        )
    if width == 0 or height == 0:
        raise DataError(f"{name}: image has no pixels ({width}x{height})")


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
    """16/32-bit integer and float greyscale → 8-bit, mapping the 16-bit range onto 0..255."""
    values = np.asarray(image, dtype=np.float64)
    # Integer modes hold 16-bit camera data; float images are taken as already in 0..255.
    scaled = values if image.mode == "F" else values / 257.0
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


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
            missing.append(str(path))
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
