"""What the families' tiny models share: the tiny BPE tokenizer, the 2-layer language model, saving, and
the processor subclass without a video processor.

Real checkpoints bring their own tokenizer and template; these exist so tests and trials run offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Text the tokenizer is trained on: the words inspection prompts use, in English and Chinese, and how answers write
# defect boxes (Qwen's JSON, InternVL's <ref><box>).
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
Locate each defect with a bounding box. [{"bbox_2d": [120, 305, 480, 610], "label": "black spot"}] []
[{"bbox_2d": [15, 250, 640, 995], "label": "scratch"}, {"bbox_2d": [705, 0, 1000, 360], "label": "stain"}]
<ref>missing corner</ref><box>[[100, 200, 300, 400]]</box> <ref>dent</ref><box>[[0, 750, 250, 1000]]</box>
请用边框标出每个缺陷。
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


def build_tokenizer(
    vocab_size: int = 720,
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


def padded_vocab(tokenizer: Any) -> int:
    """The tokenizer's size grown to a multiple of 64, as the real checkpoints' embeddings are."""
    return -(-len(tokenizer) // 64) * 64


def tiny_text_config(tokenizer: Any, **changes: Any) -> dict:
    """The 2-layer, 64-wide language model every family's tiny model uses (plus the family's `changes`)."""
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": padded_vocab(tokenizer),
        "max_position_embeddings": 4096,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        **changes,
    }


def save(out: str | Path, model: Any, processor: Any, tokenizer: Any) -> Path:
    """Save a tiny model with generation defaults that end answers at the turn's end."""
    out = Path(out)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def without_video(cls: type) -> type:
    """`cls` without its video processor, under the same name (so a saved folder names the real class).

    The Qwen and InternVL processors require a video processor, which requires torchvision, whose PyPI
    wheel does not import beside the CPU torch build; inspection photos never need it."""
    attributes = [a for a in cls.get_attributes() if a != "video_processor"]
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda _: attributes)})
