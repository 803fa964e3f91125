"""Load a checked model folder (`folders.ModelFolder`) of any supported family, with clear errors.

Weights stream shard by shard to their device: no full fp32 copy is made in host RAM. Processors that ask
for a video processor (Qwen, InternVL) load without one where torchvision is missing: photos need none.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_inspect.errors import ModelFolderError
from vlm_inspect.folders import ModelFolder
from vlm_inspect.models.families.common import without_video
from vlm_inspect.models.fp8 import resolve_compute_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shard size of the model folders we write (convert, merge); llava-hf/llava-1.5-7b-hf uses 5 GB shards too.
SHARD_SIZE = "5GB"


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' is the first visible GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU; 'fp8' is bf16 around FP8
    language-model weights (models/fp8.py), refused where the device has no FP8."""
    if precision == "fp8":
        return resolve_compute_dtype(device)
    if precision != "auto":
        return DTYPES[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_processor(model: str | Path | ModelFolder, image_max_tokens: int | None = None) -> Any:
    """The folder's processor with the family's chat template and resolution; left padding so batched
    prompts end together."""
    model = ModelFolder.open(model)
    folder, family = model.path, model.family
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (ImportError, AttributeError, ValueError, OSError) as err:
        if "video" not in str(err).lower() and "torchvision" not in str(err).lower():
            raise ModelFolderError(f"{folder}: could not load the processor: {err}") from err
        processor = _processor_without_video(folder)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        raise ModelFolderError(f"{folder}: the tokenizer has no pad token")
    if family.chat_template is not None:
        processor.chat_template = family.chat_template
    if getattr(processor, "chat_template", None) is None:
        raise ModelFolderError(f"{folder}: the processor has no chat template (chat_template.jinja)")
    family.set_resolution(processor, image_max_tokens)
    return processor


def _processor_without_video(folder: Path) -> Any:
    import transformers

    name = json.loads((folder / "processor_config.json").read_text(encoding="utf-8")).get("processor_class", "")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelFolderError(f"{folder}: processor_config.json names an unknown processor {name!r}")
    return without_video(cls).from_pretrained(folder)


def load_model(
    model: str | Path | ModelFolder,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    quantization_config: object | None = None,
) -> Any:
    """Load weights straight to `device` in `dtype` (shard by shard, low host RAM)."""
    folder = ModelFolder.open(model).path
    device = resolve_device(device) if isinstance(device, str) else device
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    kwargs: dict = {"dtype": dtype, "low_cpu_mem_usage": True}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device.index or 0}
    elif device.type != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:  # a refused pickle in *.bin too
        raise ModelFolderError(f"{folder}: could not load the model: {err}") from err
    return model
