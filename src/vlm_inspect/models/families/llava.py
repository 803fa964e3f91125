"""LLaVA-1.5 (llava-hf layout): a fixed 336 px square view (576 image tokens), `USER: <image>\n… ASSISTANT:`.

The family with the measured GPU fast paths (compiled layers, the CUDA-graph greedy decoder) and the
original-repo conversions (`vlm-inspect convert`). Its chat template renders the original training format
`USER: <image>\n{question} ASSISTANT: {answer}</s>USER: {next question} ASSISTANT:` (`conv_vicuna_v1`), so plain
`processor.apply_chat_template` gives the prompts LLaVA-1.5 was trained on. The tiny model below has the real
one's structure (CLIP vision tower read at layer -2 with the CLS token dropped, 2-layer GELU projector, Llama
text model, `<image>` and `<pad>` added after the vocabulary), only small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlm_inspect.models.families.common import IMAGE_TOKEN, build_tokenizer, padded_vocab
from vlm_inspect.models.family import Family

# Jinja chat template saved with every processor we write. It renders the same text as
# `render_prompt`, so plain `processor.apply_chat_template` gives our prompt.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% else %}{{ message['role'] | upper + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def original_layout(config: dict[str, Any]) -> str | None:
    """What to do with a folder in the original LLaVA repository's layout (liuhaotian/...), which
    `vlm-inspect convert` turns into the llava-hf one."""
    if "mm_vision_tower" in config or config.get("model_type") == "llava_llama":
        return (
            "this is the original LLaVA layout (liuhaotian/...); convert it first:\n"
            "  vlm-inspect convert --llava {folder} --vision-tower CLIP_DIR --out {folder}-hf"
        )
    return None


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 64,
    text_hidden: int = 96,
    text_layers: int = 2,
    output_std: float | None = None,
) -> LlavaForConditionalGeneration:
    """Random-weight LLaVA-1.5 of small size (the projector and towers shaped like the real one).

    `output_std` redraws the language model's output rows (the LM head) at that standard deviation; None
    leaves them at the config's initializer range (0.02)."""
    vocab = padded_vocab(tokenizer)
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if output_std is not None:
        torch.nn.init.normal_(model.lm_head.weight, std=output_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 64, patch_size: int = 8) -> LlavaProcessor:
    """CLIP image processing at the tiny size, with the LLaVA-1.5 chat template."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def save_tiny_model(out: str | Path, seed: int = 0, **options: Any) -> Path:
    """Build the tiny model (`options` as `build_tiny_model` takes them), its tokenizer and processor, and save
    all three to `out`."""
    out = Path(out)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **options)
    image_size = model.config.vision_config.image_size
    processor = build_processor(tokenizer, image_size, model.config.vision_config.patch_size)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    vision="vision_tower",
    projector="multi_modal_projector",
    chat_template=LLAVA_CHAT_TEMPLATE,
    square_pad=True,
    # One image per conversation in its training, a fixed 576-token view: references and photo are pasted into one
    # image (data/composite.py) rather than refused, so every verb works on it with a reference. The cost is
    # resolution: the photo gets 1/2 (side by side) to 2/3 (stacked) of the view's side, and a second image part of
    # 576 tokens was never in its training.
    reference_layout="composite",
    fast_paths=True,
    compile_training=True,
    foreign_layout=original_layout,
    build_tiny=save_tiny_model,
)
