"""Training samples: LLaVA conversation JSON → (input_ids, labels, pixel_values) for the Trainer.

The loss covers only the assistant answers and the `</s>` after each; the question, the
image placeholder tokens and padding are labelled -100. A sample longer than max_length is
an error naming it: cutting it would silently drop image tokens or answers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageEnhance, ImageOps

from vlm_inspect.data.images import fit_model_input, load_image
from vlm_inspect.data.llava_json import read_llava_json
from vlm_inspect.errors import DataError
from vlm_inspect.models.template import IMAGE, conversation_segments

IGNORE_INDEX = -100


def dataset_paths(data: str | Path) -> tuple[Path, Path]:
    """(train JSON, image folder) for a prepare dataset folder or a LLaVA JSON file."""
    path = Path(data)
    if path.is_dir():
        if not (path / "train.json").exists():
            raise DataError(f"{path}: no train.json; make a dataset with `vlm-inspect prepare`")
        if (path / "images").is_dir() and not (path / "manifest.json").exists():
            raise DataError(f"{path}: no manifest.json, so `prepare` did not finish; run it again")
        return path / "train.json", path
    if path.suffix == ".json" and path.exists():
        return path, path.parent
    raise DataError(f"{path}: no such dataset folder or LLaVA JSON file")


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of an original-format sample."""
    conv = sample["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


def square_image(image: Image.Image, image_mean: list[float], aspect: str) -> Image.Image:
    """LLaVA-1.5 'pad': centre on a square of the processor's mean colour; 'crop' leaves it.

    Either way a photo over `MODEL_INPUT_MAX_SIDE` (2048) is shrunk first, so memory stays bounded.
    """
    image = fit_model_input(image)
    if aspect != "pad" or image.width == image.height:
        return image
    side = max(image.size)
    fill = tuple(int(x * 255) for x in image_mean)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def augment_image(image: Image.Image, boxes: list[list[float]], rng: random.Random) -> Image.Image:
    """Few-shot augmentation that keeps every annotated defect in view and its location word true.

    Photos with located defects are not flipped (a flip would turn 'top left' into 'top right')
    and rotate at most 5 degrees; crops never cut into a defect box.
    """
    has_location = bool(boxes)
    if not has_location and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if not has_location and rng.random() < 0.3:
        image = ImageOps.flip(image)
    angle = rng.uniform(-5, 5) if has_location else rng.uniform(-10, 10)
    image = image.rotate(angle, resample=Image.BILINEAR, fillcolor=_border_colour(image))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.85, 1.15))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.85, 1.15))
    return _mild_crop(image, boxes, rng)


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((0, 0))  # type: ignore[return-value]


def _mild_crop(image: Image.Image, boxes: list[list[float]], rng: random.Random) -> Image.Image:
    w, h = image.size
    left, top = rng.uniform(0, 0.08) * w, rng.uniform(0, 0.08) * h
    right, bottom = w - rng.uniform(0, 0.08) * w, h - rng.uniform(0, 0.08) * h
    for x0, y0, x1, y1 in boxes:  # keep defects (with a small margin) inside the crop
        left, top = min(left, max(0, x0 - 2)), min(top, max(0, y0 - 2))
        right, bottom = max(right, min(w, x1 + 2)), max(bottom, min(h, y1 + 2))
    return image.crop((int(left), int(top), math.ceil(right), math.ceil(bottom)))


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(
    turns: list[tuple[str, str]], tokenizer: Any, image_token_id: int, image_seq_length: int
) -> Tokenized:
    """Token ids and labels for a whole conversation, image placeholder expanded.

    Labels come from character spans: tokenising the full text once (as inference does)
    and marking tokens that start inside an answer keeps the ids identical to what the model
    sees at inference, whatever the tokenizer's handling of spaces.
    """
    pieces = conversation_segments(turns, eos=tokenizer.eos_token)
    text, spans, pos = "", [], 0
    for piece, supervised in pieces:
        if supervised:
            spans.append((pos, pos + len(piece)))
        text += piece
        pos += len(piece)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids, labels = [], []
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        if tok == image_token_id:
            ids.extend([image_token_id] * image_seq_length)
            labels.extend([IGNORE_INDEX] * image_seq_length)
            continue
        supervised = end > start and any(a <= start < b for a, b in spans)
        ids.append(tok)
        labels.append(tok if supervised else IGNORE_INDEX)
    return Tokenized(ids, labels)


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA JSON samples rendered for training; augmentation seeded by (seed, epoch, index)."""

    def __init__(
        self,
        samples: list[dict],
        image_root: Path,
        processor: Any,
        image_seq_length: int,
        max_length: int,
        image_aspect: str = "pad",
        augment: bool = False,
        seed: int = 0,
    ):
        self.samples, self.image_root, self.processor = samples, image_root, processor
        self.image_aspect, self.augment, self.seed = image_aspect, augment, seed
        self.epoch = 0  # set by the trainer callback so augmentation is reproducible on resume
        tok = processor.tokenizer
        self.image_token_id = tok.convert_tokens_to_ids(IMAGE)
        self.tokens = [
            tokenize_conversation(conversation_turns(s), tok, self.image_token_id, image_seq_length) for s in samples
        ]
        too_long = [
            f"{s.get('id', i)} ({len(t.input_ids)} tokens)"
            for i, (s, t) in enumerate(zip(samples, self.tokens, strict=True))
            if len(t.input_ids) > max_length
        ]
        if too_long:
            raise DataError(
                f"samples longer than max_length={max_length} (image tokens included): {', '.join(too_long)}; "
                "shorten them or raise max_length"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = load_image(self.image_root / sample["image"])
        if self.augment:
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            boxes = [d["box"] for d in sample.get("defects") or [] if d.get("box")]
            image = augment_image(image, boxes, rng)
        tokens = self.tokens[index]
        return {
            "input_ids": torch.tensor(tokens.input_ids),
            "labels": torch.tensor(tokens.labels),
            "pixel_values": self.pixel_values(image)[0],
        }

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        image_processor = self.processor.image_processor
        image = square_image(image, image_processor.image_mean, self.image_aspect)
        return image_processor(images=[image], return_tensors="pt")["pixel_values"]


def load_training_dataset(
    data: str | Path, processor: Any, image_seq_length: int, **kwargs: Any
) -> ConversationDataset:
    """Read and check the dataset, then wrap it for training."""
    json_path, image_root = dataset_paths(data)
    samples = read_llava_json(json_path, image_root)
    if not samples:
        raise DataError(f"{json_path}: no samples")
    return ConversationDataset(samples, image_root, processor, image_seq_length, **kwargs)


@dataclass
class Collator:
    """Right-pads a batch for training; padding is masked out of attention and loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = b["input_ids"], b["labels"], 1
        pixels = torch.stack([b["pixel_values"] for b in batch])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}
