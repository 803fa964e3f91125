"""A tiny LLaVA-1.5 built in code, saved in the llava-hf layout, for tests and the demo.

Same structure as `llava-hf/llava-1.5-7b-hf` (CLIP vision tower read at layer -2 with the
CLS token dropped, 2-layer GELU projector, Llama text model, `<image>` and `<pad>` added
after the vocabulary), only small. Plain `AutoProcessor.from_pretrained(folder)` and
`LlavaForConditionalGeneration.from_pretrained(folder)` load it.

Run as: vlm-inspect tiny-model OUT [--seed N]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlm_inspect.models.template import LLAVA_CHAT_TEMPLATE

# Text the tokenizer is trained on: the words inspection prompts use, in English and Chinese.
# Byte-level BPE still encodes any other text, one byte at a time.
_CORPUS = """
USER: ASSISTANT: Is this product OK or NG? Is the box OK or defective? Inspect the photo.
OK. The box has no visible defects. NG. There is a black spot near the top left corner of the box.
NG. There is a scratch in the center. A stain on the right. A dent at the bottom right corner.
A piece is missing at the top. Describe the defects. What is wrong with this product? Any defects?
top left, top, top right, left, center, right, bottom left, bottom, bottom right, near, corner, edge.
mark, spot, dark, stain, dent, scratch, missing, crack, hole, label, logo, white, surface, background.
A photo of a white box with a printed logo on a dark background, lit from the left, slightly rotated.
这个产品是OK还是NG？请检查图片中的盒子是否有缺陷。OK。盒子没有可见的缺陷。
NG。盒子左上角附近有一个黑点。请描述缺陷。右下角有划痕。中间有污渍。顶部缺了一块。
左上 上方 右上 左侧 中间 右侧 左下 下方 右下 角 边缘 黑点 划痕 污渍 凹陷 缺失 标签 白色 盒子
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def build_tokenizer(
    vocab_size: int = 600,
    specials: tuple[str, ...] = (IMAGE_TOKEN,),
    eos: str = "</s>",
    add_bos: bool = True,
    named: dict[str, str] | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus; `<s>` prepended like Llama's (unless `add_bos` is off).

    Other families' tiny models add their own special tokens (`specials`, in order, after `<pad>`), end turns
    with their own `eos`, and name tokens their processor looks up as attributes (`named`, e.g.
    `{"boi_token": "<start_of_image>"}`)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=4096,
        padding_side="left",
        **({"extra_special_tokens": named} if named else {}),
    )
    fast.add_special_tokens({"pad_token": PAD_TOKEN})
    fast.add_tokens(list(specials), special_tokens=True)
    if eos != "</s>":
        fast.eos_token = eos
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


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
    vocab = -(-len(tokenizer) // 64) * 64  # grown to a multiple of 64, as llava-hf does
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
