"""`vlm-inspect merge`: fold a trained adapter into its base, and prove the result answers alike.

The base is loaded unquantized (fp32 on CPU, where fp16 matmuls may be missing; the requested
precision on a GPU), so a QLoRA run is merged onto the full-precision base, never onto 4-bit
weights. The LoRA and the trained projector are folded in, the weights are cast to the requested
precision and saved as a plain llava-hf folder. The saved folder is then loaded again and run on
probe inputs next to the adapter model; if the largest logit difference exceeds what the saved
precision explains, the merge fails and nothing is left at `out`. Any family (models/family.py) merges the
same way; the processor is saved with the run's image-token budget.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rich.console import Console

from vlm_inspect.config import MergeConfig, TrainConfig, require, save_config
from vlm_inspect.errors import ConfigError, DataError, ModelFolderError
from vlm_inspect.folders import DatasetFolder, ModelFolder, open_adapter
from vlm_inspect.models.adapter import attach_adapter
from vlm_inspect.models.chat import prompt, render
from vlm_inspect.models.load import DTYPES, SHARD_SIZE, load_model, load_processor, resolve_device
from vlm_inspect.outputs import staged_output

DEFAULT_QUESTION = "Is this product OK or NG?"
MAX_PROBES = 2
# Largest logit difference accepted between the adapter model and the saved merged model, as a
# share of the largest logit (at least 1). fp32 differs only by summation order; fp16 and bf16
# add the rounding of every weight (bf16 keeps 8 bits of mantissa, fp16 11).
TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}
console = Console()


@dataclass
class Probes:
    """Inputs both models are run on, and where they came from."""

    images: list[Image.Image]
    texts: list[str]
    source: str


def merge(cfg: MergeConfig) -> Path:
    """Merge `cfg.adapter` into `cfg.model`, save to `cfg.out`, and check the merged model.

    Args:
        cfg: base folder, adapter or run folder, output folder and saved precision.

    Returns:
        The merged model folder.

    Raises:
        ConfigError: a required setting is missing, or out is one of the inputs.
        ModelFolderError: the base or adapter cannot be loaded, or the merged model's logits
            differ from the adapter model's beyond the saved precision's tolerance.
        OutputExistsError: `out` exists and `overwrite` is off.
    """
    _check_settings(cfg)
    base = ModelFolder.open(cfg.model)
    adapter_dir, run = open_adapter(cfg.adapter)
    trained = run.config() if run else None
    device = resolve_device("auto")
    # fp32 on CPU: fp16 matmuls are missing or slow there, and the merge itself loses nothing.
    work_dtype = torch.float32 if device.type == "cpu" else DTYPES[cfg.dtype]
    with staged_output(cfg.out, cfg.overwrite, "MergeConfig", (cfg.model, cfg.adapter)) as tmp:
        processor = load_processor(base, trained.image_max_tokens if trained else None)
        probes = probe_inputs(trained, processor)
        batch = _batch(processor, probes)
        adapter_logits = _merge_and_save(cfg, base, adapter_dir, tmp, batch, work_dtype, device)
        processor.save_pretrained(tmp)
        base.copy_side_files(tmp)
        # The check runs on what was written, so a bad cast or save fails it too.
        merged_logits = _saved_model_logits(tmp, batch, work_dtype, device)
        diff, allowed = _compare(adapter_logits, merged_logits, cfg.dtype)
        if diff > allowed:
            raise ModelFolderError(
                f"{cfg.out}: merge check failed: the merged model's logits differ from the adapter model's by "
                f"up to {diff:.4g} (allowed for {cfg.dtype}: {allowed:.4g}) on {probes.source}; nothing was saved"
            )
        if run is not None:
            run.describe_model(tmp)
        save_config(cfg, tmp)
    _print_summary(cfg, adapter_dir, trained, probes, diff, allowed, device)
    return Path(cfg.out)


def _merge_and_save(
    cfg: MergeConfig,
    base: ModelFolder,
    adapter_dir: Path,
    folder: Path,
    batch: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Merge the adapter into the unquantized base, save it in cfg.dtype; the adapter model's probe logits."""
    model = attach_adapter(load_model(base, dtype=dtype, device=device), adapter_dir)
    adapter_logits = probe_logits(model, batch)
    merged = merge_weights(model)
    merged.to(DTYPES[cfg.dtype]).save_pretrained(folder, max_shard_size=SHARD_SIZE)
    del model, merged
    _free(device)
    return adapter_logits


def _saved_model_logits(
    folder: Path, batch: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    model = load_model(folder, dtype=dtype, device=device)
    logits = probe_logits(model, batch)
    del model
    _free(device)
    return logits


def _check_settings(cfg: MergeConfig) -> None:
    problems = require(cfg, "model", "adapter", "out")
    if cfg.out and any(Path(cfg.out).resolve() == Path(p).resolve() for p in (cfg.model, cfg.adapter) if p):
        problems.append(f"out: {cfg.out} is also an input; write the merged model to a new folder")
    if problems:
        raise ConfigError(problems)


def merge_weights(model: Any) -> Any:
    """Fold LoRA and the trained projector into the base; the plain model comes back."""
    return model.merge_and_unload()


# ------------------------------------------------------------------ probes


def probe_inputs(trained: TrainConfig | None, processor: Any) -> Probes:
    """Up to MAX_PROBES image + conversation pairs from the run's training data.

    Falls back to a drawn box and a default question when the run names no dataset that can be
    read here (an adapter folder alone, or a dataset moved since training).
    """
    if trained is not None:
        found = _dataset_probes(Path(trained.data), processor)
        if found is not None:
            return found
    image = Image.new("RGB", (320, 240), (236, 236, 232))
    draw = ImageDraw.Draw(image)
    draw.rectangle((80, 50, 240, 190), fill=(250, 250, 250), outline=(90, 90, 90), width=3)
    draw.ellipse((110, 80, 130, 100), fill=(25, 25, 25))
    return Probes([image], [prompt(processor, DEFAULT_QUESTION)], "a drawn test image and a default question")


def _dataset_probes(data: Path, processor: Any) -> Probes | None:
    """Probes from the run's dataset folder or LLaVA JSON file; None if it cannot be read here."""
    try:
        dataset = DatasetFolder.open(data)
        samples = dataset.samples()
    except DataError:
        return None
    images, texts = [], []
    for record in samples:
        sample = _record_probe(record, dataset.image_root, processor)
        if sample:
            images.append(sample[0])
            texts.append(sample[1])
        if len(images) == MAX_PROBES:
            break
    if not images:
        return None
    return Probes(images, texts, f"{len(images)} training sample(s) of {dataset.train_json}")


def _record_probe(record: object, image_root: Path, processor: Any) -> tuple[Image.Image, str] | None:
    """The image and first question + answer of one LLaVA-JSON record, or None if unusable."""
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return None
    conversations = record.get("conversations") or []
    if len(conversations) < 2 or not all(isinstance(c, dict) and "value" in c for c in conversations[:2]):
        return None
    path = image_root / record["image"]
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except OSError:
        return None
    question, answer = conversations[0]["value"], conversations[1]["value"]
    return image, render(processor, [(question, answer)])


def _batch(processor: Any, probes: Probes) -> dict[str, torch.Tensor]:
    images = [[image] for image in probes.images]
    return dict(processor(images=images, text=probes.texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def probe_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at every non-padding position, as fp32 on the CPU."""
    parameter = next(model.parameters())
    inputs = {k: v.to(parameter.device) for k, v in batch.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
    logits = model.eval()(**inputs).logits.float().cpu()
    return logits[batch["attention_mask"].bool()]


def _compare(adapter: torch.Tensor, merged: torch.Tensor, dtype: str) -> tuple[float, float]:
    """(largest absolute difference, the most allowed for `dtype` at these logits' scale)."""
    diff = (adapter - merged).abs().max().item()
    if not torch.isfinite(merged).all():
        diff = float("inf")
    scale = max(1.0, adapter.abs().max().item())
    return diff, TOLERANCE[dtype] * scale


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _print_summary(
    cfg: MergeConfig,
    adapter_dir: Path,
    trained: TrainConfig | None,
    probes: Probes,
    diff: float,
    allowed: float,
    device: torch.device,
) -> None:
    merged_in = "fp32 on CPU" if device.type == "cpu" else f"{cfg.dtype} on {device}"
    lines = [
        f"[bold green]merged[/] {adapter_dir} into {cfg.model} → {cfg.out}",
        f"  saved as {cfg.dtype} (merged in {merged_in})",
        f"  checked on {probes.source}: largest logit difference {diff:.3g} (allowed {allowed:.3g})",
    ]
    if trained is not None and trained.method == "qlora":
        lines.insert(1, "  QLoRA run: merged onto the unquantized base, never onto 4-bit weights")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
