"""Qwen3-VL: dynamic resolution (one image token per 32 × 32 px), deepstack mergers, ChatML (no default system)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from vlm_inspect.models.families.chatml import chatml_template, chatml_tokenizer
from vlm_inspect.models.families.common import save, tiny_text_config, without_video
from vlm_inspect.models.families.qwen2_5_vl import FAMILY as QWEN2_5_VL
from vlm_inspect.models.families.qwen2_5_vl import IMAGE_PARTS, set_token_budget
from vlm_inspect.models.qwen_vision import interpolation_plan


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    template = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")
    tok = chatml_tokenizer(IMAGE_PARTS, template)
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=tiny_text_config(
            tok,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        ),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = without_video(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok, chat_template=template)
    set_token_budget(processor, 64)
    return save(out, model, processor, tok)


# Qwen2.5-VL's record (same module paths, side input, token budget, resize, M-RoPE prompt positions and fast
# paths) with its own name, box frame, tiny model and tower plan (no windows: one packed call per layer instead of one
# per image). Measured on an H200, Qwen3-VL-8B shape, 1,280 image tokens (benchmarks/README.md, issue 27):
# the fast paths score 14.3 → 17.4 images/s and describe 0.95 → 2.80/s at batch 1; the packed tower alone
# does not help this tower (eager forward of 32 photos 2.18 s packed, 2.04 s stock: its per-image calls are
# already 5,120 tokens long) and is kept because the measured rows ran with it. Compiled training stays off:
# LoRA at the 24 GB plan ran 2.45 samples/s eager and 1.52/s with compiled layers.
FAMILY = dataclasses.replace(
    QWEN2_5_VL,
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    box_frame="thousandths",  # Qwen3-VL grounds in 0–1000 of the image, where Qwen2.5-VL used resized pixels
    compile_training=False,
    vision_plan=interpolation_plan,
    build_tiny=build_tiny,
)
