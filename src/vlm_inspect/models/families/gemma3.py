"""Gemma 3: a fixed 896 px square view (256 image tokens), an image block attended both ways (token_type_ids)."""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_inspect.models.families.common import build_tokenizer, save, tiny_text_config
from vlm_inspect.models.family import Family

IMAGE_PARTS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    tok = build_tokenizer(
        specials=("<start_of_turn>", "<end_of_turn>", *IMAGE_PARTS.values()),
        eos="<end_of_turn>",
        add_bos=False,
        named=IMAGE_PARTS,
        chat_template=TEMPLATE,
    )
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=tiny_text_config(
            tok,
            head_dim=16,
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            bos_token_id=tok.bos_token_id,
            tie_word_embeddings=True,
        ),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
            "vision_use_head": False,
        },
        mm_tokens_per_image=16,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tok, chat_template=TEMPLATE, image_seq_length=16
    )
    return save(out, model, processor, tok)


FAMILY = Family(
    name="gemma3",
    model_types=("gemma3",),
    vision="vision_tower",
    projector="multi_modal_projector",
    side_inputs=("token_type_ids",),
    square_pad=True,
    build_tiny=build_tiny,
)
