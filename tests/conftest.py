"""Shared fixtures: the tiny LLaVA is built once per test session, never committed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub, and never prompt.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CHROMIUM = Path("/usr/bin/chromium")
"""Debian's Chromium; browser tests skip with a reason without it (.ci/run installs it)."""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses those connections
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA-1.5 in the llava-hf layout (model, tokenizer, processor)."""
    from vlm_inspect.models.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


def write_spot_dataset(out: Path, n: int = 16, size: tuple[int, int] = (80, 64)) -> Path:
    """A LLaVA-format dataset of light boxes, every other one with a dark spot (NG)."""
    import json

    from PIL import Image, ImageDraw

    (out / "images").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        ng = i % 2 == 1
        image = Image.new("RGB", size, (225 + i % 3 * 10, 225, 220))
        if ng:
            x = 10 + (i * 7) % 40
            ImageDraw.Draw(image).ellipse((x, 16, x + 20, 36), fill=(15, 15, 15))
        image.save(out / "images" / f"{i:03d}.png")
        answer = "NG. There is a black spot on the box." if ng else "OK. The box has no visible defects."
        conversations = [
            {"from": "human", "value": "<image>\nIs this box OK or NG?"},
            {"from": "gpt", "value": answer},
        ]
        if ng:
            conversations += [
                {"from": "human", "value": "Describe the defects."},
                {"from": "gpt", "value": "A black spot."},
            ]
        samples.append(
            {
                "id": f"s{i}",
                "image": f"images/{i:03d}.png",
                "conversations": conversations,
                "label": "NG" if ng else "OK",
            }
        )
    (out / "train.json").write_text(json.dumps(samples))
    (out / "val.json").write_text(json.dumps(samples[:4]))
    (out / "manifest.json").write_text(json.dumps({"language": "en", "product": "box"}))
    return out


@pytest.fixture(scope="session")
def spot_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 tiny labelled photos in the prepare output layout."""
    return write_spot_dataset(tmp_path_factory.mktemp("data") / "spots")
