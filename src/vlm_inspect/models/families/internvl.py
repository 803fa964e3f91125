"""InternVL3 / 3.5 in the `-hf` layout: 448 px tiles (256 tokens each) plus a thumbnail, ChatML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm_inspect.models.boxes import REF_BOXES
from vlm_inspect.models.families.chatml import chatml_template, chatml_tokenizer
from vlm_inspect.models.families.common import save, tiny_text_config, without_video
from vlm_inspect.models.family import Family

IMAGE_PARTS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def set_tile_budget(processor: Any, tokens: int) -> None:
    """Tiles so a photo costs at most `tokens` image tokens: each tile and the thumbnail cost
    `image_seq_length` (256 on the real checkpoints)."""
    processor.image_processor.max_patches = max(1, tokens // processor.image_seq_length - 1)


def tiled(processor: Any, width: int, height: int) -> tuple[float, float]:
    """The tile grid the processor picks for the photo's aspect ratio, in pixels (the thumbnail aside)."""
    try:  # transformers ≥ 5.2x keeps a torchvision-free copy beside the torchvision processor
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    image_processor = processor.image_processor
    tile = image_processor.size["height"]
    columns, rows = get_optimal_tiled_canvas(
        (height, width), (tile, tile), image_processor.min_patches, image_processor.max_patches
    )
    return float(columns * tile), float(rows * tile)


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
    )

    template = chatml_template("<IMG_CONTEXT>\n")
    tok = chatml_tokenizer(tuple(IMAGE_PARTS.values()), template, named=IMAGE_PARTS)
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [64, 64],
            "patch_size": [8, 8],
        },
        text_config=tiny_text_config(tok, model_type="qwen2"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True, max_patches=4)
    processor = without_video(InternVLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=template, image_seq_length=16
    )
    return save(out, model, processor, tok)


FAMILY = Family(
    name="internvl",
    model_types=("internvl",),
    vision="vision_tower",
    projector="multi_modal_projector",
    default_image_max_tokens=1280,
    apply_token_budget=set_tile_budget,
    seen_size=tiled,
    box_text=REF_BOXES,
    build_tiny=build_tiny,
)
