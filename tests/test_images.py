"""Robust photo loading: every odd-but-valid image becomes upright RGB; broken ones are refused by name."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_inspect.data.images import ALPHA_BACKGROUND, find_images, load_image
from vlm_inspect.errors import DataError


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return image.getpixel((x, y))  # type: ignore[return-value]


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(p - q) <= tolerance for p, q in zip(a, b, strict=True))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 60x30 stored, left half red / right half blue; orientation 6 means "rotate 90° clockwise to view".
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)

    assert image.mode == "RGB"
    assert image.size == (30, 60)
    assert _close(_pixel(image, 15, 5), (255, 0, 0))  # stored left is now on top
    assert _close(_pixel(image, 15, 55), (0, 0, 255))


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    image = load_image(path)
    assert image.mode == "RGB"
    assert _close(_pixel(image, 8, 8), (255, 0, 0), tolerance=20)


def test_palette_without_and_with_transparency(tmp_path: Path) -> None:
    plain = Image.new("P", (8, 8), 1)
    plain.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    plain.save(tmp_path / "p.png")
    assert _pixel(load_image(tmp_path / "p.png"), 4, 4) == (10, 200, 30)

    transparent = Image.new("P", (8, 8), 0)
    transparent.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    transparent.save(tmp_path / "pt.png", transparency=0)
    image = load_image(tmp_path / "pt.png")
    assert image.mode == "RGB"
    assert _pixel(image, 4, 4) == ALPHA_BACKGROUND


def test_alpha_is_composited_on_neutral_grey(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (8, 8), (0, 0))
    la.save(tmp_path / "la.png")

    image = load_image(tmp_path / "rgba.png")
    assert _pixel(image, 5, 5) == ALPHA_BACKGROUND
    assert _pixel(image, 0, 0) == (255, 0, 0)
    assert _pixel(load_image(tmp_path / "la.png"), 3, 3) == ALPHA_BACKGROUND


def test_sixteen_and_thirty_two_bit_greyscale_map_to_eight_bit(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "i16.png")
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")
    for name in ("i16.png", "i32.tif"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB"
        assert [_pixel(image, x, 0)[0] for x in range(3)] == [0, 128, 255], name


def test_bytes_input_and_error_names(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), 77).save(buffer, "PNG")
    assert _pixel(load_image(buffer.getvalue()), 1, 1) == (77, 77, 77)
    with pytest.raises(DataError, match=r"^upload\.png: empty file"):
        load_image(b"", name="upload.png")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is a text file, not a photo"), "not an image"),
        (lambda p: p.write_bytes(_jpeg_bytes()[:300]), "truncated or corrupt"),
        (lambda p: p.write_bytes(_png_bytes()[:-40]), "truncated or corrupt"),
    ],
    ids=["zero-byte", "text-named-jpg", "truncated-jpeg", "truncated-png"],
)
def test_broken_files_are_refused_with_their_name(tmp_path: Path, make, match: str) -> None:
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(DataError, match=match) as err:
        load_image(path)
    assert str(err.value).startswith(f"{path}: ")


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="20,000 pixels is more than the limit of 10,000"):
        load_image(tmp_path / "big.png", max_pixels=10_000)
    assert load_image(tmp_path / "big.png", max_pixels=20_000).size == (200, 100)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match="is a folder"):
        load_image(tmp_path)


def test_loading_leaves_the_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    load_image(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_find_images_walks_folders_sorted_and_takes_named_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/z.JPG", "a/deep/b.png", "a/notes.txt", "a/.secret.png", ".hidden/x.png", "loose.dat"):
        (tmp_path / name).write_bytes(b"x")

    found = find_images([tmp_path / "a", tmp_path / "loose.dat", tmp_path / "a" / "z.JPG"])

    assert found == [tmp_path / "a" / "deep" / "b.png", tmp_path / "a" / "z.JPG", tmp_path / "loose.dat"]
    with pytest.raises(DataError, match="missing-folder"):
        find_images([tmp_path / "missing-folder"])


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()
