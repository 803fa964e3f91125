"""A corpus of bad inputs, built in code, run through `prepare`, `predict` and `serve` (issue #19).

For every kind: no traceback, a message naming the file and the problem, inputs byte-identical
afterwards, nothing opened or listed outside the inputs (an audit hook records every `open` and
folder listing; a canary folder sits beside the inputs), and memory bounded (refused photos are
refused before Pillow decodes a pixel; a subprocess measures peak RSS for the worst shapes).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlm_inspect.cli import app
from vlm_inspect.config import ModelSettings, PrepareConfig, ServeConfig
from vlm_inspect.data import images as images_module
from vlm_inspect.errors import DataError, ModelFolderError
from vlm_inspect.models.families import family_named
from vlm_inspect.prepare import prepare

runner = CliRunner()
GBK_NAME = os.fsdecode("坏图".encode("gbk")) + ".png"  # not UTF-8: surrogate-escaped by Python

# ---------------------------------------------------------------- building hostile files


LOOPBACK = "http://127.0.0.1:8000"  # serve answers only loopback Host names on a loopback bind


def png_bytes(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, row: bytes | None = None) -> bytes:
    """A PNG written by hand, its rows compressed as a stream, so a huge image stays a small file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    channels = {0: 1, 2: 3}[colour_type]
    row = row if row is not None else bytes(width * channels * bit_depth // 8)
    packer = zlib.compressobj(1)
    body = b"".join(packer.compress(b"\x00" + row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def header_only_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG header declaring a size, with no pixel data: only a size check can tell it apart early."""
    full = png_bytes(1, 1, bit_depth, colour_type)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    ihdr = (13).to_bytes(4, "big") + b"IHDR" + header + zlib.crc32(b"IHDR" + header).to_bytes(4, "big")
    return full[:8] + ihdr + full[33:]


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that starts as a JPEG and takes no disk space."""
    with path.open("wb") as f:
        f.write(encoded(noise(), "JPEG"))
        f.truncate(size)
    return path


@dataclass(frozen=True)
class PhotoKind:
    """A hostile photo: its file name, how to write it, and the reason it is refused (None: it decodes)."""

    name: str
    write: Callable[[Path], None]
    refused: str | None


def _bytes(data: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data() if callable(data) else data)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    return encoded(noise((40, 20), 3), "JPEG", exif=exif.tobytes())


PHOTO_KINDS = [
    PhotoKind("empty.png", _bytes(b""), "empty file"),
    PhotoKind("truncated.png", _bytes(lambda: encoded(noise(), "PNG")[:120]), "cannot be decoded"),
    PhotoKind("text.jpg", _bytes(b"this is a note, not a photo\n"), "not an image"),
    PhotoKind("random.png", _bytes(bytes(range(256)) * 8), "not an image"),
    PhotoKind("html.png", _bytes(b"<html><script>alert(1)</script></html>"), "not an image"),
    PhotoKind("strip_1x20000.png", _bytes(lambda: png_bytes(1, 20000)), "strip, not a photo"),
    PhotoKind("strip_20000x1.png", _bytes(lambda: png_bytes(20000, 1)), "strip, not a photo"),
    PhotoKind("strip_21to1.png", _bytes(lambda: png_bytes(21, 1)), "strip, not a photo"),
    PhotoKind("bomb_12000x12000.png", _bytes(lambda: header_only_png(12000, 12000)), "pixels is more than the limit"),
    PhotoKind("bomb_40000x40000.png", _bytes(lambda: header_only_png(40000, 40000)), "too large to decode"),
    PhotoKind("deep16_over_budget.png", _bytes(lambda: header_only_png(10000, 9000, 16, 0)), "MiB to decode"),
    PhotoKind("zero_width.png", _bytes(lambda: header_only_png(0, 10)), "not an image"),
    PhotoKind("huge_file.jpg", lambda p: sparse(p, 256 * 1024**2 + 1), "bytes is more than the limit"),
    PhotoKind("deep16_ok.png", _bytes(lambda: png_bytes(300, 200, 16, 0)), None),
    PhotoKind("cmyk.jpg", _bytes(lambda: encoded(noise().convert("CMYK"), "JPEG")), None),
    PhotoKind("exif_rotated.jpg", _bytes(_exif_rotated), None),
    PhotoKind("palette_alpha.png", _bytes(lambda: encoded(noise().convert("P"), "PNG", transparency=0)), None),
    PhotoKind("float.tif", _bytes(lambda: encoded(noise().convert("F"), "TIFF")), None),
    PhotoKind("strip_20to1.png", _bytes(lambda: png_bytes(200, 10)), None),
    PhotoKind("png_named.jpg", _bytes(lambda: encoded(noise(seed=5), "PNG")), None),
]
REFUSED = [k for k in PHOTO_KINDS if k.refused]

# ---------------------------------------------------------------- recording what is opened


class _Opened:
    """Every path opened or listed while `active`, from an audit hook (hooks cannot be removed)."""

    def __init__(self) -> None:
        self.active = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event in ("open", "os.listdir", "os.scandir") and args:
            target = args[0]
            if isinstance(target, (str, bytes, os.PathLike)):
                self.paths.append(os.path.abspath(os.fsdecode(target)))


OPENED = _Opened()


@pytest.fixture()
def watch() -> Iterator[list[str]]:
    OPENED.paths.clear()
    OPENED.active = True
    try:
        yield OPENED.paths
    finally:
        OPENED.active = False


def tree_digest(root: Path) -> dict[str, str]:
    """Names, kinds, link targets and contents (head, size, mtime) of everything under `root`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_mode & 0o444:
                with path.open("rb") as f:
                    head = hashlib.sha256(f.read(1 << 20)).hexdigest()
                found[os.fsdecode(path)] = f"{head} {info.st_size} {info.st_mtime_ns} {info.st_mode:o}"
            elif stat.S_ISLNK(info.st_mode):
                found[os.fsdecode(path)] = "-> " + os.readlink(path)
            else:
                found[os.fsdecode(path)] = f"mode {info.st_mode:o}"
    return found


def no_traceback(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text


def deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `path` unreadable: chmod 000, and for root (who ignores modes) refuse it in os.open/listdir/open."""
    path.chmod(0)
    if os.geteuid() != 0:
        return
    denied = os.path.abspath(path)

    def guard(real: Callable) -> Callable:
        def refusing(target: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(target, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(target)) == denied:
                raise PermissionError(13, "Permission denied", os.fsdecode(target))
            return real(target, *args, **kwargs)

        return refusing

    monkeypatch.setattr(os, "open", guard(os.open))
    monkeypatch.setattr(os, "listdir", guard(os.listdir))
    monkeypatch.setattr(io, "open", guard(io.open))


# ---------------------------------------------------------------- prepare: a source and a canary outside it


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, Path]:
    """(src, outside): two OK and two NG photos in class folders; a canary photo and text outside."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    for i, folder in enumerate(("ok", "ok", "ng/scratch", "ng/scratch")):
        (src / folder).mkdir(parents=True, exist_ok=True)
        noise(seed=10 + i).save(src / folder / f"p{i}.png")
    outside.mkdir()
    noise(seed=99).save(outside / "canary.png")
    (outside / "canary.txt").write_text("secret text from outside the source\n")
    (outside / "canary.json").write_text(json.dumps({"description": "secret from outside"}))
    (outside / "folder").mkdir()
    noise(seed=98).save(outside / "folder" / "c.png")
    return src, outside


def run_prepare(src: Path, tmp_path: Path, opened: list[str], outside: Path, **settings: Any) -> dict[str, Any]:
    """Prepare `src`, check the promises, and return the manifest (or {'error': message})."""
    before = tree_digest(tmp_path / "src")
    out = tmp_path / "ds"
    opened.clear()
    try:
        prepare(PrepareConfig(src=str(src) if src else "", out=str(out), **settings))
        result = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        result["text"] = (out / "train.json").read_text(encoding="utf-8") + (out / "val.json").read_text("utf-8")
    except DataError as err:
        result = {"error": str(err)}
    assert tree_digest(tmp_path / "src") == before, "an input changed"
    leaked = [p for p in opened if p.startswith(os.path.abspath(outside))]
    assert not leaked, f"opened outside the inputs: {leaked}"
    return result


def skipped_reason(manifest: dict[str, Any], name: str) -> str:
    reasons = [s["reason"] for s in manifest.get("skipped", []) if s["path"].endswith(name)]
    assert reasons, f"{name} not in skipped: {manifest.get('skipped') or manifest.get('error')}"
    return reasons[0]


@pytest.mark.parametrize("kind", PHOTO_KINDS, ids=lambda k: k.name)
def test_prepare_photo_kinds(kind: PhotoKind, source: tuple[Path, Path], tmp_path: Path, watch: list[str]) -> None:
    src, outside = source
    kind.write(src / "ok" / kind.name)
    manifest = run_prepare(src, tmp_path, watch, outside)
    if kind.refused:
        assert kind.refused in skipped_reason(manifest, kind.name)
    else:
        assert f"ok/{kind.name}" in manifest["text"]


# Each builder changes the source; the expectation is a skipped row (name, reason) or an error naming a file.
def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _sidecar(name: str, text: str | bytes) -> Callable[[Path, Path], None]:
    def write(src: Path, outside: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (src / "ng" / "scratch" / name).write_bytes(data)

    return write


FOLDER_KINDS: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "photo link out of the source": (
        lambda s, o: _link(o / "canary.png", s / "ok" / "linked.png"),
        "skip linked.png",
        "links outside the source",
    ),
    "folder link out of the source": (
        lambda s, o: _link(o / "folder", s / "ng" / "stolen"),
        "skip stolen",
        "links outside the source",
    ),
    "class folder link out of the source": (
        lambda s, o: _link(o / "folder", s / "good"),
        "skip good",
        "links outside the source",
    ),
    "text sidecar link out of the source": (
        lambda s, o: _link(o / "canary.txt", s / "ng" / "scratch" / "p2.txt"),
        "skip p2.txt",
        "links outside the source",
    ),
    "json sidecar link out of the source": (
        lambda s, o: _link(o / "canary.json", s / "ng" / "scratch" / "p2.json"),
        "skip p2.json",
        "links outside the source",
    ),
    "dangling link": (lambda s, o: _link(s / "gone.png", s / "ok" / "dangling.png"), "skip dangling.png", "dangling"),
    "link loop": (
        lambda s, o: (_link(s / "ok" / "b.png", s / "ok" / "a.png"), _link(s / "ok" / "a.png", s / "ok" / "b.png")),
        "skip a.png",
        "cannot be resolved",
    ),
    "folder link cycle inside the source": (lambda s, o: _link(s / "ng", s / "ng" / "scratch" / "again"), "ok", ""),
    "fifo photo": (lambda s, o: _fifo(s / "ok" / "pipe.png"), "skip pipe.png", "not a regular file"),
    "fifo sidecar": (lambda s, o: _fifo(s / "ng" / "scratch" / "p2.txt"), "skip p2.txt", "not a regular file"),
    "unknown suffix": (lambda s, o: (s / "ok" / "shot.heic").write_bytes(b"ftypheic...."), "skip shot.heic", "not an"),
    "orphan sidecar": (_sidecar("nophoto.json", "{}"), "skip nophoto.json", "no photo of the same name"),
    "oversized sidecar": (_sidecar("p2.txt", "x" * (1024**2 + 1)), "skip p2.txt", "limit for a sidecar"),
    "markup in a file name": (lambda s, o: noise(seed=7).save(s / "ok" / "[bold]x[red]y[blink].png"), "ok", ""),
    "GBK file name": (lambda s, o: noise(seed=8).save(s / "ok" / GBK_NAME), "ok", ""),
    "255-byte file name": (lambda s, o: noise(seed=9).save(s / "ng" / "scratch" / ("n" * 251 + ".png")), "ok", ""),
    "formula file name": (lambda s, o: noise(seed=6).save(s / "ok" / "=HYPERLINK(1).png"), "ok", ""),
    "100,000-deep sidecar JSON": (_sidecar("p2.json", "[" * 100_000 + "]" * 100_000), "error p2.json", "nested"),
    "5,000-digit sidecar JSON": (_sidecar("p2.json", '{"description": ' + "9" * 5000 + "}"), "error p2.json", "JSON"),
    "Infinity in a box": (
        _sidecar("p2.json", '{"defects": [{"type": "dent", "box": [0, 0, Infinity, 5]}]}'),
        "error p2.json",
        "finite",
    ),
    "NaN in a box": (
        _sidecar("p2.json", '{"defects": [{"type": "dent", "box": [NaN, 0, 4, 5]}]}'),
        "error p2.json",
        "finite",
    ),
    "1e999 in a box": (
        _sidecar("p2.json", '{"defects": [{"type": "dent", "box": [0, 0, 1e999, 5]}]}'),
        "error p2.json",
        "finite",
    ),
    "sidecar not UTF-8": (_sidecar("p2.json", b'{"description": "\xb5\xc4"}'), "error p2.json", "UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(FOLDER_KINDS))
def test_prepare_folder_kinds(kind: str, source: tuple[Path, Path], tmp_path: Path, watch: list[str]) -> None:
    src, outside = source
    build, expect, reason = FOLDER_KINDS[kind]
    build(src, outside)
    manifest = run_prepare(src, tmp_path, watch, outside)
    outcome, _, name = expect.partition(" ")
    if outcome == "skip":
        assert reason in skipped_reason(manifest, name)
    elif outcome == "error":
        assert name in manifest.get("error", "") and reason in manifest["error"], manifest
    else:
        assert "error" not in manifest, manifest
    assert "secret" not in json.dumps(manifest)


def test_prepare_unreadable_photo_folder_and_sidecar(
    source: tuple[Path, Path], tmp_path: Path, watch: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, outside = source
    noise(seed=20).save(src / "ok" / "locked.png")
    (src / "ng" / "scratch" / "p2.txt").write_text("a long scratch")
    (src / "ng" / "scratch" / "sealed").mkdir()
    noise(seed=21).save(src / "ng" / "scratch" / "sealed" / "s.png")
    locked = (src / "ok" / "locked.png", src / "ng" / "scratch" / "p2.txt", src / "ng" / "scratch" / "sealed")
    for path in locked:
        deny(path, monkeypatch)
    try:
        manifest = run_prepare(src, tmp_path, watch, outside)
    finally:
        for path in locked:
            path.chmod(0o755)
    assert "Permission denied" in skipped_reason(manifest, "locked.png")
    assert "sidecar not used: cannot be read" in skipped_reason(manifest, "p2.txt")
    assert "folder cannot be read" in skipped_reason(manifest, "sealed")


def test_prepare_mvtec_mask_of_the_wrong_size_or_out_of_the_source(
    tmp_path: Path, watch: list[str], source: tuple[Path, Path]
) -> None:
    _, outside = source
    src = tmp_path / "src"
    for split, folder in (("train", "good"), ("test", "good"), ("test", "crack")):
        (src / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            noise((40, 30), seed=hash((split, folder, i)) % 1000).save(src / split / folder / f"00{i}.png")
    (src / "ground_truth" / "crack").mkdir(parents=True)
    Image.new("L", (20, 15), 255).save(src / "ground_truth" / "crack" / "000_mask.png")  # half the size
    Image.new("L", (40, 30), 0).save(outside / "mask.png")
    _link(outside / "mask.png", src / "ground_truth" / "crack" / "001_mask.png")
    manifest = run_prepare(src, tmp_path, watch, outside)
    assert "20x15 but its photo 000.png is 40x30" in skipped_reason(manifest, "000_mask.png")
    assert "links outside the source" in skipped_reason(manifest, "001_mask.png")


# ---------------------------------------------------------------- prepare from a LLaVA JSON


def _llava(images: list[str], extra: str = "") -> str:
    turns = '[{"from": "human", "value": "<image>\\nOK?"}, {"from": "gpt", "value": "OK."}]'
    samples = [
        f'{{"id": "s{i}", "image": {json.dumps(im)}, "conversations": {turns}{extra}}}' for i, im in enumerate(images)
    ]
    return "[" + ", ".join(samples) + "]"


LLAVA_KINDS: dict[str, tuple[Callable[[Path, Path], str], str, str]] = {
    "../ path out of the image folder": (lambda s, o: _llava(["p0.png", "../outside/canary.png"]), "skip", "outside"),
    "absolute image path": (lambda s, o: _llava(["p0.png", str(o / "canary.png")]), "skip", "absolute or ../"),
    "image link out of the image folder": (
        lambda s, o: (_link(o / "canary.png", s / "l.png"), _llava(["p0.png", "l.png"]))[1],
        "skip",
        "links outside",
    ),
    "100,000-deep LLaVA JSON": (lambda s, o: "[" * 100_000 + "]" * 100_000, "error", "nested too deeply"),
    "5,000-digit LLaVA JSON": (lambda s, o: "[" + "1" * 5000 + "]", "error", "not valid UTF-8 JSON"),
    "Infinity box in LLaVA JSON": (
        lambda s, o: _llava(["p0.png"], ', "defects": [{"type": "x", "box": [0, 0, Infinity, 1]}]'),
        "error",
        "finite",
    ),
    "LLaVA JSON not UTF-8": (lambda s, o: '[{"id": "\udcb5"}]', "error", "UTF-8"),
}


@pytest.mark.parametrize("kind", sorted(LLAVA_KINDS))
def test_prepare_llava_json_kinds(kind: str, tmp_path: Path, watch: list[str], source: tuple[Path, Path]) -> None:
    _, outside = source
    src = tmp_path / "src"
    noise(seed=30).save(src / "p0.png")
    build, outcome, reason = LLAVA_KINDS[kind]
    text = build(src, outside)
    json_path = src / "data.json"
    json_path.write_bytes(text.encode("utf-8", "surrogateescape"))
    manifest = run_prepare(None, tmp_path, watch, outside, from_llava_json=str(json_path), image_folder=str(src))
    if outcome == "skip":
        assert reason in [s["reason"] for s in manifest["skipped"]][0], manifest["skipped"]
    else:
        assert "data.json" in manifest["error"] and reason in manifest["error"], manifest


def test_prepare_llava_json_unreadable(
    tmp_path: Path, watch: list[str], source: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, outside = source
    src = tmp_path / "src"
    noise(seed=30).save(src / "p0.png")
    (src / "data.json").write_text(_llava(["p0.png"]))
    deny(src / "data.json", monkeypatch)
    try:
        from vlm_inspect.data.llava_json import read_llava_json

        with pytest.raises(DataError, match="data.json: cannot be read"):
            read_llava_json(src / "data.json", src)
    finally:
        (src / "data.json").chmod(0o644)


# ---------------------------------------------------------------- the CLI prints names, never markup


def test_cli_error_with_markup_and_non_utf8_names_prints_them_as_they_are(tmp_path: Path) -> None:
    src = tmp_path / "[bold]line[/x]" / GBK_NAME
    (src / "ok").mkdir(parents=True)
    noise().save(src / "ok" / "a.png")
    result = runner.invoke(app, ["prepare", os.fsdecode(src), "--out", str(tmp_path / "ds")], env={"COLUMNS": "400"})
    assert result.exit_code == 1
    no_traceback(result.output)
    assert "[bold]line[/x]" in result.output and "no NG class folder" in result.output
    assert "\\xbb\\xb5" in result.output  # the GBK bytes of 坏, shown escaped


def test_prepare_summary_prints_markup_names_literally(source: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = source
    (src / "ok" / "[red]x[blink].png").write_bytes(b"not a photo")
    result = runner.invoke(app, ["prepare", str(src), "--out", str(tmp_path / "ds")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "[red]x[blink].png" in result.output


# ---------------------------------------------------------------- predict and serve on the tiny model


@pytest.fixture(scope="module")
def predictor(tiny_model_dir: Path) -> Any:
    from vlm_inspect.inference import Predictor

    return Predictor.load(ModelSettings(model=tiny_model_dir, device="cpu"))


def _photo_folder(folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    for kind in PHOTO_KINDS:
        kind.write(folder / kind.name)
    for name in (GBK_NAME, "[bold]x[red]y.png", "=HYPERLINK(1).png", "n" * 251 + ".png"):
        noise(seed=len(name)).save(folder / name)
    return sorted(folder.iterdir())


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_corpus(
    suffix: str, tmp_path: Path, predictor: Any, tiny_model_dir: Path, watch: list[str], monkeypatch
) -> None:
    from vlm_inspect.inference import Predictor

    monkeypatch.setattr(Predictor, "load", classmethod(lambda cls, *a, **k: predictor))
    files = _photo_folder(tmp_path / "line")
    before = tree_digest(tmp_path / "line")
    out = tmp_path / f"preds{suffix}"
    monkeypatch.chdir(tmp_path / "line")  # relative names: a cell may then start with '='
    args = ["predict", *(os.fsdecode(f.name) for f in files), "--model", str(tiny_model_dir), "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    no_traceback(result.output)
    assert tree_digest(tmp_path / "line") == before
    text = out.read_text(encoding="utf-8")
    if suffix == ".csv":
        import csv

        rows = list(csv.DictReader(io.StringIO(text)))
        assert "'=HYPERLINK(1).png" in [r["path"] for r in rows]
        assert not any(cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r.values() if cell)
        return
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len(files)
    by_name = {Path(r["path"]).name: r for r in rows}
    for kind in PHOTO_KINDS:
        row = by_name[kind.name]
        if kind.refused:
            assert row["verdict"] == "ERROR" and kind.name in row["error"] and kind.refused in row["error"], row
        else:
            assert row["verdict"] in ("OK", "NG"), row
    assert any("\\xbb\\xb5" in r["path"] for r in rows)  # the GBK name, escaped


@pytest.fixture(scope="module")
def client(predictor: Any) -> Iterator[Any]:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vlm_inspect.service.app import create_app

    cfg = ServeConfig(model="tiny", max_batch=2, max_queue=64, request_timeout_s=60)
    with TestClient(create_app(predictor, cfg), raise_server_exceptions=False, base_url=LOOPBACK) as test_client:
        yield test_client


SERVED_KINDS = [k for k in PHOTO_KINDS if k.name != "huge_file.jpg"]  # over the upload limit: refused unread


@pytest.mark.parametrize("kind", SERVED_KINDS, ids=lambda k: k.name)
def test_serve_corpus(kind: PhotoKind, client: Any, tmp_path: Path) -> None:
    path = tmp_path / kind.name
    kind.write(path)
    data = path.read_bytes()
    multipart = client.post("/v1/inspect", files={"file": (kind.name, data)})
    as_json = client.post("/v1/inspect", json={"image": base64.b64encode(data).decode()})
    # serve's own pixel limit (50 MP) comes before the decode-memory limit for this one.
    expected = {"deep16_over_budget.png": "pixels is more than the limit"}.get(kind.name, kind.refused)
    for response in (multipart, as_json):
        no_traceback(response.text)
        if expected:
            assert response.status_code == 415, response.text
            assert expected in response.json()["error"]["message"]
        else:
            assert response.status_code == 200 and response.json()["verdict"] in ("OK", "NG"), response.text


def test_serve_decodes_at_most_max_batch_photos_at_once(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlm_inspect.service import app as serve_app

    running, peak, lock = [0], [0], threading.Lock()

    def slow_decode(data: bytes, max_pixels: int, name: str) -> Image.Image:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)  # long enough for the other requests to arrive; nothing is timed
        with lock:
            running[0] -= 1
        return noise()

    monkeypatch.setattr(serve_app, "load_image", slow_decode)
    photo = encoded(noise(), "PNG")
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda _: client.post("/v1/inspect", files={"file": ("p.png", photo)}).status_code, range(8))
        )
    assert set(codes) <= {200, 503}
    assert peak[0] in (1, 2)  # max_batch


# ---------------------------------------------------------------- model folders


def test_refused_pickle_is_a_model_folder_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from vlm_inspect.models.load import load_model

    folder = tmp_path / "evil-model"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": Evil()}, protocol=2))
    with pytest.raises(ModelFolderError, match="evil-model"):
        load_model(folder, device="cpu")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- memory


_MEMORY_SCRIPT = """
import sys
from pathlib import Path
from vlm_inspect.data.images import square_image
from vlm_inspect.data.images import load_image
from vlm_inspect.errors import DataError

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024

for path in sys.argv[1:]:
    base = hwm()
    try:
        square_image(load_image(path), [0.5, 0.5, 0.5], "pad")
        outcome = "decoded"
    except DataError:
        outcome = "refused"
    print(Path(path).name, outcome, hwm() - base, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_worst_shapes_cost_bounded_memory(tmp_path: Path) -> None:
    """Each file runs after the one before it, so a rise in the peak is that file's own cost."""
    (tmp_path / "deep16_3000.png").write_bytes(png_bytes(3000, 3000, 16, 0, b"\x12\x34" * 3000))
    (tmp_path / "strip_1x20000.png").write_bytes(png_bytes(1, 20000))
    (tmp_path / "strip_19to1.png").write_bytes(png_bytes(400, 7600))
    sparse(tmp_path / "sparse.jpg", 256 * 1024**2 + 1)
    names = ["strip_1x20000.png", "sparse.jpg", "strip_19to1.png", "deep16_3000.png"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rise = {name: (outcome, int(mib)) for name, outcome, mib in (line.split() for line in done.stdout.splitlines())}
    assert rise["strip_1x20000.png"][0] == "refused" and rise["strip_1x20000.png"][1] < 32
    assert rise["sparse.jpg"][0] == "refused" and rise["sparse.jpg"][1] < 32
    # Decoded: the raster and its RGB copy (the estimate the limit checks) plus a padded canvas of ≤ 2048².
    assert rise["strip_19to1.png"][0] == "decoded"
    estimate = images_module.decode_bytes
    assert rise["strip_19to1.png"][1] < estimate("RGB", 400, 7600) / 2**20 + 40
    assert rise["deep16_3000.png"][0] == "decoded"
    assert rise["deep16_3000.png"][1] < estimate("I;16", 3000, 3000) / 2**20 + 40
    assert estimate("I;16", 3000, 3000) < images_module.MAX_DECODE_BYTES


@pytest.mark.parametrize("image", ["../outside/canary.png", "ABSOLUTE", "linked.png"])
def test_train_and_evaluate_refuse_llava_images_outside_the_folder(
    image: str, tmp_path: Path, source: tuple[Path, Path], watch: list[str]
) -> None:
    """`train` and `evaluate` read photos straight from a LLaVA JSON: one leading out of its folder is an error
    naming it, before any photo is opened."""
    from vlm_inspect.data.dataset import load_training_dataset
    from vlm_inspect.data.sources import items_from_llava_json
    from vlm_inspect.folders import DatasetFolder

    _, outside = source
    src = tmp_path / "src"
    noise(seed=30).save(src / "p0.png")
    _link(outside / "canary.png", src / "linked.png")
    image = str(outside / "canary.png") if image == "ABSOLUTE" else image
    json_path = src / "data.json"
    json_path.write_text(_llava(["p0.png", image]))
    for read in (
        lambda: load_training_dataset(json_path, None, family_named("llava")),
        lambda: items_from_llava_json(json_path, src),
    ):
        with pytest.raises(DataError, match=r"(?s)data.json.*sample 1") as info:
            read()
        assert "outside" in str(info.value)
    assert not [p for p in watch if "canary" in p]
    opened = DatasetFolder.open(json_path)
    assert (opened.train_json, opened.image_root) == (json_path, src)
