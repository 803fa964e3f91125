"""`vlm-inspect demo`: the whole job on a laptop CPU, with no weights and no photos.

1. Synthetic photos of white boxes: a few tens for training (like a real team's), a held-out
   test set of hundreds, and a larger captioned set for the base model.
2. The demo's base model: a tiny LLaVA-1.5 whose vision tower, projector and language model
   are first trained on captions that describe each photo (the box, and any mark on it)
   without ever saying OK or NG. This stands in for the pretraining a real LLaVA has had:
   it can see and describe, but it was never taught to inspect.
3. `prepare` → `train` (LoRA, the normal verb and code path) → `evaluate` base vs tuned.

Run as: vlm-inspect demo [--out DIR] [--fast]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vlm_inspect.config import DemoConfig, EvaluateConfig, PrepareConfig, TrainConfig, save_config
from vlm_inspect.errors import OutputExistsError

console = Console()


@dataclass(frozen=True)
class DemoSize:
    """How big each part of the demo is; --fast keeps the path and shrinks the numbers."""

    caption_photos: int  # photos with captions for the base model
    caption_steps: int
    train_ok: int  # the few-shot set, like a real team's
    train_ng: int
    test_ok: int  # held-out photos the report is computed on
    test_ng: int
    tune_steps: int
    photo_size: int = 128
    min_defect_frac: float = 0.12


FULL = DemoSize(
    caption_photos=800, caption_steps=600, train_ok=20, train_ng=20, test_ok=100, test_ng=100, tune_steps=150
)
FAST = DemoSize(caption_photos=96, caption_steps=60, train_ok=8, train_ng=8, test_ok=20, test_ng=20, tune_steps=30)

# Settings of the two training stages that differ from `train`'s defaults, and why:
# the tiny model learns from scratch, so it needs a larger learning rate than a pretrained 7B.
BASE_STAGE = ["method=full", "train_vision_tower=true", "lr=1e-3", "projector_lr=1e-3", "batch_size=16"]
TUNE_STAGE = ["lr=2e-3", "projector_lr=1e-3", "batch_size=8"]


def demo(cfg: DemoConfig) -> Path:
    """Run the demo into cfg.out and return the report folder."""
    from vlm_inspect.config import build_config
    from vlm_inspect.data.prepare import prepare
    from vlm_inspect.data.synthetic import write_dataset_folders
    from vlm_inspect.evaluate.run import evaluate
    from vlm_inspect.models.tiny import save_tiny_model
    from vlm_inspect.train import train

    size = FAST if cfg.fast else FULL
    out = _fresh_folder(Path(cfg.out), cfg.overwrite)
    save_config(cfg, out)
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        times[name] = time.perf_counter() - clock
        clock = time.perf_counter()

    photos = out / "photos"
    for name, n_ok, n_ng, seed in (
        ("train", size.train_ok, size.train_ng, cfg.seed),
        ("test", size.test_ok, size.test_ng, cfg.seed + 1),
    ):  # station photos: fixed camera over a dark belt, as a line takes them
        write_dataset_folders(photos / name, n_ok, n_ng, seed, size.photo_size, size.min_defect_frac, station=True)
    captions = write_caption_dataset(out / "captions", size, cfg.seed + 2)
    lap("photos")

    save_tiny_model(out / "random-model", seed=cfg.seed)
    base_stage = build_config(
        TrainConfig,
        None,
        [*BASE_STAGE, f"min_steps={size.caption_steps}", "augment=false", f"seed={cfg.seed}"],
        model=str(out / "random-model"),
        data=str(captions),
        out=str(out / "base-run"),
    )
    train(base_stage)
    shutil.copytree(out / "base-run" / "model", out / "base-model")
    lap("base model (captions)")

    dataset = prepare(
        PrepareConfig(
            src=str(photos / "train"), out=str(out / "dataset"), val_fraction=0.1, seed=cfg.seed, product="box"
        )
    )
    lap("prepare")

    tune = build_config(
        TrainConfig,
        None,
        [*TUNE_STAGE, f"min_steps={size.tune_steps}", f"seed={cfg.seed}"],
        model=str(out / "base-model"),
        data=str(dataset),
        out=str(out / "run"),
    )
    train(tune)
    lap("fine-tune (LoRA)")

    report = evaluate(
        EvaluateConfig(
            model=str(out / "base-model"),
            adapter=str(out / "run"),
            data=str(photos / "test"),
            out=str(out / "report"),
            gallery_size=24,
        )
    )
    lap("evaluate")
    _print_summary(report, times)
    return report


def write_caption_dataset(out: Path, size: DemoSize, seed: int) -> Path:
    """Photos with one-sentence captions in LLaVA JSON; no caption says OK or NG."""
    from vlm_inspect.data.synthetic import DEFECT_KINDS, describe_defect, make_box_photo

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True)
    samples = []
    for i in range(size.caption_photos):
        kind = None if i % 2 == 0 else DEFECT_KINDS[(i // 2) % len(DEFECT_KINDS)]
        image, defects = make_box_photo(rng, kind, size.photo_size, size.min_defect_frac, station=True)
        name = f"images/{i:05d}.png"
        image.save(out / name)
        caption = "A white box with a printed label." + (
            f" There is {describe_defect(defects[0])}." if defects else " Its surface is clean and even."
        )
        samples.append(
            {
                "id": f"caption_{i:05d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the photo."},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    (out / "train.json").write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return out / "train.json"


def _fresh_folder(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: exists and is not empty; pass --overwrite or pick another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _print_summary(report: Path, times: dict[str, float]) -> None:
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    default = next(q["id"] for q in results["questions"] if q.get("default"))
    table = Table(title="Held-out photos, default question")
    table.add_column("metric")
    for name in ("base", "tuned"):
        table.add_column(name, justify="right")
    for key in ("accuracy", "balanced_accuracy", "escape_rate", "overkill_rate"):
        cells = [_percent(results["metrics"][m][default][key]["value"]) for m in ("base", "tuned")]
        table.add_row(key.replace("_", " "), *cells)
    auc = [results["metrics"][m][default]["auc"]["value"] for m in ("base", "tuned")]
    table.add_row("ROC AUC", *(f"{a:.3f}" if a is not None else "-" for a in auc))
    console.print(table)
    timing = Table(title="Time")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for stage, seconds in times.items():
        timing.add_row(stage, f"{seconds:.0f}")
    timing.add_row("total", f"{sum(times.values()):.0f}")
    console.print(timing)
    console.print(f"report: [bold]{report / 'report.html'}[/]")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
