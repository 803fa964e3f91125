"""Find and attach a trained adapter: a run folder from `train` or a plain PEFT adapter folder."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import LlavaForConditionalGeneration

from vlm_inspect.errors import ModelFolderError

ADAPTER_CONFIG = "adapter_config.json"


def resolve_adapter_dir(path: str | Path) -> Path:
    """The PEFT folder inside `path`: `path` itself, or `path/adapter` for a run folder."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{folder}: no such adapter or run folder")
    for candidate in (folder, folder / "adapter"):
        if (candidate / ADAPTER_CONFIG).exists():
            if not any(candidate.glob("adapter_model.*")):
                raise ModelFolderError(f"{candidate}: has {ADAPTER_CONFIG} but no adapter_model.safetensors")
            return candidate
    if (folder / "checkpoints").is_dir():
        raise ModelFolderError(
            f"{folder}: this run has no adapter/ yet (unfinished?); `vlm-inspect train --resume` finishes it"
        )
    raise ModelFolderError(f"{folder}: no {ADAPTER_CONFIG} here or in {folder / 'adapter'}")


def attach_adapter(model: LlavaForConditionalGeneration, adapter: str | Path, trainable: bool = False) -> PeftModel:
    """Wrap `model` with the adapter's weights (LoRA and the trained projector)."""
    folder = resolve_adapter_dir(adapter)
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelFolderError(f"{folder}: adapter does not fit this base model: {err}") from err
