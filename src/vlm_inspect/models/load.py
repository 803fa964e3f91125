"""Load a model folder of any supported family (models/family.py) with clear errors.

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
from vlm_inspect.models.family import Family, family_of, read_config
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
    if not (folder / "config.json").exists():
        if (folder / "adapter_config.json").exists():
            raise ModelFolderError(
                f"{folder}: holds an adapter, not a model; pass it as --adapter and the base model as --model"
            )
        raise ModelFolderError(f"{folder}: missing config.json; is this a model folder?")
    config = read_config(folder)
    if "mm_vision_tower" in config or config.get("model_type") == "llava_llama":
        raise ModelFolderError(
            f"{folder}: this is the original LLaVA layout (liuhaotian/...); convert it first:\n"
            f"  vlm-inspect convert --llava {folder} --vision-tower CLIP_DIR --out {folder}-hf"
        )
    family_of(config.get("model_type"), folder / "config.json")
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


def folder_family(path: str | Path) -> Family:
    """The family of a checked model folder, from its config.json."""
    folder = check_model_folder(path)
    return family_of(read_config(folder).get("model_type"), folder / "config.json")


def load_processor(path: str | Path, image_max_tokens: int | None = None) -> Any:
    """The folder's processor with the family's chat template and resolution; left padding so batched
    prompts end together."""
    folder = check_model_folder(path)
    family = folder_family(folder)
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


def without_video(cls: type) -> type:
    """`cls` without its video processor, under the same name (so a saved folder names the real class).

    The Qwen and InternVL processors require a video processor, which requires torchvision, whose PyPI
    wheel does not import beside the CPU torch build; inspection photos never need it."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: attributes)})


def _processor_without_video(folder: Path) -> Any:
    import transformers

    name = json.loads((folder / "processor_config.json").read_text(encoding="utf-8")).get("processor_class", "")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelFolderError(f"{folder}: processor_config.json names an unknown processor {name!r}")
    return without_video(cls).from_pretrained(folder)


def load_model(
    path: str | Path,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    quantization_config: object | None = None,
) -> Any:
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
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as err:  # a refused pickle in *.bin too
        raise ModelFolderError(f"{folder}: could not load the model: {err}") from err
    return model
