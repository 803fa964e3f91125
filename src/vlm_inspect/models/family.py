"""What differs between model families, in one record per family; the rest of the code is family-blind.

A family is found from the folder's `config.json` (`model_type`), never from a flag. Each family's record
lives in `models/families/<name>.py` beside the recipe of its tiny test model.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_inspect.errors import ModelFolderError

# Every family's language model is `model.language_model` with Llama-style projections: one LoRA pattern fits all.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Family:
    """One model family: module paths, processor outputs, prompt format, resolution, fast paths, tiny recipe."""

    name: str
    """Short name used by `tiny-model --family` and in reports."""
    model_types: tuple[str, ...]
    """`model_type` values in config.json that mean this family."""
    vision: str
    """Attribute of the inner model (`model.model`) holding the vision tower."""
    projector: str
    """Dotted path under the inner model of the vision-to-language projector (trained fully beside LoRA)."""
    side_inputs: tuple[str, ...] = ()
    """Per-token processor outputs the model needs besides input_ids/attention_mask; padded like input_ids.
    Dropping one changes logits with no error (Qwen2.5-VL mm_token_type_ids, Gemma 3 token_type_ids)."""
    chat_template: str | None = None
    """Template that replaces the folder's own (LLaVA-1.5: ours renders the original training format)."""
    square_pad: bool = False
    """Fixed-square families: pad a photo to a square of the mean colour first (LLaVA-1.5 'pad')."""
    default_image_max_tokens: int | None = None
    """Dynamic-resolution families: image tokens a photo may cost by default (None: fixed by the model)."""
    apply_token_budget: Callable[[Any, int], None] | None = None
    """Sets the processor's resolution so a photo costs at most this many image tokens (dynamic families)."""
    seen_size: Callable[[Any, int, int], tuple[float, float]] = None  # type: ignore[assignment]
    """(width, height) a photo of this size takes up in the pixels the vision encoder reads; unset: the
    processor's square view of the photo padded to a square (LLaVA-1.5, Gemma 3)."""
    fast_paths: bool = False
    """Whether the measured GPU fast paths for scoring and describing (compiled layers, CUDA-graph greedy
    decoder) are on for it."""
    compile_training: bool = False
    """Whether `train` compiles the decoder layers on a GPU by default (on where it was measured to help)."""
    vision_plan: Callable[[Any, torch.Tensor], dict] | None = None
    """Builds the vision tower's per-photo-size plan for one packed attention call per layer on CUDA
    (`models/qwen_vision.py`); None: the tower's attention runs stock."""
    prompt_positions: Callable[[Any, dict], torch.Tensor] | None = None
    """The prompt's position ids as `generate` computes them, for the greedy decoder (M-RoPE families: the
    inner model's (3, batch, length) `get_rope_index`); None: one position per unpadded token."""
    build_tiny: Callable[..., Path] = field(default=None, repr=False)  # type: ignore[assignment]
    """Builds and saves a tiny random model, tokenizer and processor of this family (tests, trials)."""

    @property
    def projector_leaf(self) -> str:
        """The projector's last name (a short skip pattern for bitsandbytes)."""
        return self.projector.rsplit(".", 1)[-1]

    def check_side_inputs(self, model: Any, inputs: Any, where: Any) -> None:
        """Raise if the processor left out a per-token input this model's forward takes: without it the
        logits change with no error (M-RoPE positions, Gemma 3's image mask)."""
        accepted = inspect.signature(self.inner(model).forward).parameters
        missing = [name for name in self.side_inputs if name in accepted and name not in inputs]
        if missing:
            raise ModelFolderError(
                f"{where}: the processor gave no {', '.join(missing)}, which {self.name} needs for correct "
                "outputs; is the folder's processor_config.json from another model?"
            )

    def inner(self, model: Any) -> Any:
        """The model under the LM head (`model.model`), through a PEFT wrapper if there is one."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return base.model

    def vision_tower(self, model: Any) -> torch.nn.Module:
        return getattr(self.inner(model), self.vision)

    def projector_module(self, model: Any) -> torch.nn.Module:
        return self.inner(model).get_submodule(self.projector)

    def language_layers(self, model: Any) -> torch.nn.ModuleList:
        return self.inner(model).language_model.layers

    def qlora_keep_unquantized(self) -> list[str]:
        """Module-name prefixes bitsandbytes must leave in 16 bits (vision tower, projector, LM head).

        transformers matches skip patterns from the start of the full module name, so the short names alone
        leave these quantized."""
        return [f"model.{self.vision}", f"model.{self.projector}", self.vision, self.projector_leaf, "lm_head"]

    def seen(self, processor: Any, width: int, height: int) -> tuple[float, float]:
        """What a `width` × `height` photo becomes in the encoder's pixels (after any shrink for memory)."""
        from vlm_inspect.data.images import MODEL_INPUT_MAX_SIDE

        shrink = min(1.0, MODEL_INPUT_MAX_SIDE / max(width, height))
        width, height = round(width * shrink), round(height * shrink)
        return (self.seen_size or square_view)(processor, width, height)

    def set_resolution(self, processor: Any, image_max_tokens: int | None) -> int | None:
        """Apply image_max_tokens to the processor (dynamic families); the value in force, or None if fixed."""
        if self.apply_token_budget is None:
            return None
        tokens = image_max_tokens or self.default_image_max_tokens
        self.apply_token_budget(processor, tokens)
        return tokens


def square_view(processor: Any, width: int, height: int) -> tuple[float, float]:
    """The photo padded to a square and resized to the processor's fixed side (336 px for LLaVA-1.5)."""
    image_processor = processor.image_processor
    view = getattr(image_processor, "crop_size", None) or image_processor.size
    scale = view["height"] / max(width, height)
    return width * scale, height * scale


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: cannot be read ({err})") from None


def all_families() -> tuple[Family, ...]:
    from vlm_inspect.models.families import gemma3, internvl, llava, qwen2_5_vl, qwen3_vl

    return (llava.FAMILY, qwen2_5_vl.FAMILY, qwen3_vl.FAMILY, internvl.FAMILY, gemma3.FAMILY)


def family_named(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    known = ", ".join(f.name for f in all_families())
    raise ModelFolderError(f"unknown model family {name!r}; known: {known}")


def family_of(model_type: str | None, where: Any = "") -> Family:
    """The family whose config says `model_type`; a ModelFolderError naming `where` otherwise."""
    for family in all_families():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in all_families() for t in f.model_types)
    raise ModelFolderError(f"{where}: model_type is {model_type!r}; vlm-inspect reads {known}")


def family_of_model(model: Any) -> Family:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return family_of(base.config.model_type, type(base).__name__)
