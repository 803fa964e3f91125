"""Qwen2.5-VL: dynamic resolution (one image token per 28 × 28 px), M-RoPE positions, ChatML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm_inspect.models.families.chatml import chatml_template, chatml_tokenizer
from vlm_inspect.models.families.common import save, tiny_text_config, without_video
from vlm_inspect.models.family import Family
from vlm_inspect.models.qwen_vision import window_plan

IMAGE_PARTS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
MIN_TOKENS = 4


def set_token_budget(processor: Any, tokens: int) -> None:
    """Bound the photo's resized area so it costs at most `tokens` image tokens (transformers' smart_resize):
    one token per (patch × merge)² pixels, 28 × 28 for Qwen2.5-VL, 32 × 32 for Qwen3-VL.

    `size` is what transformers 5 reads (per-call min_pixels/max_pixels are deprecated)."""
    image_processor = processor.image_processor
    pixels_per_token = (image_processor.patch_size * image_processor.merge_size) ** 2
    image_processor.size = {
        "shortest_edge": MIN_TOKENS * pixels_per_token,
        "longest_edge": tokens * pixels_per_token,
    }


def resized(processor: Any, width: int, height: int) -> tuple[float, float]:
    """The size transformers' smart_resize gives the photo under the processor's pixel bounds."""
    try:  # transformers ≥ 5.2x keeps a torchvision-free copy beside the torchvision processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    size = image_processor.size
    factor = image_processor.patch_size * image_processor.merge_size
    new_height, new_width = smart_resize(height, width, factor, size["shortest_edge"], size["longest_edge"])
    return float(new_width), float(new_height)


def build_tiny(out: str | Path, seed: int = 0, vision_patch: int = 14) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    )

    template = chatml_template("<|vision_start|><|image_pad|><|vision_end|>", "You are a helpful assistant.")
    tok = chatml_tokenizer(IMAGE_PARTS, template)
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=tiny_text_config(
            tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": vision_patch,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(patch_size=vision_patch, merge_size=2, temporal_patch_size=2)
    processor = without_video(Qwen2_5_VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=template
    )
    set_token_budget(processor, 64)
    return save(out, model, processor, tok)


def mrope_positions(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(3, batch, length) M-RoPE positions of a prompt batch, as `generate` computes them: text tokens one
    apart on all three axes, image tokens on their (t, h, w) grid; left padding at 0 (Qwen2.5-VL, Qwen3-VL)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    positions, _ = base.model.get_rope_index(inputs["input_ids"], **rest)
    return positions


FAMILY = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    vision="visual",
    projector="visual.merger",
    side_inputs=("mm_token_type_ids",),
    default_image_max_tokens=1280,
    apply_token_budget=set_token_budget,
    seen_size=resized,
    box_frame="resized",  # Qwen2.5-VL grounds in absolute pixels of its resized input
    # Measured on an H200, 7B shape, 1,280 image tokens (benchmarks/README.md, issue 27): score 8.5 → 20.0
    # images/s, describe 1.41 → 3.06/s at batch 1 (plain transformers → these fast paths).
    fast_paths=True,
    compile_training=True,  # measured: benchmarks/README.md, Qwen2.5-VL section (1.77× LoRA samples/s)
    vision_plan=window_plan,  # one packed attention call per layer: 78 → 39 ms per photo (17.6 compiled)
    prompt_positions=mrope_positions,
    build_tiny=build_tiny,
)
