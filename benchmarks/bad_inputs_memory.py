"""Peak memory of one hostile photo through the predict and serve decode paths.

Builds three inputs in a temporary folder: a 162-byte 1 x 20000 PNG, a 16-bit 7000 x 7000 PNG and a
2 GiB sparse `.jpg` (a real JPEG header, then zeros, taking no disk space). Each case runs in a fresh
Python process that decodes the input as `predict` does (`load_image(path)`, the LLaVA 'pad' square,
the tiny model's image processor) or as `serve` does (`load_image(upload_bytes, 50 MP)`), and prints
the rise of its peak resident memory (VmHWM) over the resident memory after imports.

Run from the repository root (about a minute on two CPU cores; the old code needs ~7 GB free):

    PYTHONPATH=src python benchmarks/bad_inputs_memory.py
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

CASES = ("thin_png", "png16_7000", "sparse_jpg_2gib")
# serve never reads an upload over its 20 MB limit, so the 2 GiB file is a predict case only.
PATHS = {"predict": CASES, "serve": ("thin_png", "png16_7000")}


def _png(width: int, height: int, bit_depth: int, colour_type: int, row: bytes) -> bytes:
    """A PNG whose rows are all `row`, written by hand so it stays a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, colour_type, 0, 0, 0])
    raw = zlib.compress((b"\x00" + row) * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def make_inputs(folder: Path) -> dict[str, Path]:
    """The three hostile files of issue #19, item 1."""
    from PIL import Image

    thin = folder / "thin.png"
    thin.write_bytes(_png(1, 20000, 8, 2, b"\x80\x80\x80"))
    deep = folder / "deep16.png"
    deep.write_bytes(_png(7000, 7000, 16, 0, b"\x12\x34" * 7000))
    sparse = folder / "sparse.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "grey").save(buffer, "JPEG")
    with sparse.open("wb") as f:
        f.write(buffer.getvalue())
        f.truncate(2 * 1024**3)
    return {"thin_png": thin, "png16_7000": deep, "sparse_jpg_2gib": sparse}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(path_kind: str, image_path: str, model_dir: str) -> None:
    """One decode in this fresh process; prints 'MiB outcome'."""
    from transformers import AutoProcessor

    from vlm_inspect.data.images import load_image, square_image
    from vlm_inspect.errors import DataError

    processor = AutoProcessor.from_pretrained(model_dir)
    image_processor = processor.image_processor
    base = _rss_kib("VmRSS")
    try:
        if path_kind == "serve":
            source: Path | bytes = Path(image_path).read_bytes()
            image = load_image(source, 50_000_000, "upload")
        else:
            image = load_image(image_path)
        squared = square_image(image, image_processor.image_mean, "pad")
        image_processor(images=[squared], return_tensors="pt")
        outcome = f"decoded {image.width}x{image.height}"
    except DataError as err:
        outcome = f"refused: {err}"
    print(f"{(_rss_kib('VmHWM') - base) / 1024:.0f} {outcome}")


def main() -> None:
    from vlm_inspect.models.families.llava import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = make_inputs(folder)
        model_dir = save_tiny_model(folder / "tiny", seed=0)
        print(f"{'path':8} {'input':16} {'file bytes':>12} {'peak RSS rise MiB':>18}  outcome")
        for path_kind, cases in PATHS.items():
            for case in cases:
                path = inputs[case]
                done = subprocess.run(
                    [sys.executable, __file__, "--child", path_kind, str(path), str(model_dir)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    line = f"- crashed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
                else:
                    line = done.stdout.strip().splitlines()[-1]
                mib, _, outcome = line.partition(" ")
                print(f"{path_kind:8} {case:16} {path.stat().st_size:>12,} {mib:>18}  {outcome[:110]}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(*sys.argv[2:])
    else:
        main()
