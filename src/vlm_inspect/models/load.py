"""Load a llava-hf layout folder (the real 7B or the tiny one) with clear errors.

Weights stream shard by shard to their device: no full fp32 copy is made in host RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vlm_inspect.errors import ModelFolderError
from vlm_inspect.models.fp8 import resolve_compute_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


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


def check_model_folder(path: str | Path) -> Path:
    """Raise ModelFolderError naming what is missing, or saying which layout the folder is."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: is a file, expected a model folder")
    config_path = folder / "config.json"
    if not config_path.exists():
        if (folder / "adapter_config.json").exists():
            raise ModelFolderError(
                f"{folder}: holds an adapter, not a model; pass it as --adapter and the base model as --model"
            )
        raise ModelFolderError(f"{folder}: missing config.json; is this a model folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{config_path}: not valid JSON ({err})") from None
    if any(k.startswith("mm_") for k in config) or config.get("model_type") == "llava_llama":
        raise ModelFolderError(
            f"{folder}: this is the original LLaVA layout (liuhaotian/...); convert it first:\n"
            f"  vlm-inspect convert --llava {folder} --vision-tower CLIP_DIR --out {folder}-hf"
        )
    if config.get("model_type") != "llava":
        raise ModelFolderError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'llava' (llava-hf layout)"
        )
    missing = []
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        missing.append("weights (*.safetensors)")
    if not any((folder / f).exists() for f in _TOKENIZER_FILES):
        missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    if not any((folder / f).exists() for f in _PROCESSOR_FILES):
        missing.append("image processor (processor_config.json or preprocessor_config.json)")
    if missing:
        raise ModelFolderError(f"{folder}: missing {', '.join(missing)}")
    return folder


def load_processor(path: str | Path) -> LlavaProcessor:
    """The folder's LlavaProcessor; left padding so batched prompts end together."""
    folder = check_model_folder(path)
    processor = AutoProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        raise ModelFolderError(f"{folder}: the tokenizer has no pad token")
    return processor


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    quantization_config: object | None = None,
) -> LlavaForConditionalGeneration:
    """Load weights straight to `device` in `dtype` (shard by shard, low host RAM)."""
    folder = check_model_folder(path)
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
        model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelFolderError(f"{folder}: could not load the model: {err}") from err
    return model
