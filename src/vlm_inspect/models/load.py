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
from vlm_inspect.folders import PROCESSOR_FILES, ModelFolder
from vlm_inspect.models.families.common import without_video
from vlm_inspect.models.fp8 import resolve_compute_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Shard size of the model folders we write (convert, merge); llava-hf/llava-1.5-7b-hf uses 5 GB shards too.
SHARD_SIZE = "5GB"
PROBE_QUESTION = "Is this product OK or NG?"
"""What the load-time probe asks about its blank photo (any question the template renders will do)."""
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
"""Where a model folder keeps its chat template, in the order transformers reads them."""


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
    prompts end together. Checked once here, on a probe photo (`probe_processor`), so a folder whose template,
    processor class or image processor does not work is an error naming the folder and the file at load time,
    not a traceback at the first photo.

    Raises:
        ModelFolderError: naming the folder and the file (processor_config.json, chat_template.jinja, ...).
    """
    model = ModelFolder.open(model)
    folder, family = model.path, model.family
    processor = _auto_processor(folder)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelFolderError(
            f"{_first(folder, PROCESSOR_FILES)}: does not name a processor of images and text "
            f"(transformers made a {type(processor).__name__} of it); is processor_class right?"
        )
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        raise ModelFolderError(f"{folder}: the tokenizer has no pad token")
    if family.chat_template is not None:
        processor.chat_template = family.chat_template
    if getattr(processor, "chat_template", None) is None:
        raise ModelFolderError(f"{folder}: the processor has no chat template (chat_template.jinja)")
    family.set_resolution(processor, image_max_tokens)
    probe_processor(processor, folder)
    return processor


def _auto_processor(folder: Path) -> Any:
    # transformers raises ImportError, AttributeError, ValueError, OSError, KeyError, TypeError... for a processor
    # configuration it cannot use: each is a problem of this folder's files.
    try:
        try:
            return AutoProcessor.from_pretrained(folder)
        except (ImportError, AttributeError, ValueError, OSError) as err:
            if "video" not in str(err).lower() and "torchvision" not in str(err).lower():
                raise
            return _processor_without_video(folder)
    except ModelFolderError:
        raise
    except Exception as err:
        raise ModelFolderError(
            f"{_first(folder, PROCESSOR_FILES)}: transformers could not load the processor: {_short(err)}"
        ) from err


def probe_processor(processor: Any, folder: Path) -> None:
    """One probe photo through the chat template and the processor, as scoring sends it: the template renders a
    question with the photo, puts the processor's image token in it, and the processor expands that token into
    image positions beside pixel values. Training, prediction and the service all load through here."""
    from PIL import Image

    from vlm_inspect.models.chat import prompt

    template = _first(folder, TEMPLATE_FILES)
    token = getattr(processor, "image_token", None)
    try:
        text = prompt(processor, PROBE_QUESTION)
    except Exception as err:  # jinja2's syntax and undefined-name errors, a template that raises
        raise ModelFolderError(
            f"{template}: the chat template cannot render a question with a photo: {_short(err)}"
        ) from err
    if not token or token not in text:
        raise ModelFolderError(
            f"{template}: the chat template does not put the processor's image token {token!r} in the prompt, "
            "so the model would never see the photo"
        )
    try:
        inputs = processor(images=[[Image.new("RGB", (64, 64), "white")]], text=[text], return_tensors="pt")
    except Exception as err:  # the image processor or the token expansion failing on a plain photo
        raise ModelFolderError(
            f"{_first(folder, PROCESSOR_FILES)}: the processor cannot prepare a probe photo: {_short(err)}"
        ) from err
    token_id = getattr(processor, "image_token_id", None) or processor.tokenizer.convert_tokens_to_ids(token)
    if "pixel_values" not in inputs or not (inputs["input_ids"] == token_id).any():
        raise ModelFolderError(
            f"{_first(folder, PROCESSOR_FILES)}: the processor gives a probe photo no image positions ({token!r}) "
            "or no pixel values"
        )


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of `names` present in the folder (the file a message should point at), else the first name."""
    return next((folder / name for name in names if (folder / name).is_file()), folder / names[0])


def _short(err: Exception) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _processor_without_video(folder: Path) -> Any:
    import transformers

    name = json.loads((folder / "processor_config.json").read_text(encoding="utf-8")).get("processor_class", "")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelFolderError(f"{folder / 'processor_config.json'}: names an unknown processor {name!r}")
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
