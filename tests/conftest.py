"""Shared fixtures: the tiny LLaVA, the spot dataset and trained runs, each built once per test session and
never committed. Every test that trains (through the `trained_run` fixture) is marked `integration`, so plain
`pytest` stays the seconds-long loop."""

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
    from vlm_inspect.models.families.llava import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


def write_spot_dataset(
    out: Path,
    n: int = 16,
    size: tuple[int, int] = (80, 64),
    language: str = "en",
    product: str = "box",
    reference: bool = False,
) -> Path:
    """A LLaVA-format dataset of light boxes, every other one with a dark spot (NG); with `reference`, a clean box
    in `reference/` (as prepare writes it) is shown before every photo and its first question says so."""
    import json

    from PIL import Image, ImageDraw

    (out / "images").mkdir(parents=True, exist_ok=True)
    intro = _reference_intro(out, size, product) if reference else ""
    samples = []
    for i in range(n):
        ng = i % 2 == 1
        image = Image.new("RGB", size, (225 + i % 3 * 10, 225, 220))
        if ng:
            x = 10 + (i * 7) % 40
            ImageDraw.Draw(image).ellipse((x, 16, x + 20, 36), fill=(15, 15, 15))
        image.save(out / "images" / f"{i:03d}.png")
        answer = "NG. There is a black spot on the box." if ng else "OK. The box has no visible defects."
        question = f"{intro} Is this box OK or NG?" if reference else "Is this box OK or NG?"
        conversations = [
            {"from": "human", "value": "<image>\n" * (2 if reference else 1) + question},
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
                **({"reference": ["reference/ref_01.png"]} if reference else {}),
            }
        )
    (out / "train.json").write_text(json.dumps(samples))
    (out / "val.json").write_text(json.dumps(samples[:4]))
    manifest = {"language": language, "product": product}
    if reference:
        manifest["prompts"] = {"reference_intro": _intros(product)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _intros(product: str) -> dict[str, str]:
    from vlm_inspect.data.prompts import load_prompts

    return load_prompts("en").reference_intros(product)


def _reference_intro(out: Path, size: tuple[int, int], product: str) -> str:
    """Write the clean reference box into `out/reference/` with its index; the sentence that introduces it."""
    import hashlib

    from PIL import Image

    from vlm_inspect.data.reference import ReferencePhoto, write_reference_folder

    source = out / "clean.png"
    Image.new("RGB", size, (232, 226, 221)).save(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    write_reference_folder(out / "reference", [(source, ReferencePhoto("ref_01.png", "clean.png", digest, *size))])
    source.unlink()
    return _intros(product)["one"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(family)`: that family's tiny random model folder, built once per session."""
    from vlm_inspect.models.families import family_named

    built: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in built:
            built[family] = family_named(family).build_tiny(tmp_path_factory.mktemp("models") / family)
        return built[family]

    return make


@pytest.fixture(scope="session")
def spot_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 tiny labelled photos in the prepare output layout."""
    return write_spot_dataset(tmp_path_factory.mktemp("data") / "spots")


@pytest.fixture(scope="session")
def reference_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spot dataset with a known-good clean box shown before every photo (prepare's reference layout)."""
    return write_spot_dataset(tmp_path_factory.mktemp("data") / "spots-with-reference", reference=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "trained_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, spot_dataset: Path):
    """`trained_run(**settings)`: a run of the real `train` on the tiny LLaVA and the spot dataset, trained once
    per session for each set of settings (fast LoRA defaults; e.g. `trained_run(method="full")`)."""
    from vlm_inspect.config import TrainConfig
    from vlm_inspect.train import train

    runs: dict[tuple, Path] = {}
    fast = {"lora_r": 8, "lora_alpha": 16, "lr": 1e-2, "projector_lr": 2e-3, "min_steps": 60, "augment": False}

    def make(**settings) -> Path:
        key = tuple(sorted(settings.items()))
        if key not in runs:
            out = tmp_path_factory.mktemp("runs") / "run"
            cfg = TrainConfig(model=str(tiny_model_dir), data=str(spot_dataset), out=str(out), **{**fast, **settings})
            runs[key] = train(cfg)
        return runs[key]

    return make
