"""Speed and memory of LoRA/QLoRA training and OK/NG inference on the LLaVA-1.5-7B shape (issue 10).

Builds LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 + 32-layer 4096-wide Llama, 32064 vocab) with random
bf16 weights straight on the GPU; samples are 576 image + 64 text tokens. In one run it measures:

- plain: what a transformers + PEFT user runs with the original LLaVA-1.5 LoRA recipe (r 128, alpha 256,
  dropout 0.05 on all LM linears, projector trained, gradient checkpointing, stock Trainer and
  AdamW; stock `model(...)` / `model.generate(...)` for inference);
- peer: the best stock setup (Liger kernels when the liger-kernel package is there, LoRA dropout 0,
  fused AdamW; `generate` with a static KV cache, which transformers compiles);
- ours: vlm-inspect's own code: `apply_lora` + `choose_batch_size` + `build_trainer` (InspectTrainer)
  on our dataset and collator, and `Predictor.score` / `Predictor.describe`.

Run on the GPU machine (the package need not be installed):
    PYTHONPATH=src python benchmarks/gpu.py --only train --out benchmarks/results/h100-train.json
    PYTHONPATH=src python benchmarks/gpu.py --only infer,qlora --out benchmarks/results/h100-infer.json
On CPU, `--tiny` runs every row on a small model of the same structure (numbers mean nothing) to check
the script before spending GPU time.

`--family qwen2_5_vl` measures Qwen2.5-VL-7B's shape instead (issue 18): random bf16 weights from a
`Qwen2_5_VLConfig` with the 7B sizes, the tiny ChatML tokenizer and the Qwen2.5-VL processor, 1120 × 896
photos at each `--image-tokens` budget (the product's `image_max_tokens`), ~64 supervised answer tokens. Rows
per budget: LoRA at the 24 GB plan (ours; plain and peer at the batch it chose), OK/NG score at batch 32,
describe 48 tokens at batch 1 and 8; then LoRA with compiled layers, then the peer describe rows (each
compiles generate for its batch size):
    PYTHONPATH=src python benchmarks/gpu.py --family qwen2_5_vl --image-tokens 1280,576 --out q.json

`--only ...,reference` (Qwen families, issue 26) adds, beside the single-photo rows of the same run, the rows with one
known-good reference photo before every photo (the product's default: the same size and budget, so twice the
image tokens): OK/NG score at batch 32 and LoRA at the 24 GB plan, ours, on a dataset written with a reference/
folder as `prepare` writes it. The Qwen2.5-VL-7B rows with and without a reference, in one run:
    PYTHONPATH=src python benchmarks/gpu.py --family qwen2_5_vl --only infer,train,reference --only-ours --out r.json
On CPU, add `--tiny --image-tokens 64` to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import gzip
import json
import platform
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from vlm_inspect.config import TrainConfig
from vlm_inspect.data.dataset import Collator, load_training_dataset
from vlm_inspect.data.images import square_image
from vlm_inspect.data.prompts import load_prompts
from vlm_inspect.data.reference import ReferencePhoto, read_reference_folder, write_reference_folder
from vlm_inspect.folders import RunFolder
from vlm_inspect.inference import Predictor
from vlm_inspect.models.chat import IMAGE, conversation
from vlm_inspect.models.chat import prompt as chat_prompt
from vlm_inspect.models.families import family_named, family_of_model
from vlm_inspect.models.families.common import build_tokenizer
from vlm_inspect.models.families.llava import build_processor
from vlm_inspect.models.family import LORA_TARGETS
from vlm_inspect.models.fast_paths import compile_slots, compiled_modules
from vlm_inspect.training import loop, memory
from vlm_inspect.training import model as training_model
from vlm_inspect.training.plan import Plan

SHAPES = {
    "7b": {
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
        "text": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    },
    "tiny": {
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
        "text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    },
}
# Qwen2.5-VL-7B's sizes (its config.json), and a tiny model of the same structure for --tiny.
QWEN_SHAPES = {
    "7b": {
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
            window_size=112,
        ),
        "text": dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        ),
    },
    "tiny": {
        "vision": dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            fullatt_block_indexes=[1],
            window_size=112,
        ),
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 1000000.0},
        ),
    },
}
# Qwen3-VL-8B's sizes (its config.json: 36 × 4096 LM, GQA 32/8, head 128; 27-block 1152-wide tower, 16 px
# patches, deepstack at 8/16/24), and a tiny model of the same structure.
QWEN3_SHAPES = {
    "7b": {
        "vision": dict(
            depth=27,
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            out_hidden_size=4096,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
            hidden_act="gelu_pytorch_tanh",
        ),
        "text": dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
                "rope_theta": 5000000.0,
            },
        ),
    },
    "tiny": {
        "vision": dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
            hidden_act="gelu_pytorch_tanh",
        ),
        "text": dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
                "rope_theta": 5000000.0,
            },
        ),
    },
}
QWEN_PHOTO = (1120, 896)  # 40 × 32 tokens of 28 px: 1,280 image tokens at the default budget
QWEN3_PHOTO = (1280, 1024)  # 40 × 32 tokens of 32 px: 1,280 image tokens at the default budget
QWEN3_PATCH = 16
QWEN_ANSWER_TOKENS = 64
IMAGE_SIZE, PATCH, VOCAB = 336, 14, 32064
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 576
TEXT_TOKENS = 64
QUESTION = "Is this product OK or NG?"
GIB = 2**30
# The targets, per row: (samples or images per second at least, peak GiB at most).
TARGETS = {
    "LoRA train, batch 8": (24.0, 22.0),
    "LoRA train, batch 16": (None, None),
    "LoRA train, no checkpointing, batch 8": (30.0, None),
    "QLoRA train, batch 1": (None, 7.0),
    "QLoRA train, batch 8": (14.0, 12.0),
    "OK/NG score, batch 32": (85.0, None),
    "describe 48 tokens, batch 8": (18.0, None),
    "describe 48 tokens, batch 1": (3.0, None),
}


@dataclass
class Row:
    work: str
    setup: str  # plain | peer | ours (| ours variant)
    batch: int
    rate: float | None = None  # samples/s (train) or images/s (inference)
    peak_gib: float | None = None
    mfu: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Bench:
    """The model, data and results of one run."""

    def __init__(
        self,
        tiny: bool,
        steps: int,
        warmup: int,
        work: Path,
        out: Path | None,
        deadline: float,
        family: str = "llava",
        image_tokens: int | None = None,
    ):
        self.tiny, self.steps, self.warmup, self.work, self.out = tiny, steps, warmup, work, out
        self.traces: Path | None = None  # folder for profiler timelines of one step per training row
        self.started, self.deadline = time.perf_counter(), deadline
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() and not tiny else torch.device("cpu")
        self.family = family_named(family)
        self.qwen3 = self.family.name == "qwen3_vl"
        self.qwen = self.family.name == "qwen2_5_vl" or self.qwen3  # a Qwen family (M-RoPE, dynamic resolution)
        shapes = QWEN3_SHAPES if self.qwen3 else QWEN_SHAPES if self.qwen else SHAPES
        self.shape = shapes["tiny" if tiny else "7b"]
        self.patch = QWEN3_PATCH if self.qwen3 else PATCH
        self.rows: list[Row] = []
        self.processor = (
            qwen_processor(self.qwen3) if self.qwen else build_processor(build_tokenizer(), IMAGE_SIZE, PATCH)
        )
        self.processor.tokenizer.padding_side = "left"  # as load_processor sets it
        self.tokenizer = self.processor.tokenizer
        tiny_vocab = -(-len(self.tokenizer) // 64) * 64  # the tiny Qwen's vocabulary, as its builder pads it
        self.vocab = self.shape["text"].get("vocab_size") or (tiny_vocab if self.qwen else VOCAB)
        self.photo_size = QWEN3_PHOTO if self.qwen3 else QWEN_PHOTO if self.qwen else (480, 360)
        self.image_tokens, self.text_tokens = IMAGE_TOKENS, TEXT_TOKENS
        self.set_image_tokens(image_tokens)
        self.data = write_dataset(work / "data", self.processor, n=48 if tiny else 128, size=self.photo_size)
        if self.qwen:
            self.text_tokens = answer_of_length(self.processor, None, QWEN_ANSWER_TOKENS)[1]
        self.images = [photo(i, self.photo_size) for i in range(64 if not tiny else 8)]
        self.peak_tflops = measure_matmul_tflops(self.device)
        self.model: Any = None
        self.only_ours = False  # skip the plain and peer rows
        self.p_ng: dict[str, list[float]] = {}  # our scores of the score rows' photos, per setup

    def set_image_tokens(self, budget: int | None) -> None:
        """Dynamic-resolution families: the processor's image-token budget (image_max_tokens), and what the
        benchmark photo then costs."""
        if self.family.set_resolution(self.processor, budget) is None:
            return
        width, height = self.photo_size
        counted = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        self.image_tokens = counted["num_image_tokens"][0]
        self._supervised = None

    def time_left(self) -> bool:
        """False once the run is past its deadline: later rows are skipped so the table still prints."""
        left = self.deadline - (time.perf_counter() - self.started)
        if left <= 0:
            print(f"[skip] past the {self.deadline:.0f} s deadline", flush=True)
        return left > 0

    def result(self) -> dict[str, Any]:
        return {
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor(),
            "versions": versions(),
            "shape": "tiny (CPU check only)" if self.tiny else f"{self.shape_name()}, random bf16 weights",
            "tokens_per_sample": {
                "image": self.image_tokens,
                "text": self.text_tokens,
                "supervised": supervised_tokens(self),
                "photo": list(self.photo_size),
            },
            "matmul_tflops_measured": self.peak_tflops,
            "seconds": round(time.perf_counter() - self.started, 1),
            "rows": [asdict(r) for r in self.rows],
        }

    def shape_name(self) -> str:
        return "Qwen3-VL-8B" if self.qwen3 else "Qwen2.5-VL-7B" if self.qwen else "LLaVA-1.5-7B"

    # ------------------------------------------------------------ model

    def config(self) -> Any:
        if self.qwen:
            return qwen_config(self.shape, self.tokenizer, self.vocab, self.qwen3)
        vision = CLIPVisionConfig(
            **self.shape["vision"], image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=768
        )
        text = LlamaConfig(
            **self.shape["text"],
            num_key_value_heads=self.shape["text"]["num_attention_heads"],
            vocab_size=VOCAB,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=self.tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_length=IMAGE_TOKENS,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        config.pad_token_id = self.tokenizer.pad_token_id
        return config

    def build_model(self) -> Any:
        """Random bf16 weights made on the device (no 14 GB file): std 0.02 like transformers' init."""
        torch.manual_seed(0)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if self.qwen3:
            from transformers import Qwen3VLForConditionalGeneration as model_class
        elif self.qwen:
            from transformers import Qwen2_5_VLForConditionalGeneration as model_class
        else:
            model_class = LlavaForConditionalGeneration
        with torch.device(self.device):
            model = model_class._from_config(self.config(), dtype=dtype)
        model.generation_config.eos_token_id = None  # random weights: always generate the full 48 tokens
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.config.use_cache = model.config.get_text_config().use_cache = False
        self.model = model.requires_grad_(False)
        return model

    def dataset(self, data: Path | None = None) -> Any:
        folder = data or self.data
        return load_training_dataset(folder, self.processor, self.family, max_length=8192, augment=True, seed=0)

    # ------------------------------------------------------------ flops

    def train_flops(self, supervised: float) -> float:
        """Model FLOPs of one LoRA training sample (recompute not counted): frozen linears run forward
        and input-gradient, LoRA adds its forward, input- and weight-gradient; vision runs forward only."""
        t, v = self.shape["text"], self.shape["vision"]
        h, ffn, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
        seq = self.image_tokens + self.text_tokens
        linear = 2 * seq * layers * (self.attention_weights() + 3 * h * ffn)
        attention = 2 * seq * seq * h * layers  # QK^T and AV, causal half
        lora = 2 * seq * layers * 128 * (4 * 2 * h + 2 * (h + ffn) + (ffn + h))
        head = 2 * supervised * h * self.vocab
        if self.qwen:  # the merger: 4 patches' features (4 × 1280) → 5120 → hidden (Qwen3: 3 more, deepstack)
            merged = 4 * v["hidden_size"]
            mergers = 1 + len(v.get("deepstack_visual_indexes", []))
            projector = 2 * self.image_tokens * mergers * (merged * merged + merged * h)
        else:
            projector = 2 * IMAGE_TOKENS * (v["hidden_size"] * h + h * h)
        return 2 * linear + 3 * attention + 3 * lora + 3 * head + self.vision_flops() + 3 * projector

    def attention_weights(self) -> int:
        """Weights of q, k, v and o in one language layer (k and v narrower with grouped-query attention)."""
        t = self.shape["text"]
        kv = t["hidden_size"] * t.get("num_key_value_heads", t["num_attention_heads"]) // t["num_attention_heads"]
        return 2 * t["hidden_size"] * (t["hidden_size"] + kv)

    def vision_flops(self) -> float:
        v = self.shape["vision"]
        if self.qwen3:  # 4 patches per image token; a 2-matmul MLP; full attention over the image in every layer
            patches, hidden = 4 * self.image_tokens, v["hidden_size"]
            per_layer = 2 * patches * (4 * hidden**2 + 2 * hidden * v["intermediate_size"])
            return v["depth"] * (per_layer + 4 * patches * patches * hidden)
        if self.qwen:  # 4 patches per image token; SwiGLU MLP; 8 × 8-patch windows but in the full layers
            patches, hidden = 4 * self.image_tokens, v["hidden_size"]
            per_layer = 2 * patches * (4 * hidden**2 + 3 * hidden * v["intermediate_size"])
            full = len(v["fullatt_block_indexes"])
            window = (v["window_size"] // PATCH) ** 2
            attention = 4 * patches * hidden * (full * patches + (v["depth"] - full) * window)
            return v["depth"] * per_layer + attention
        tokens = IMAGE_TOKENS + 1
        per_layer = 2 * tokens * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"])
        return v["num_hidden_layers"] * (per_layer + 2 * tokens * tokens * v["hidden_size"])

    def forward_flops(self, tokens: int, context: int) -> float:
        """One forward of `tokens` new tokens attending to `context` tokens, LM head on the last only."""
        t = self.shape["text"]
        h, ffn, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
        return (
            2 * tokens * layers * (self.attention_weights() + 3 * h * ffn)
            + 4 * tokens * context * h * layers
            + 2 * h * self.vocab
        )

    def mfu(self, flops_per_item: float, rate: float) -> float | None:
        return flops_per_item * rate / (self.peak_tflops * 1e12) if self.peak_tflops else None

    # ------------------------------------------------------------ rows

    def record(self, row: Row) -> Row:
        row.detail.setdefault("image_tokens", self.image_tokens)
        self.rows.append(row)
        if self.out:  # after every row: a run cut off at its time limit still leaves its rows
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps(self.result(), indent=1, default=str))
        rate = f"{row.rate:.2f}/s" if row.rate else "-"
        peak = f"{row.peak_gib:.1f} GiB" if row.peak_gib else "-"
        print(f"[row] {row.work} | {row.setup} | b{row.batch} | {rate} | {peak} | {row.error or ''}", flush=True)
        print(f"      {json.dumps(row.detail, default=str)}", flush=True)
        return row


# ------------------------------------------------------------------ data


def photo(index: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A product-like photo (box, sometimes a dark spot), different for every index; drawn at 480×360 and
    resized to `size`."""
    image = Image.new("RGB", (480, 360), (200 + index % 5 * 10, 205, 210 - index % 3 * 20))
    draw = ImageDraw.Draw(image)
    draw.rectangle((90 + index % 7, 60, 390, 300 - index % 11), fill=(245, 245, 240), outline=(60, 60, 60), width=4)
    if index % 2:
        x = 120 + (index * 37) % 220
        draw.ellipse((x, 120, x + 30, 150), fill=(20, 20, 20))
    return image if size == (480, 360) else image.resize(size, Image.BILINEAR)


def answer_of_length(processor: Any, text_tokens: int | None, answer_tokens: int | None = None) -> tuple[str, int]:
    """An answer whose conversation has exactly `text_tokens` text tokens besides the image placeholder
    (LLaVA), or whose supervised span has `answer_tokens` tokens (ChatML families); and the text count."""
    words = [
        "NG.",
        "There",
        "is",
        "a",
        "black",
        "spot",
        "near",
        "the",
        "top",
        "left",
        "corner",
        "of",
        "the",
        "box",
        "and",
        "a",
        "scratch",
        "in",
        "the",
        "center",
    ]
    for count in range(1, 200):
        base = " ".join(words[i % len(words)] for i in range(count))
        for tail in ("", ".", " a", " ok", " OK."):
            answer = base + tail
            conv = conversation(processor, [(f"{IMAGE}\n{QUESTION}", answer)])
            text = len(conv.ids) - 1  # the image placeholder is one token before the processor expands it
            start, stop = conv.spans[0]
            if text == text_tokens or stop - start == answer_tokens:
                return answer, text
    raise RuntimeError(f"no answer gives {text_tokens} text tokens")


def write_dataset(
    folder: Path, processor: Any, n: int, size: tuple[int, int] = (480, 360), reference: bool = False
) -> Path:
    """A prepare-style dataset folder: photos, train.json (LLaVA: 576 image + 64 text tokens each), manifest; with
    `reference`, a clean box in reference/ shown before every photo, the question saying so, as prepare writes it."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if processor.chat_template and "im_start" in processor.chat_template:
        answer, _ = answer_of_length(processor, None, QWEN_ANSWER_TOKENS)
    else:
        answer, _ = answer_of_length(processor, TEXT_TOKENS)
    question, shown, manifest = QUESTION, {}, {"language": "en", "product": "product"}
    if reference:
        question = load_prompts("en").reference_question(QUESTION, 1, "product")
        shown = {"reference": ["reference/ref_01.png"]}
        manifest["prompts"] = {"reference_intro": load_prompts("en").reference_intros("product")}
        clean = folder / "clean.png"
        photo(2 * n, size).save(clean)  # an even index: a box without a spot, none of the samples
        write_reference_folder(folder / "reference", [(clean, ReferencePhoto("ref_01.png", "clean.png", "-", *size))])
    samples = []
    for i in range(n):
        photo(i, size).save(folder / "images" / f"{i:03d}.png")
        first = f"{IMAGE}\n" * (2 if reference else 1) + question
        conversation = [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]
        samples.append({"id": f"s{i}", "image": f"images/{i:03d}.png", **shown, "conversations": conversation})
    (folder / "train.json").write_text(json.dumps(samples))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def qwen_processor(qwen3: bool = False) -> Any:
    """The Qwen2.5-VL (or Qwen3-VL) processor as `models/families/qwen*.py` build their tiny models': the tiny
    ChatML tokenizer, the image processor (torchvision's where it is installed, as AutoProcessor picks), no
    video."""
    import transformers
    from transformers import Qwen2VLImageProcessor

    from vlm_inspect.models.families.chatml import chatml_template, chatml_tokenizer
    from vlm_inspect.models.families.common import without_video
    from vlm_inspect.models.families.qwen2_5_vl import IMAGE_PARTS

    image = "<|vision_start|><|image_pad|><|vision_end|>"
    template = chatml_template(image) if qwen3 else chatml_template(image, "You are a helpful assistant.")
    tok = chatml_tokenizer(IMAGE_PARTS, template)
    patch = QWEN3_PATCH if qwen3 else PATCH
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor_class = transformers.Qwen3VLProcessor if qwen3 else transformers.Qwen2_5_VLProcessor
    try:
        return without_video(processor_class)(image_processor=image_processor, tokenizer=tok, chat_template=template)
    except (AttributeError, TypeError, ValueError):  # an older transformers: give it its video processor
        video_class = transformers.Qwen3VLVideoProcessor if qwen3 else transformers.Qwen2VLVideoProcessor
        return processor_class(image_processor, tok, video_processor=video_class(), chat_template=template)


def qwen_config(shape: dict[str, dict], tok: Any, vocab: int, qwen3: bool = False) -> Any:
    """A Qwen2_5_VLConfig (or Qwen3VLConfig) of `shape` whose special-token ids are the processor's (as the
    tiny builders')."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = tok.convert_tokens_to_ids
    text = {
        **shape["text"],
        "vocab_size": vocab,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "bos_token_id": None,
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": tok.pad_token_id,
        "tie_word_embeddings": False,
    }
    patch = QWEN3_PATCH if qwen3 else PATCH
    vision = {**shape["vision"], "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return (Qwen3VLConfig if qwen3 else Qwen2_5_VLConfig)(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


# ------------------------------------------------------------------ measuring


def measure_matmul_tflops(device: torch.device) -> float | None:
    """bf16 8192³ matrix product on random data, median of 20: the reachable ceiling MFU is taken against."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    return 2 * 8192**3 / statistics.median(times) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class StepTimes(TrainerCallback):
    """Wall time at the start and end of every optimizer step, the GPU drained at the end.

    With `trace`, the profiler records step `trace_step` and the Trainer's work between it and the step
    before (logging, fetching the batch); that step is left out of the rate.
    """

    def __init__(self, device: torch.device, trace: Path | None = None, trace_step: int = 0):
        self.device, self.times, self.begins = device, [], []
        self.trace, self.trace_step, self.profiler = trace, trace_step, None
        self.gc_ms: list[float] = []  # Python garbage collections during training: ms each (gen 2 only)
        gc.callbacks.append(self._gc)
        self._gc_started = 0.0

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_ms.append(round(1000 * (time.perf_counter() - self._gc_started), 1))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begins.append(time.perf_counter())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            write_trace(self.profiler, self.trace)
            self.profiler = None
        elif self.trace and state.global_step + 1 == self.trace_step:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def timed(self, warmup: int) -> slice:
        return slice(warmup, self.trace_step - 1 if self.trace else None)  # the traced step is not timed

    def rate(self, batch: int, warmup: int) -> float:
        """Samples/s at the median timed step: the rate once compiled, whatever step a late recompile (a new
        photo size from augmentation) lands in; the mean over the timed steps is in `split_ms`."""
        timed = self.times[self.timed(warmup)]
        return batch / statistics.median(b - a for a, b in zip(timed, timed[1:], strict=False))

    def compile_s(self, started: float, warmup: int) -> float:
        """Seconds the warm-up steps took beyond as many steady steps: compiling, first allocations."""
        timed = self.times[self.timed(warmup)]
        step = statistics.median(b - a for a, b in zip(timed, timed[1:], strict=False))
        return round(self.times[warmup - 1] - started - warmup * step, 1)

    def split_ms(self, warmup: int) -> dict[str, float]:
        """Median ms inside a step (begin to end) and between steps (end to the next begin)."""
        ends, begins = self.times[self.timed(warmup)], self.begins[self.timed(warmup)]
        inside = [e - b for b, e in zip(begins, ends, strict=False)]
        between = [b - e for e, b in zip(ends, begins[1:], strict=False)]
        stats = torch.cuda.memory_stats(self.device) if self.device.type == "cuda" else {}
        timed = self.times[self.timed(warmup)]
        return {
            "mean_rate_steps_per_s": round((len(timed) - 1) / (timed[-1] - timed[0]), 3),
            "in_step_ms": round(1000 * statistics.median(inside), 1),
            "between_steps_ms": round(1000 * statistics.median(between), 1) if between else None,
            "step_ms": [round(1000 * (b - a), 1) for a, b in zip(ends, ends[1:], strict=False)],
            "gen2_gc_ms": self.gc_ms,
            "alloc_retries": stats.get("num_alloc_retries"),
        }


def write_trace(prof: Any, path: Path) -> None:
    """The profiler's timeline as gzipped Chrome-trace JSON (open in Perfetto)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    path.write_bytes(gzip.compress(raw.read_bytes()))
    raw.unlink()


def release(bench: Bench, peft_model: Any, *objects: Any) -> None:
    """Take LoRA, checkpointing and compiled layers off the shared base model; free optimizer memory.

    The projector goes back to the base's own: PEFT's `unload` leaves the trained `modules_to_save` copy in
    its place, so later rows would run another model (issue 27's table run compared FP8 scores, taken after
    the LoRA rows, with bf16 scores taken before them: its `p_ng_vs_ours_bf16` is not a precision check)."""
    trained_copies = [
        (name.removeprefix("base_model.model."), module.original_module)
        for name, module in (peft_model.named_modules() if hasattr(peft_model, "unload") else [])
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save")
    ]
    base = peft_model.unload() if hasattr(peft_model, "unload") else peft_model
    for name, original in trained_copies:
        base.set_submodule(name, original)
    for module in base.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    base.requires_grad_(False)
    base.config.use_cache = base.config.get_text_config().use_cache = False
    bench.model = base
    for obj in objects:
        del obj
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
    torch._dynamo.reset()  # the next row's new LoRA modules would otherwise count towards the recompile limit


# ------------------------------------------------------------------ training rows


def stock_args(bench: Bench, out: Path, batch: int, checkpointing: bool, optim: str, liger: bool) -> TrainingArguments:
    on_gpu = bench.device.type == "cuda"
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=bench.warmup + bench.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        optim=optim,
        use_liger_kernel=liger,
        dataloader_num_workers=4 if on_gpu else 0,  # the original LLaVA scripts use 4
        disable_tqdm=True,
    )


def train_stock(bench: Bench, work: str, setup: str, batch: int, checkpointing: bool = True) -> Row:
    """transformers + PEFT as a user would write it: plain (LLaVA recipe) or peer (the tuned stock setup)."""
    from peft import LoraConfig, get_peft_model

    peer = setup.startswith("peer")
    liger = peer and has_liger() and bench.device.type == "cuda"
    lora = LoraConfig(
        r=128,
        lora_alpha=256,
        lora_dropout=0.0 if peer else 0.05,
        target_modules=LORA_TARGETS,
        modules_to_save=[bench.family.projector],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(bench.model, lora)
    args = stock_args(
        bench, bench.work / "stock", batch, checkpointing, "adamw_torch_fused" if peer else "adamw_torch", liger
    )
    timer = StepTimes(bench.device)
    trainer = Trainer(model=model, args=args, train_dataset=bench.dataset(), data_collator=collator(bench))
    trainer.add_callback(timer)
    row = Row(work, setup, batch, detail={"liger": liger, "checkpointing": checkpointing, "dropout": lora.lora_dropout})
    try:
        reset_peak(bench.device)
        with stock_tower(bench):  # the tower's attention as transformers runs it
            trainer.train()
        row.rate, row.peak_gib = timer.rate(batch, bench.warmup), peak_gib(bench.device)
        row.detail.update(timer.split_ms(bench.warmup))
        row.mfu = bench.mfu(bench.train_flops(supervised_tokens(bench)), row.rate)
    except Exception as err:  # a failed row is reported, the others still run
        row.error = f"{type(err).__name__}: {err}"[:400]
        traceback.print_exc()
    release(bench, model, trainer)
    return bench.record(row)


def train_ours(
    bench: Bench,
    work: str,
    setup: str,
    batch: int | None,
    budget_gib: float | None = None,
    **settings: Any,
) -> Row:
    """vlm-inspect's path: TrainConfig defaults, apply_lora, choose_batch_size, build_trainer.

    `undo` (a tuple of names) puts back stock behaviour the defaults changed, to measure what each bought:
    "gc" (the collector sees every object), "vision" (the vision tower checkpointed and back-propagated
    through, as transformers leaves it), "vision_compile" (the vision layers run eagerly), "bookkeeping"
    (the Trainer's FLOP count walking every module on each step, and its NaN filter reading the loss back).
    """
    forced_layers = settings.pop("checkpoint_layers", None)
    undo = settings.pop("undo", ())
    data = settings.pop("data", bench.data)  # a dataset with references (reference_rows)
    cfg = TrainConfig(model="(in memory)", data=str(data), out=str(bench.work / "run"), batch_size=batch, **settings)
    model = training_model.apply_lora(bench.model, cfg, family_of_model(bench.model))
    dataset = bench.dataset(data)
    real_budget = memory.gpu_memory_gib
    if (
        budget_gib is not None and bench.device.type == "cuda"
    ):  # pretend the card has only this much memory, and hold the allocator to it
        memory.gpu_memory_gib = lambda device: budget_gib
        total = torch.cuda.get_device_properties(bench.device).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction((budget_gib + 0.5) / total, bench.device)
    detail = {"settings": settings, "budget_gib": budget_gib, "checkpoint_layers": forced_layers}
    row = Row(work, setup, batch or 0, detail=detail)
    trainer = None
    try:
        chosen, checkpointing = memory.choose_batch_size(cfg, model, dataset, bench.device)
        if forced_layers is not None:  # a fixed share of layers, to calibrate the memory estimate
            seq = max(dataset.lengths)
            estimate = memory.estimate_memory_gib(model, chosen, seq, forced_layers)
            checkpointing = memory.Checkpointing(forced_layers, checkpointing.total, estimate)
        row.batch = chosen
        steps = bench.warmup + bench.steps + (1 if bench.traces else 0)  # the traced step comes after the timed ones
        plan = Plan(len(dataset), 1, chosen, 1, len(dataset) // chosen, steps, 1.0, 0, 10**9)
        trainer = loop.build_trainer(
            cfg, RunFolder(bench.work / "run"), model, dataset, collator(bench), plan, bench_dtype(bench), checkpointing
        )
        trainer.args.disable_tqdm = True
        undo_defaults(bench, trainer, model, undo)
        trace = bench.traces / f"trainer-{slug(work, setup)}.json.gz" if bench.traces else None
        timer = StepTimes(bench.device, trace if bench.device.type == "cuda" else None, steps)
        trainer.add_callback(timer)
        reset_peak(bench.device)
        started = time.perf_counter()
        trainer.train()
        row.rate, row.peak_gib = timer.rate(chosen, bench.warmup), peak_gib(bench.device)
        row.detail.update(timer.split_ms(bench.warmup))
        row.mfu = bench.mfu(bench.train_flops(supervised_tokens(bench)), row.rate)
        row.detail.update(
            checkpointing=str(checkpointing),
            estimate_gib=checkpointing.estimate_gib,
            compiled=loop.use_compile(cfg, bench.device, bench.family),
            seq_tokens_max=max(dataset.lengths),
            reference_tokens=max(tokens for _, tokens in dataset.image_tokens),
            first_steps_s=round(timer.times[bench.warmup - 1] - started, 1),
            compile_s=timer.compile_s(started, bench.warmup),
            losses=[round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r],
            workers=trainer.args.dataloader_num_workers,
        )
    except Exception as err:
        row.error = f"{type(err).__name__}: {err}"[:400]
        traceback.print_exc()
    memory.gpu_memory_gib = real_budget
    release(bench, model, trainer)
    return bench.record(row)


def undo_defaults(bench: Bench, trainer: Any, model: Any, undo: tuple[str, ...]) -> None:
    """Stock behaviour back for the named defaults (see `train_ours`)."""
    if "gc" in undo:
        trainer.remove_callback(loop.FreezeLongLivedObjects)
    if "vision" in undo:
        base = model.get_base_model()
        base.enable_input_require_grads()
        for module in bench.family.vision_tower(base).modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = True
    if "vision_compile" in undo:
        for parent, name in compile_slots(model)[: -len(memory.language_layers(model))]:
            getattr(parent, name)._compiled_call_impl = None  # what Module.compile set
    if "bookkeeping" in undo:
        trainer.floating_point_ops = lambda inputs: Trainer.floating_point_ops(trainer, inputs)
        trainer.args.logging_nan_inf_filter = True


def collator(bench: Bench) -> Collator:
    return Collator(bench.tokenizer.pad_token_id)


def bench_dtype(bench: Bench) -> torch.dtype:
    return torch.bfloat16 if bench.device.type == "cuda" else torch.float32


def supervised_tokens(bench: Bench) -> int:
    if getattr(bench, "_supervised", None) is None:
        bench._supervised = int((bench.dataset()[0]["labels"] != -100).sum())
    return bench._supervised


def has_liger() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def train_rows(bench: Bench, only_ours: bool = False, plan_only: bool = False) -> None:
    """The issue's training rows, most important first (rows past the deadline are skipped)."""
    card = 23.6 - 0.5  # a 24 GB card's memory less the CUDA context
    plain = (
        []
        if only_ours
        else [
            ("LoRA train, batch 8", "plain", 8, {}),
            ("LoRA train, no checkpointing, batch 8", "plain", 8, {"checkpointing": False}),
            ("LoRA train, batch 16", "plain", 16, {}),
        ]
    )
    ours = [
        ("LoRA train, batch 8", "ours (24 GB plan)", 8, {"budget_gib": card}),
        ("LoRA train, no checkpointing, batch 8", "ours", 8, {"gradient_checkpointing": False}),
        ("LoRA train, batch 16", "ours, full checkpointing", 16, {"gradient_checkpointing": True}),
        ("LoRA train, batch 8", "ours, full checkpointing", 8, {"gradient_checkpointing": True}),
        ("LoRA train, batch 1", "ours (24 GB plan)", 1, {"budget_gib": card}),
        ("LoRA train, batch 8", "ours, no compile (24 GB plan)", 8, {"budget_gib": card, "compile": False}),
        ("LoRA train, batch 8", "ours, dropout 0.05 (24 GB plan)", 8, {"budget_gib": card, "lora_dropout": 0.05}),
        ("LoRA train, batch 8", "ours, 16 of 32 layers checkpointed", 8, {"checkpoint_layers": 16}),
        ("LoRA train, batch 8", "ours, GC sees every object (24 GB plan)", 8, {"budget_gib": card, "undo": ("gc",)}),
        (
            "LoRA train, batch 8",
            "ours, vision tower back-propagated (24 GB plan)",
            8,
            {"budget_gib": card, "undo": ("vision",)},
        ),
        (
            "LoRA train, batch 8",
            "ours, stock Trainer bookkeeping (24 GB plan)",
            8,
            {"budget_gib": card, "undo": ("bookkeeping",)},
        ),
        (
            "LoRA train, no checkpointing, batch 8",
            "ours, vision layers eager",
            8,
            {"gradient_checkpointing": False, "undo": ("vision_compile",)},
        ),
        (
            "LoRA train, batch 8",
            "ours, before this session's step fixes (24 GB plan)",
            8,
            {"budget_gib": card, "undo": ("gc", "vision", "bookkeeping")},
        ),
    ]
    if plan_only:
        plain, ours = [], [row for row in ours if is_main_ours(Row(*row[:3]))]
    # Liger patches transformers' classes for good: the peer rows run last.
    peer = (
        []
        if only_ours or plan_only
        else [("LoRA train, batch 8", "peer", 8, {}), ("LoRA train, batch 16", "peer", 16, {})]
    )
    bench.build_model()
    for work, setup, batch, settings in plain[:2] + ours[:2] + plain[2:] + ours[2:] + peer:
        if not bench.time_left():
            return
        if setup.startswith(("plain", "peer")):
            train_stock(bench, work, setup, batch, **settings)
        else:
            train_ours(bench, work, setup, batch, **settings)


def family_rows(bench: Bench, budgets: list[int], sections: set[str], only_ours: bool = False) -> None:
    """A Qwen family's rows at the first image-token budget (issue 27), in one run, most important first
    (rows past `--deadline` are skipped): `parity` (the tower's packed attention against stock), `infer`'s
    score at batch 32 (plain, ours), `train` (LoRA at the 24 GB plan: ours, then plain and peer at the
    batch ours chose), `fp8`'s score (the language model's linears in FP8), `infer`'s describe 48 tokens
    at batch 1 (plain, ours), `fp8`'s LoRA, and last the describe peer, whose static-cache `generate`
    compiles. FP8 rows convert the bench model in place and put the bf16 linears back after."""
    card = 23.6 - 0.5  # a 24 GB card's memory less the CUDA context
    bench.set_image_tokens(budgets[0])
    tag = f", {bench.image_tokens} image tokens"
    fp8 = bool(sections & {"fp8", "numerics", "compiled"}) and fp8_ready(bench)
    bench.build_model()
    if "parity" in sections and bench.time_left():
        parity_rows(bench)
    if "infer" in sections and bench.time_left():
        infer_rows(bench, tag, describe=(), batches=())
    if "train" in sections and bench.time_left():
        ours = train_ours(bench, f"LoRA train{tag}", "ours (24 GB plan)", None, budget_gib=card)
        for setup in () if only_ours else ("plain", "peer"):
            if bench.time_left():
                train_stock(bench, f"LoRA train{tag}", setup, ours.batch or 1)
    if fp8 and "fp8" in sections and "infer" in sections and bench.time_left():
        with fp8_base(bench):
            infer_rows(bench, tag, describe=(), batches=(), ours="ours fp8")
    if "infer" in sections and bench.time_left():
        infer_rows(bench, tag, score=False, describe=("plain", "ours"), batches=(1,))
    if fp8 and "fp8" in sections and "train" in sections and bench.time_left():
        with fp8_base(bench):
            train_ours(bench, f"LoRA train{tag}", "ours fp8 (24 GB plan)", None, budget_gib=card)
    if "infer" in sections and not only_ours and bench.time_left():
        infer_rows(bench, tag, score=False, describe=("peer",), batches=(1,))
    if "reference" in sections and bench.time_left():
        score, train = "infer" in sections or "train" not in sections, "train" in sections or "infer" not in sections
        reference_rows(bench, tag, card, score, train)
    if "numerics" in sections and fp8 and bench.time_left():
        fp8_numerics_rows(bench)
    for precision in ("bf16", "fp8") if "compiled" in sections else ():  # training compiled, where it is off
        if bench.time_left() and (precision == "bf16" or fp8):
            setup = f"ours{' fp8' if precision == 'fp8' else ''}, compiled layers (24 GB plan)"
            with fp8_base(bench) if precision == "fp8" else contextlib.nullcontext():
                train_ours(bench, f"LoRA train{tag}", setup, None, budget_gib=card, compile=True)


def reference_rows(bench: Bench, tag: str, card: float, score: bool = True, train: bool = True) -> None:
    """Issue 26: our OK/NG score at batch 32 and LoRA at the 24 GB plan with one known-good reference photo before
    every photo (another photo of the same size, at the same image-token budget), beside the rows without it."""
    data = write_dataset(
        bench.work / "data-reference", bench.processor, 48 if bench.tiny else 128, bench.photo_size, True
    )
    reference = read_reference_folder(data / "reference")
    if score and bench.time_left():
        model = bench.model.eval()
        predictor = Predictor(model, bench.processor, "random 7B", has_adapter=False, reference=reference)
        batch = 32 if not bench.tiny else 4
        group = bench.images[:batch]
        row = Row(f"OK/NG score, batch 32{tag} + 1 reference", "ours", batch)
        try:
            fn = lambda: predictor.score(group, QUESTION, batch_size=batch)  # noqa: E731
            started = time.perf_counter()
            fn()
            first = time.perf_counter() - started
            reset_peak(bench.device)
            seconds = timed(bench.device, fn, 3)
            row.rate, row.peak_gib = batch / seconds, peak_gib(bench.device)
            prompt_tokens = predictor._inputs(group[:1], [predictor.prompt(QUESTION)])["input_ids"].shape[1]
            row.detail.update(compile_s=round(first - seconds, 1), prompt_tokens=prompt_tokens)
            row.detail["reference_tokens"] = bench.image_tokens
        except Exception as err:
            row.error = f"{type(err).__name__}: {err}"[:400]
            traceback.print_exc()
        bench.record(row)
    if train and bench.time_left():
        train_ours(bench, f"LoRA train{tag} + 1 reference", "ours (24 GB plan)", None, budget_gib=card, data=data)


def fp8_numerics_rows(bench: Bench) -> None:
    """Next-token logits of 8 score photos with the language model's linears in FP8 against bf16 (same
    weights, ours' eager forward): relative error, top-1 agreement, p(NG), and the relative error of the
    last position's hidden state after each layer; beside it the weights rounded to FP8 with bf16
    activations (the weight error alone), and the bf16 noise floor (the tower stock instead of packed)."""
    from vlm_inspect.models.fast_paths import swapped_modules
    from vlm_inspect.models.fp8 import Fp8Linear

    model = bench.model.eval()
    predictor = Predictor(model, bench.processor, "random 7B", has_adapter=False)
    inputs = predictor._inputs(bench.images[:8], [chat_prompt(bench.processor, QUESTION)] * 8)
    ok_ids, ng_ids = predictor.verdict_ids

    def forward() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.inference_mode():
            out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
        return out.logits[:, -1].float(), [h[:, -1].float() for h in out.hidden_states]

    def compare(found: tuple[torch.Tensor, list[torch.Tensor]]) -> dict[str, Any]:
        (logits, hidden), (ref, ref_hidden) = found, reference
        p, q = logits.softmax(-1), ref.softmax(-1)
        p_ng = p[:, ng_ids].sum(-1) / (p[:, ok_ids].sum(-1) + p[:, ng_ids].sum(-1))
        q_ng = q[:, ng_ids].sum(-1) / (q[:, ok_ids].sum(-1) + q[:, ng_ids].sum(-1))
        return {
            "logits_rel_err": round(relative(logits, ref), 4),
            "top1_agree": float((logits.argmax(-1) == ref.argmax(-1)).float().mean()),
            "p_ng_max_diff": round(float((p_ng - q_ng).abs().max()), 4),
            "ng_minus_ok_logit_bf16": [round(float(x), 3) for x in (ref[:, ng_ids[0]] - ref[:, ok_ids[0]])],
            "hidden_rel_err_by_layer": [round(relative(a, b), 4) for a, b in zip(hidden, ref_hidden, strict=True)],
        }

    row = Row("FP8 numerics, 8 score photos", "ours fp8 vs ours bf16", 8)
    reference = forward()
    with stock_tower(bench):
        row.detail["bf16, tower stock (noise floor)"] = compare(forward())
    with fp8_base(bench):
        row.detail["fp8"] = compare(forward())
        rounded = []
        for parent, name, child in [(p, n, c) for p in model.modules() for n, c in p.named_children()]:
            if isinstance(child, Fp8Linear):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight = torch.nn.Parameter(child.dequantized(), requires_grad=False)
                linear.bias = child.bias
                rounded.append((parent, name, linear))
        with swapped_modules(rounded):
            row.detail["fp8 weights, bf16 activations"] = compare(forward())
        del rounded
    bench.record(row)


@contextlib.contextmanager
def fp8_base(bench: Bench) -> Any:
    """Inside, the bench model's language-model linears are FP8 (`to_fp8`); the bf16 ones wait on the CPU
    (out of the 24 GB plan's allocator cap) and come back after."""
    from vlm_inspect.models.fp8 import decoder_linears, to_fp8

    slots = decoder_linears(bench.model)
    originals = [getattr(parent, name) for parent, name in slots]
    print(f"[fp8] {to_fp8(bench.model)} language-model linears in FP8", flush=True)
    for module in originals:
        module.to("cpu")
    gc.collect()
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for (parent, name), module in zip(slots, originals, strict=True):
            setattr(parent, name, module.to(bench.device))
        gc.collect()
        torch.cuda.empty_cache()
        torch.compiler.reset()


def fp8_ready(bench: Bench) -> bool:
    from vlm_inspect.models.fp8 import fp8_supported

    ok, reason = fp8_supported(bench.device)
    if not ok:
        print(f"[skip] fp8 rows: {reason}", flush=True)
    return ok


@contextlib.contextmanager
def stock_tower(bench: Bench) -> Any:
    """Inside, the vision tower runs as stock transformers runs it (plain and peer rows)."""
    from vlm_inspect.models.qwen_vision import stock_vision_attention

    if bench.model is None or bench.family.vision_plan is None:
        yield
        return
    with stock_vision_attention(bench.family.vision_tower(bench.model)):
        yield


def parity_rows(bench: Bench) -> None:
    """The vision tower alone on the bench model's weights: stock sdpa (the per-window / per-image loop),
    stock eager (the bf16 noise floor between two stock backends) and ours (one packed call per layer,
    eager and with its blocks compiled as scoring runs them), on photos of several sizes one at a time and as
    one mixed batch, then batch 32: relative error of the tower's output and its merged features against
    stock sdpa, ms per image. Then p(NG) of a batch of 8 photos scored at once against one by one (ours)."""
    from vlm_inspect.models.fast_paths import compile_slots, pack_vision
    from vlm_inspect.models.qwen_vision import stock_vision_attention

    model = bench.model
    tower = bench.family.vision_tower(model)
    config = tower.config
    merge = config.spatial_merge_size * bench.patch
    sizes = [(1120, 896), (640, 480), (896, 1344), (420, 308)] if not bench.tiny else [(112, 84), (168, 112)]
    grids = [[1, round(h / merge) * 2, round(w / merge) * 2] for w, h in sizes]
    cases = [[g] for g in grids] + [grids] + [[grids[0]] * (32 if not bench.tiny else 4)]
    names = [f"{w}x{h}" for w, h in sizes] + ["mixed batch", f"batch {len(cases[-1])} of {sizes[0][0]}x{sizes[0][1]}"]
    width = config.in_channels * config.temporal_patch_size * bench.patch**2
    row = Row("vision tower parity and speed", "ours vs stock", 0, detail={"cases": {}})
    pack_vision(model)
    compiled: dict[int, Any] = {}
    attention = type(tower.blocks[0].attn)
    for name, case in zip(names, cases, strict=True):
        if not bench.time_left():
            break
        torch.manual_seed(0)
        pixels = torch.randn(sum(t * h * w for t, h, w in case), width, device=bench.device, dtype=bench_dtype(bench))
        grid = torch.tensor(case, device=bench.device)

        def run(pixels: torch.Tensor = pixels, grid: torch.Tensor = grid) -> list[torch.Tensor]:
            with torch.inference_mode():
                out = tower(pixels, grid_thw=grid)
            return [out.last_hidden_state.float(), out.pooler_output.float()]

        found: dict[str, Any] = {}
        speed = case is cases[-1]  # times at batch 32 only; the others check the numbers
        with stock_vision_attention(tower):
            found["stock sdpa"] = run()
            if speed:
                found["stock sdpa ms"] = timed(bench.device, run, 1) * 1000 / len(case)
            if name == "mixed batch":
                config._attn_implementation = "eager"
                found["stock eager"] = run()
                config._attn_implementation = "sdpa"
        found["ours"] = run()
        if speed:
            found["ours ms"] = timed(bench.device, run, 3) * 1000 / len(case)
        if speed and bench.device.type == "cuda":  # its blocks compiled, as scoring runs them
            with compiled_modules([s for s in compile_slots(model) if s[0] is tower.blocks], compiled):
                started = time.perf_counter()
                run()
                found["ours compiled first call s"] = time.perf_counter() - started
                found["ours compiled"] = run()
                found["ours compiled ms"] = timed(bench.device, run, 3) * 1000 / len(case)
        ref = found["stock sdpa"]
        entry = {"patches": int(pixels.shape[0]), "grids": case if len(case) <= 5 else f"{len(case)} × {case[0]}"}
        for variant in ("stock eager", "ours", "ours compiled"):
            if variant in found:
                entry[f"rel_err_{variant}"] = [
                    round(relative(a, b), 5) for a, b in zip(found[variant], ref, strict=True)
                ]
        entry.update({k.replace(" ", "_"): round(v, 2) for k, v in found.items() if isinstance(v, float)})
        row.detail["cases"][name] = entry
        print(f"[parity] {name}: {entry}", flush=True)
    row.detail["attention_class"] = attention.__name__
    predictor = Predictor(model, bench.processor, "random 7B", has_adapter=False)
    eight = bench.images[:8]
    ok_ids, ng_ids = predictor.verdict_ids

    def p_ng(images: list[Image.Image]) -> list[float]:  # ours' forward, eager (no compile for batch 1 here)
        with torch.inference_mode():
            logits = (
                model(
                    **predictor._inputs(images, [chat_prompt(bench.processor, QUESTION)] * len(images)),
                    logits_to_keep=1,
                )
                .logits[:, -1]
                .float()
            )
        probs = logits.softmax(-1)
        return (probs[:, ng_ids].sum(-1) / (probs[:, ok_ids].sum(-1) + probs[:, ng_ids].sum(-1))).tolist()

    at_once = p_ng(eight)
    one_by_one = [p_ng([image])[0] for image in eight]
    row.detail["p_ng_batch8_vs_one_by_one_max_diff"] = max(abs(a - b) for a, b in zip(at_once, one_by_one, strict=True))
    bench.record(row)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def family_table(bench: Bench) -> str:
    """Markdown: per work, plain / peer / ours bf16 / ours FP8 with MFU beside each rate, and ours' ratios."""
    lines = [
        "| work | plain | peer | ours bf16 | ours FP8 | bf16 / plain | bf16 / peer | FP8 / plain | FP8 / peer |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: Row | None) -> str:
        if row is None:
            return "—"
        if row.error or not row.rate:
            return "failed"
        mfu = f", MFU {100 * row.mfu:.0f}%" if row.mfu else ""
        peak = f", {row.peak_gib:.1f} GiB" if row.peak_gib else ""
        return f"{row.rate:.2f}/s{mfu}{peak}"

    def ratio(a: Row | None, b: Row | None) -> str:
        return f"{a.rate / b.rate:.2f}×" if a and b and a.rate and b.rate else "—"

    for work in dict.fromkeys(r.work for r in bench.rows if r.rate is not None or r.error):
        found = [r for r in bench.rows if r.work == work]
        plain = next((r for r in found if r.setup == "plain"), None)
        peer = next((r for r in found if r.setup.startswith("peer")), None)
        ours = next((r for r in found if r.setup.startswith("ours") and "fp8" not in r.setup), None)
        fp8 = next((r for r in found if r.setup.startswith("ours fp8")), None)
        lines.append(
            f"| {work} | {cell(plain)} | {cell(peer)} | {cell(ours)} | {cell(fp8)} | {ratio(ours, plain)} | "
            f"{ratio(ours, peer)} | {ratio(fp8, plain)} | {ratio(fp8, peer)} |"
        )
    return "\n".join(lines)


def probe_rows(bench: Bench) -> None:
    """Where a training step's time goes: the data pipeline alone, our step without the Trainer loop, and
    a profile of that step (top kernels, GPU-busy share)."""
    from torch.profiler import ProfilerActivity, profile

    bench.build_model() if bench.model is None else None
    for batch, ckpt in ((8, False), (8, True)):
        cfg = TrainConfig(model="-", data=str(bench.data), out=str(bench.work / "probe"), batch_size=batch)
        model = training_model.apply_lora(bench.model, cfg, family_of_model(bench.model))
        dataset = bench.dataset()
        total = len(memory.language_layers(model))
        checkpointing = memory.Checkpointing(total if ckpt else 0, total)
        plan = Plan(len(dataset), 1, batch, 1, len(dataset) // batch, 100, 1.0, 0, 10**9)
        trainer = loop.build_trainer(
            cfg,
            RunFolder(bench.work / "probe"),
            model,
            dataset,
            collator(bench),
            plan,
            bench_dtype(bench),
            checkpointing,
        )
        row = Row(f"probe, batch {batch}", f"ours, checkpointing {'on' if ckpt else 'off'}", batch)
        loader = trainer.get_train_dataloader()
        started, batches = time.perf_counter(), []
        for index, item in enumerate(loader):
            batches.append(item)
            if index == 15:
                break
        row.detail["data_samples_per_s"] = round(16 * batch / (time.perf_counter() - started), 1)
        inputs = {k: v.to(bench.device) for k, v in batches[0].items()}
        count = (inputs["labels"][:, 1:] != -100).sum()
        trainer.create_optimizer()

        def step(trainer: Any = trainer, model: Any = model, inputs: Any = inputs, count: Any = count) -> None:
            with torch.autocast(bench.device.type, dtype=torch.bfloat16):
                loss = trainer.compute_loss(model, dict(inputs), num_items_in_batch=count)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)

        model.train()
        for _ in range(3):
            step()
        reset_peak(bench.device)
        seconds = timed(bench.device, step, 6)
        row.rate, row.peak_gib = batch / seconds, peak_gib(bench.device)
        row.mfu = bench.mfu(bench.train_flops(supervised_tokens(bench)), row.rate)
        if bench.device.type == "cuda":
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                step()
                sync(bench.device)
            events = prof.key_averages()
            row.detail["gpu_ms_by_kind"] = kernel_time_by_kind(events)
            row.detail["gpu_busy_ms"] = round(sum(row.detail["gpu_ms_by_kind"].values()), 1)
            row.detail["step_ms"] = round(1000 * seconds, 1)
            row.detail["matmul_ms_by_rank"] = matmul_time_by_rank(prof.key_averages(group_by_input_shape=True))
            print(row.detail, flush=True)
            print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
            if bench.traces:
                write_trace(prof, bench.traces / f"probe-{slug(row.work, row.setup)}.json.gz")
        release(bench, model, trainer)
        bench.record(row)


def slug(*words: str) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in w.lower()) for w in words).replace("--", "-")


def kernel_time_by_kind(events: Any) -> dict[str, float]:
    """GPU milliseconds of one profiled step per kernel kind (matched on the kernel name).

    Annotations on the GPU timeline ("## Call CompiledFxGraph ...", "Optimizer.step#AdamW.step") span
    kernels counted already: names with "#" are skipped (no kernel name has one)."""
    kinds = {
        "matmul": ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas"),
        "attention": ("flash", "fmha", "attention"),
        "optimizer": ("adam", "multi_tensor"),
        "triton (fused)": ("triton",),
        "copy/cast": ("copy", "memcpy", "memset", "cast", "fill"),
    }
    out: dict[str, float] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA or not e.self_device_time_total or "#" in e.key:
            continue
        name = e.key.lower()
        kind = next((k for k, words in kinds.items() if any(w in name for w in words)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total / 1000
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def matmul_time_by_rank(events: Any) -> dict[str, float]:
    """GPU milliseconds of aten matmuls split by whether one side is LoRA-rank-sized (<= 256): LoRA's
    skinny matmuls against the frozen weights' big ones."""
    out = {"big": 0.0, "lora (a dim <= 256)": 0.0}
    for e in events:
        if e.key not in ("aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_mm") or not e.device_time_total:
            continue
        dims = [d for shape in e.input_shapes if isinstance(shape, list) for d in shape]
        key = "lora (a dim <= 256)" if dims and min(dims) <= 256 else "big"
        out[key] += e.device_time_total / 1000
    return {k: round(v, 1) for k, v in out.items()}


# ------------------------------------------------------------------ inference rows


def timed(device: torch.device, fn: Any, repeats: int) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def stock_inputs(bench: Bench, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The processor call a transformers user makes, on LLaVA-1.5's square-padded photos (as ours)."""
    prompt = chat_prompt(bench.processor, QUESTION)
    mean = bench.processor.image_processor.image_mean
    squared = [square_image(image, mean, "pad" if bench.family.square_pad else "native") for image in images]
    inputs = bench.processor(images=squared, text=[prompt] * len(images), return_tensors="pt", padding=True)
    return {
        k: v.to(bench.device, bench_dtype(bench)) if k == "pixel_values" else v.to(bench.device)
        for k, v in inputs.items()
    }


class VariantPredictor(Predictor):
    """Our predictor with one of describe's levers undone, to measure what it buys in the same run."""

    def __init__(self, base: Predictor, stacked: bool = True, whole_prefill: bool = True):
        super().__init__(base.model, base.processor, base.name, has_adapter=False)
        self._compiled = base._compiled  # compiled wrappers are shared, so nothing is compiled twice
        self.stacked, self.whole_prefill = stacked, whole_prefill

    def _decoder(self, shape: torch.Size, max_new_tokens: int) -> Any:
        decoder = super()._decoder(shape, max_new_tokens)  # changed before its first run records the graph
        if not self.stacked:
            decoder.stacked = []
        if not self.whole_prefill:  # the vision layers, and each language layer's MLP and norms (the old way)
            language = self.model.model.language_model.layers
            vision = [slot for slot in compile_slots(self.model) if slot[0] is not language]
            parts = ("input_layernorm", "mlp", "post_attention_layernorm")
            decoder.prefill_slots = vision + [(layer, part) for layer in language for part in parts]
        return decoder


def score_pair(
    bench: Bench, model: Any, predictor: Predictor, score_flops: float, tag: str, ours: str = "ours"
) -> None:
    """OK/NG score at batch 32: stock `model(...)` and `Predictor.score`, and where ours' time goes."""
    images = bench.images
    batch = 32 if not bench.tiny else 4
    group = images[:batch]

    @torch.inference_mode()
    def plain_score() -> torch.Tensor:
        with stock_tower(bench):
            return model(**stock_inputs(bench, group)).logits[:, -1].float().softmax(-1)

    rows = [("plain", plain_score), (ours, lambda: predictor.score(group, QUESTION, batch_size=batch))]
    if ours != "ours" or bench.only_ours:  # the FP8 rows: plain ran in bf16 already
        rows = rows[1:]
    for setup, fn in rows:
        row = Row(f"OK/NG score, batch 32{tag}", setup, batch)
        try:
            started = time.perf_counter()
            fn()
            first = time.perf_counter() - started
            reset_peak(bench.device)
            seconds = timed(bench.device, fn, 3)
            row.rate, row.peak_gib = batch / seconds, peak_gib(bench.device)
            row.mfu = bench.mfu(score_flops, row.rate)
            row.detail["compile_s"] = round(first - seconds, 1)  # the first call beyond a steady one
        except Exception as err:
            row.error = f"{type(err).__name__}: {err}"[:400]
            traceback.print_exc()
        bench.record(row)
    with contextlib.suppress(Exception):
        plain = plain_score()
        ok_ids, ng_ids = predictor.verdict_ids
        p_plain = (plain[:, ng_ids].sum(-1) / (plain[:, ok_ids].sum(-1) + plain[:, ng_ids].sum(-1))).tolist()
        p_ours = predictor.score(group, QUESTION, batch_size=batch)
        bench.rows[-1].detail["max_p_ng_difference_vs_plain"] = max(
            abs(a - b) for a, b in zip(p_plain, p_ours, strict=True)
        )
        bench.p_ng[ours] = p_ours
        if ours != "ours" and "ours" in bench.p_ng:  # FP8 against our bf16 scores of the same photos
            diffs = [abs(a - b) for a, b in zip(bench.p_ng["ours"], p_ours, strict=True)]
            bench.rows[-1].detail["p_ng_vs_ours_bf16"] = {
                "max": max(diffs),
                "mean": sum(diffs) / len(diffs),
                "verdicts_agree": sum(
                    (a >= 0.5) == (b >= 0.5) for a, b in zip(bench.p_ng["ours"], p_ours, strict=True)
                ),
                "of": len(diffs),
            }
    with contextlib.suppress(Exception):
        prompts = [chat_prompt(bench.processor, QUESTION)] * batch
        ours_inputs = timed(bench.device, lambda: predictor._inputs(group, prompts), 3)
        plain_inputs = timed(bench.device, lambda: stock_inputs(bench, group), 3)
        inputs = predictor._inputs(group, prompts)
        with torch.inference_mode():
            forward = timed(bench.device, lambda: model(**inputs, logits_to_keep=1), 3)
            if bench.qwen:  # the same eager forward with the tower stock: what the packed tower buys alone
                with stock_tower(bench):
                    forward_stock = timed(bench.device, lambda: model(**inputs, logits_to_keep=1), 2)
                bench.rows[-1].detail["forward_s_eager_tower_stock"] = round(forward_stock, 4)
        bench.rows[-1].detail.update(
            inputs_s_ours=round(ours_inputs, 4), inputs_s_plain_cpu=round(plain_inputs, 4), forward_s=round(forward, 4)
        )


def infer_rows(
    bench: Bench,
    tag: str = "",
    score: bool = True,
    describe: tuple[str, ...] | None = None,
    batches: tuple[int, ...] = (8, 1),
    ours: str = "ours",
) -> Predictor:
    """OK/NG score at batch 32 (plain, ours) when `score`, then describe 48 tokens at `batches` with the
    setups whose names start with one of `describe` (all when None). `tag` ends each work's name; `ours`
    names our rows (e.g. "ours fp8")."""
    model = bench.model if bench.model is not None else bench.build_model()
    model.eval()
    predictor = Predictor(model, bench.processor, "random 7B", has_adapter=False)
    images = bench.images
    prompt_tokens = stock_inputs(bench, images[:1])["input_ids"].shape[1]
    score_flops = bench.forward_flops(prompt_tokens, prompt_tokens) + bench.vision_flops()
    if score:
        score_pair(bench, model, predictor, score_flops, tag, ours)

    new_tokens = 48
    variants = [
        ("ours, q/k/v and gate/up not stacked", VariantPredictor(predictor, stacked=False)),
        ("ours, prefill compiled in parts", VariantPredictor(predictor, whole_prefill=False)),
    ]
    if not bench.family.fast_paths or bench.qwen:  # the levers undone are LLaVA's fast paths' own
        variants = []
    for batch in batches:
        if not bench.time_left():
            return predictor
        group = images[:batch]
        work = f"describe 48 tokens, batch {batch}{tag}"
        flops = (
            bench.forward_flops(prompt_tokens, prompt_tokens)
            + bench.vision_flops()
            + sum(bench.forward_flops(1, prompt_tokens + i) for i in range(new_tokens - 1))
        )

        def generate(static: bool, group: list[Image.Image] = group) -> torch.Tensor:
            extra = {"cache_implementation": "static"} if static else {}
            with torch.inference_mode(), stock_tower(bench):
                inputs = stock_inputs(bench, group)
                ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **extra)
            return ids[:, inputs["input_ids"].shape[1] :]

        setups = [
            ("plain", lambda g=group: generate(False, g)),
            ("peer (static cache)", lambda g=group: generate(True, g)),
            (ours, lambda g=group: predictor.describe(g, QUESTION, max_new_tokens=new_tokens, batch_size=len(g))),
            *[(name, lambda g=group, v=v: v.describe(g, QUESTION, new_tokens, len(g))) for name, v in variants],
        ]
        if bench.only_ours:
            setups = [(name, fn) for name, fn in setups if name.startswith("ours")]
        if describe is not None:
            setups = [(name, fn) for name, fn in setups if name.startswith(describe)]
        for setup, fn in setups:
            row = Row(work, setup, batch)
            try:
                started = time.perf_counter()
                fn()
                first = time.perf_counter() - started
                fn()
                row.detail["warmup_s"] = round(time.perf_counter() - started, 1)
                reset_peak(bench.device)
                seconds = timed(bench.device, fn, 3 if batch > 1 else 5)
                row.rate, row.peak_gib = batch / seconds, peak_gib(bench.device)
                row.mfu = bench.mfu(flops, row.rate)
                row.detail["compile_s"] = round(first - seconds, 1)  # the first call beyond a steady one
            except Exception as err:
                row.error = f"{type(err).__name__}: {err}"[:400]
                traceback.print_exc()
            bench.record(row)
        if not bench.family.fast_paths or (describe is not None and "plain" not in describe):
            continue
        with contextlib.suppress(Exception):
            # Random weights give nearly flat logits, so bf16 rounding flips greedy choices: the share of
            # leading tokens equal to plain `generate` is shown for the peer (same kernels) and for ours.
            plain_ids = generate(False).cpu()
            with predictor.lock:
                inputs = predictor._inputs(group, [chat_prompt(bench.processor, QUESTION)] * batch)
            with torch.inference_mode():
                ours_ids = predictor._decoder(inputs["input_ids"].shape, new_tokens).run(inputs, new_tokens).cpu()
            peer_ids = generate(True).cpu()
            for name, ids in (("peer", peer_ids), ("ours", ours_ids)):
                bench.rows[-1].detail[f"first_token_equal_{name}_vs_plain"] = float(
                    (ids[:, 0] == plain_ids[:, 0]).float().mean()
                )
                bench.rows[-1].detail[f"tokens_equal_{name}_vs_plain"] = float(
                    (ids == plain_ids[:, : ids.shape[1]]).float().mean()
                )
    return predictor


def score_rows(bench: Bench) -> None:
    """The OK/NG score rows alone (plain, ours) and the forward variants tried for issue 10."""
    model = bench.model if bench.model is not None else bench.build_model()
    model.eval()
    predictor = Predictor(model, bench.processor, "random 7B", has_adapter=False)
    batch = 32 if not bench.tiny else 4
    group = bench.images[:batch]
    prompt_tokens = stock_inputs(bench, group[:1])["input_ids"].shape[1]
    score_flops = bench.forward_flops(prompt_tokens, prompt_tokens) + bench.vision_flops()
    inputs = predictor._inputs(group, [chat_prompt(bench.processor, QUESTION)] * batch)
    unmasked = {k: v for k, v in inputs.items() if k != "attention_mask"}
    variants: dict[str, Any] = {"prompt_tokens": prompt_tokens}

    def forward(net: Any, args: dict[str, torch.Tensor]) -> Any:
        with torch.inference_mode():
            return net(**args, logits_to_keep=1).logits[:, -1].float()

    def probe(name: str, fn: Any) -> None:
        try:
            started = time.perf_counter()
            fn()
            sync(bench.device)
            first = time.perf_counter() - started
            variants[name] = {"forward_s": round(timed(bench.device, fn, 3), 4), "first_s": round(first, 1)}
        except Exception as err:
            variants[name] = f"{type(err).__name__}: {err}"[:300]
        print(f"[probe] {name}: {variants[name]}", flush=True)

    reference = forward(model, inputs)
    probe("eager, mask", lambda: forward(model, inputs))
    probe("eager, no mask", lambda: forward(model, unmasked))

    def plain_score() -> torch.Tensor:
        return forward(model, stock_inputs(bench, group)).softmax(-1)

    for setup, fn in (("plain", plain_score), ("ours", lambda: predictor.score(group, QUESTION, batch_size=batch))):
        row = Row("OK/NG score, batch 32", setup, batch)
        try:
            started = time.perf_counter()
            fn()
            row.detail["first_call_s"] = round(time.perf_counter() - started, 1)
            reset_peak(bench.device)
            seconds = timed(bench.device, fn, 5)
            row.rate, row.peak_gib = batch / seconds, peak_gib(bench.device)
            row.mfu = bench.mfu(score_flops, row.rate)
        except Exception as err:
            row.error = f"{type(err).__name__}: {err}"[:400]
            traceback.print_exc()
        bench.record(row)
    ok_ids, ng_ids = predictor.verdict_ids
    probs = reference.softmax(-1)
    p_plain = probs[:, ng_ids].sum(-1) / (probs[:, ok_ids].sum(-1) + probs[:, ng_ids].sum(-1))
    # The bf16 noise floor: the same forward with another attention kernel (masked vs causal-only).
    probs_unmasked = forward(model, unmasked).softmax(-1)
    p_unmasked = probs_unmasked[:, ng_ids].sum(-1) / (
        probs_unmasked[:, ok_ids].sum(-1) + probs_unmasked[:, ng_ids].sum(-1)
    )
    variants["max_p_ng_difference_eager_unmasked_vs_masked"] = float((p_unmasked - p_plain).abs().max())
    variants["p_ng_range_plain"] = [float(p_plain.min()), float(p_plain.max())]
    with contextlib.suppress(Exception):
        p_ours = torch.tensor(predictor.score(group, QUESTION, batch_size=batch), device=p_plain.device)
        bench.rows[-1].detail["max_p_ng_difference_vs_plain"] = float((p_ours - p_plain).abs().max())
        bench.rows[-1].detail["inputs_s_ours"] = round(
            timed(bench.device, lambda: predictor._inputs(group, [chat_prompt(bench.processor, QUESTION)] * batch), 3),
            4,
        )

    def compiled_forward() -> Any:
        with compiled_modules(compile_slots(model), predictor._compiled):
            return forward(model, inputs)

    probe("ours forward (layers compiled)", compiled_forward)
    if bench.time_left():
        # After `score` (which swaps compiled layers in and out), describe still runs its own decoder.
        eight = bench.images[:8]
        probe("describe 48 tokens, batch 8, after score", lambda: predictor.describe(eight, QUESTION, 48, 8))
    bench.rows[-1].detail["variants"] = variants
    bench.record(bench.rows.pop())


# ------------------------------------------------------------------ QLoRA rows


def qlora_rows(bench: Bench, only_ours: bool = False) -> None:
    """QLoRA through `build_model` (the 4-bit load needs a model folder: the random model is saved once),
    then the stock setup on the same 4-bit load for reference."""
    folder = bench.work / "model"
    model = bench.model if bench.model is not None else bench.build_model()
    model.save_pretrained(folder, max_shard_size="5GB")
    bench.processor.save_pretrained(folder)
    bench.model = None
    del model
    gc.collect()
    torch.cuda.empty_cache()
    rows = [
        (1, "ours (7.5 GB plan)", {"budget_gib": 7.5}),
        (8, "ours (12.6 GB plan)", {"budget_gib": 12.6}),
        *([] if only_ours else [(1, "peer", {}), (8, "peer", {})]),
    ]
    real_budget = memory.gpu_memory_gib
    for batch, setup, settings in rows:
        if not bench.time_left():
            return
        cfg = TrainConfig(
            model=str(folder), data=str(bench.data), out=str(bench.work / "qrun"), method="qlora", batch_size=batch
        )
        cfg.compile = settings.get("compile")
        row = Row(f"QLoRA train, batch {batch}", setup, batch, detail=dict(settings))
        trainer = model = None
        try:
            reset_peak(bench.device)
            if setup == "peer":
                model, trainer, timer, chosen = stock_qlora(bench, cfg, batch)
            else:
                model, trainer, timer, chosen = ours_qlora(bench, cfg, row, settings["budget_gib"])
            trainer.args.disable_tqdm = True
            trainer.train()
            row.rate, row.peak_gib = timer.rate(chosen, bench.warmup), peak_gib(bench.device)
            row.detail.update(timer.split_ms(bench.warmup))
            row.mfu = bench.mfu(bench.train_flops(supervised_tokens(bench)), row.rate)
        except Exception as err:
            row.error = f"{type(err).__name__}: {err}"[:400]
            traceback.print_exc()
        memory.gpu_memory_gib = real_budget
        torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
        del trainer, model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        bench.record(row)


def ours_qlora(bench: Bench, cfg: TrainConfig, row: Row, budget_gib: float) -> tuple[Any, Any, StepTimes, int]:
    model, _ = training_model.build_model(cfg, torch.bfloat16, bench.device)
    row.detail["load_peak_gib"] = round(peak_gib(bench.device), 2)
    reset_peak(bench.device)  # the row's peak is the training peak; loading has its own above
    memory.gpu_memory_gib = lambda device: budget_gib  # a card of this size (restored by the caller)
    total = torch.cuda.get_device_properties(bench.device).total_memory / GIB
    torch.cuda.set_per_process_memory_fraction((budget_gib + 0.5) / total, bench.device)
    inner = model.get_base_model().model
    family = bench.family
    row.detail["projector_dtypes"] = sorted({str(p.dtype) for p in family.projector_module(model).parameters()})
    row.detail["vision_dtypes"] = sorted({str(p.dtype) for p in family.vision_tower(model).parameters()})
    row.detail["projector_trainable"] = any(
        p.requires_grad for n, p in model.named_parameters() if family.projector in n
    )
    row.detail["lm_linear_class"] = type(inner.language_model.layers[0].mlp.down_proj.base_layer).__name__
    row.detail["weights_gib"] = round(torch.cuda.memory_allocated(bench.device) / GIB, 2)
    dataset = bench.dataset()
    chosen, checkpointing = memory.choose_batch_size(cfg, model, dataset, bench.device)
    plan = Plan(len(dataset), 1, chosen, 1, len(dataset) // chosen, bench.warmup + bench.steps, 1.0, 0, 10**9)
    trainer = loop.build_trainer(
        cfg, RunFolder(bench.work / "qrun"), model, dataset, collator(bench), plan, torch.bfloat16, checkpointing
    )
    row.detail.update(checkpointing=str(checkpointing), estimate_gib=checkpointing.estimate_gib)
    timer = StepTimes(bench.device)
    trainer.add_callback(timer)
    return model, trainer, timer, chosen


def stock_qlora(bench: Bench, cfg: TrainConfig, batch: int) -> tuple[Any, Any, StepTimes, int]:
    """What TRL / LLaMA-Factory users run: 4-bit load, prepare_model_for_kbit_training, LoRA (dropout 0),
    fused AdamW, gradient checkpointing, stock Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vlm_inspect.models.load import load_model

    model = load_model(
        cfg.model,
        dtype=torch.bfloat16,
        device=bench.device,
        quantization_config=training_model._qlora_config(torch.bfloat16, bench.family),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    reset_peak(bench.device)
    lora = LoraConfig(
        r=128,
        lora_alpha=256,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        modules_to_save=[bench.family.projector],
    )
    model = get_peft_model(model, lora)
    args = stock_args(bench, bench.work / "stock-q", batch, True, "adamw_torch_fused", False)
    trainer = Trainer(model=model, args=args, train_dataset=bench.dataset(), data_collator=collator(bench))
    timer = StepTimes(bench.device)
    trainer.add_callback(timer)
    return model, trainer, timer, batch


# ------------------------------------------------------------------ report


def table(bench: Bench) -> str:
    """Markdown: one line per work, plain / peer / ours side by side with ours' ratio to each."""
    lines = [
        "| work | plain | peer | ours | ours / plain | ours / peer | target | MFU ours |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: Row | None) -> str:
        if row is None:
            return "—"
        if row.error:
            return "failed"
        peak = f", {row.peak_gib:.1f} GiB" if row.peak_gib else ""
        return f"{row.rate:.2f}/s{peak}"

    works = [*TARGETS, *dict.fromkeys(r.work for r in bench.rows if r.work not in TARGETS)]
    for work in works:
        rate_target, peak_target = TARGETS.get(work, (None, None))
        found = [r for r in bench.rows if r.work == work]
        if not found:
            continue
        plain = next((r for r in found if r.setup == "plain"), None)
        peer = next((r for r in found if r.setup.startswith("peer")), None)
        ours = next((r for r in found if is_main_ours(r)), None)

        def ratio(ref: Row | None, ours: Row | None = ours) -> str:
            if ours is None or ref is None or not ours.rate or not ref.rate:
                return "—"
            return f"{ours.rate / ref.rate:.2f}×"

        target = " ".join(
            t for t in (f"≥ {rate_target}/s" if rate_target else "", f"≤ {peak_target} GiB" if peak_target else "") if t
        )
        mfu = f"{100 * ours.mfu:.0f}%" if ours and ours.mfu else "—"
        lines.append(
            f"| {work} | {cell(plain)} | {cell(peer)} | {cell(ours)} | {ratio(plain)} | {ratio(peer)} | {target or '—'} | {mfu} |"
        )
    extra = [r for r in bench.rows if r.setup.startswith("ours") and not is_main_ours(r)]
    if extra:
        lines += ["", "| variant | batch | rate | peak GiB | estimate GiB |", "|---|---|---|---|---|"]
        for r in extra:
            est = r.detail.get("estimate_gib")
            lines.append(
                f"| {r.work}: {r.setup} | {r.batch} | {r.rate or 0:.2f}/s | {r.peak_gib or 0:.1f} | {est or 0:.1f} |"
            )
    return "\n".join(lines)


def is_main_ours(row: Row) -> bool:
    """Ours with the product defaults ("ours" or "ours (N GB plan)"); variants have a comma."""
    return row.setup.startswith("ours") and "," not in row.setup


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "liger-kernel", "bitsandbytes", "deepspeed", "triton"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated: probe, train, plan (the 24 GB rows only), infer, score (the score rows alone), "
        "qlora (default train,infer,qlora); Qwen families: parity, train, infer, fp8 (default these four), "
        "numerics (FP8 logits against bf16), compiled (LoRA rows with compiled layers), reference (score and "
        "LoRA with a known-good reference before every photo; with infer or train, only those of the two)",
    )
    parser.add_argument("--tiny", action="store_true", help="small model on CPU: checks the script, not the speed")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results (written after each row)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per training row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--only-ours", action="store_true", help="skip the plain and peer rows")
    parser.add_argument("--deadline", type=float, default=540, help="seconds after which remaining rows are skipped")
    parser.add_argument("--traces", type=Path, default=None, help="folder for one profiled step per training row")
    parser.add_argument(
        "--family", default="llava", help="llava (the rows above), qwen2_5_vl or qwen3_vl (see the top)"
    )
    parser.add_argument("--image-tokens", default="1280", help="Qwen families: the image_max_tokens budget")
    args = parser.parse_args()
    default = "train,infer,qlora" if args.family == "llava" else "parity,train,infer,fp8"
    sections = set((args.only or default).split(","))
    budgets = [int(t) for t in args.image_tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.tiny, args.steps, args.warmup, Path(tmp), args.out, args.deadline, args.family, budgets[0])
        bench.traces = args.traces
        bench.only_ours = args.only_ours
        if args.family != "llava":
            family_rows(bench, budgets, sections, args.only_ours)
            sections = set()
            print("\n" + family_table(bench))
        if "probe" in sections:
            probe_rows(bench)
        if "train" in sections or "plan" in sections:
            train_rows(bench, args.only_ours, plan_only="train" not in sections)
        bench.only_ours = args.only_ours
        if "infer" in sections and bench.time_left():
            infer_rows(bench)
        if "score" in sections and bench.time_left():
            score_rows(bench)
        if "qlora" in sections and bench.device.type == "cuda" and bench.time_left():
            qlora_rows(bench, args.only_ours)
        result = bench.result()
        if args.family == "llava":
            print("\n" + table(bench))
        if args.out:
            args.out.write_text(json.dumps(result, indent=1, default=str))
            print(f"\nwrote {args.out}")
        print(f"total {result['seconds']} s; matmul {bench.peak_tflops and round(bench.peak_tflops)} TFLOP/s")


if __name__ == "__main__":
    main()
