"""Attach a trained adapter (a run folder from `train`, or a plain PEFT adapter folder) to its base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel

from vlm_inspect.errors import ModelFolderError
from vlm_inspect.folders import open_adapter


def attach_adapter(model: Any, adapter: str | Path, trainable: bool = False) -> PeftModel:
    """Wrap `model` with the adapter's weights (LoRA and the trained projector)."""
    folder, _ = open_adapter(adapter)
    try:
        return PeftModel.from_pretrained(model, folder, is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        raise ModelFolderError(f"{folder}: adapter does not fit this base model: {err}") from err
