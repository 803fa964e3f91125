"""What differs between model families, in one record per family; the rest of the code is family-blind.

Each family's record lives in `models/families/<name>.py` beside the recipe of its tiny test model; the list of
families and the look-ups by name and `model_type` are in `models/families/__init__.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from vlm_inspect.data.composite import Placement, composite, placement
from vlm_inspect.data.images import model_input_size, square_image
from vlm_inspect.errors import ModelFolderError
from vlm_inspect.models.boxes import JSON_BOXES, JsonBoxes, RefBoxes, View, make_view

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
    box_text: JsonBoxes | RefBoxes = JSON_BOXES
    """How its answers write defect boxes (models/boxes.py): Qwen's JSON (also LLaVA-1.5 and Gemma 3), or
    InternVL's `<ref>…</ref><box>[[…]]</box>`."""
    box_frame: Literal["resized", "thousandths"] = "thousandths"
    """The coordinates of those boxes: pixels of the image after the processor's resize (Qwen2.5-VL), or 0–1000
    of the image the model is given (Qwen3-VL, InternVL; LLaVA-1.5 and Gemma 3 by this project's convention)."""
    reference_layout: Literal["separate", "composite"] = "separate"
    """How known-good reference photos reach it beside the photo to inspect: `separate`, each its own image part of
    the one user turn, first, at the photo's resolution (the families whose checkpoints take several images per
    turn); `composite`, pasted with the photo into one image (`data.composite`), for a family trained on one image
    per conversation (LLaVA-1.5)."""
    fast_paths: bool = False
    """Whether the measured GPU fast paths for scoring and describing (compiled layers, CUDA-graph greedy
    decoder) are on for it."""
    compile_training: bool = False
    """Whether `train` compiles the decoder layers on a GPU by default (on where it was measured to help)."""
    foreign_layout: Callable[[dict], str | None] | None = None
    """Given a folder's config.json, what to do when it is this family in another repository's layout (a message
    with `{folder}` in it; LLaVA-1.5: the original repo's, which `convert` turns into llava-hf), else None."""
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
        """What a `width` × `height` model input becomes in the encoder's pixels."""
        return (self.seen_size or square_view)(processor, width, height)

    def view(
        self,
        processor: Any,
        photo: tuple[int, int],
        model_input: tuple[int, int],
        aspect: str = "pad",
        within: Placement | None = None,
    ) -> View:
        """How a photo reaches this family's encoder, and the frame its answers' boxes use (models/boxes.py).

        `model_input` is the size after the memory shrink (`data.images.model_input_size`) of what the processor
        is given: the photo, or the composite `within` describes; `aspect` is the run's image_aspect, read by the
        square families only."""
        square = aspect if self.square_pad else None
        side = max(model_input) if aspect == "pad" else min(model_input)
        canvas = (side, side) if square else model_input
        resized = self.seen(processor, *canvas) if self.box_frame == "resized" else None
        return make_view(photo, model_input, square, resized, within)

    def image_parts(self, references: int) -> int:
        """How many images one conversation's first turn holds for a photo judged against `references` photos."""
        return 1 if self.reference_layout == "composite" else references + 1

    def placed(self, photo: tuple[int, int], references: list[tuple[int, int]]) -> Placement | None:
        """Where the photo lies in the composite it is given in (composite families, with references), else None."""
        if self.reference_layout != "composite" or not references:
            return None
        return placement(photo, references)

    def view_with(
        self, processor: Any, photo: tuple[int, int], references: list[tuple[int, int]], aspect: str = "pad"
    ) -> View:
        """`view` of a photo judged against references of these sizes (a composite's photo part, where there is
        one)."""
        within = self.placed(photo, references)
        return self.view(processor, photo, model_input_size(*(within.size if within else photo)), aspect, within)

    def model_images(
        self, photo: Image.Image, references: list[Image.Image], mean: list[float], aspect: str
    ) -> list[Image.Image]:
        """The images the processor gets for one photo judged against `references`, in the order of the turn's
        image parts: the references then the photo, each shrunk and squared alike (`separate`), or their composite
        shrunk and squared once (`composite`)."""
        if self.reference_layout == "composite" and references:
            return [square_image(composite(references, photo)[0], mean, aspect)]
        return [square_image(image.convert("RGB"), mean, aspect) for image in [*references, photo]]

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
