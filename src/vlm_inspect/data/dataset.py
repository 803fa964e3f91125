"""Training samples: LLaVA conversation JSON → (input_ids, labels, pixel_values) for the Trainer.

The loss covers only the assistant answers and the token that ends each turn; the question, the
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

from vlm_inspect.data.images import load_image, square_image
from vlm_inspect.errors import DataError
from vlm_inspect.folders import DatasetFolder
from vlm_inspect.models.chat import Conversation, conversation

IGNORE_INDEX = -100


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of an original-format sample."""
    conv = sample["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


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


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA JSON samples rendered for training by the processor; augmentation seeded by (seed, epoch, index).

    The conversation text is rendered and tokenized once (`models.chat.conversation`); each item runs the
    processor on its (augmented) photo and that text, so dynamic-resolution families get the image tokens
    the photo really costs, and every side input the model needs (M-RoPE token types, Gemma's image mask)
    comes with it. Labels are the answers' spans, shifted past the expanded image placeholder.
    """

    def __init__(
        self,
        samples: list[dict],
        image_root: Path,
        processor: Any,
        max_length: int,
        square_pad: bool = True,
        image_aspect: str = "pad",
        augment: bool = False,
        seed: int = 0,
    ):
        self.samples, self.image_root, self.processor = samples, image_root, processor
        self.image_aspect = image_aspect if square_pad else "native"
        self.augment, self.seed = augment, seed
        self.epoch = 0  # set by the trainer callback so augmentation is reproducible on resume
        self.conversations = [conversation(processor, conversation_turns(s)) for s in samples]
        self.lengths = [self._estimated_length(s, c) for s, c in zip(samples, self.conversations, strict=True)]
        too_long = [
            f"{s.get('id', i)} ({n} tokens)"
            for i, (s, n) in enumerate(zip(samples, self.lengths, strict=True))
            if n > max_length
        ]
        if too_long:
            raise DataError(
                f"samples longer than max_length={max_length} (image tokens included): {', '.join(too_long)}; "
                "shorten them, lower image_max_tokens or raise max_length"
            )

    def _estimated_length(self, sample: dict, conv: Conversation) -> int:
        """Tokens of a sample with its image expanded, from the photo's header (before augmentation)."""
        with Image.open(self.image_root / sample["image"]) as image:
            width, height = image.size
        if self.image_aspect == "pad":
            width = height = max(width, height)
        counted = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
        return len(conv.ids) - 1 + counted["num_image_tokens"][0]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = load_image(self.image_root / sample["image"])
        if self.augment:
            rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
            boxes = [d["box"] for d in sample.get("defects") or [] if d.get("box")]
            image = augment_image(image, boxes, rng)
        image = square_image(image, self.processor.image_processor.image_mean, self.image_aspect)
        conv = self.conversations[index]
        inputs = self.processor(images=[[image]], text=[conv.text], return_tensors="pt")
        ids = inputs["input_ids"][0]
        shift = len(ids) - len(conv.ids)  # the image placeholder's expansion; every answer comes after it
        labels = torch.full_like(ids, IGNORE_INDEX)
        for start, end in conv.spans:
            if ids[start + shift : end + shift].tolist() != conv.ids[start:end]:
                raise DataError(f"{sample.get('id', index)}: the processor's tokens do not line up with the answer")
            labels[start + shift : end + shift] = ids[start + shift : end + shift]
        per_token = inputs["input_ids"].shape
        item = {k: (v[0] if v.shape == per_token else v) for k, v in inputs.items()}
        return {**item, "labels": labels}


def load_training_dataset(data: str | Path, processor: Any, **kwargs: Any) -> ConversationDataset:
    """The samples of a dataset folder or LLaVA JSON file (`folders.DatasetFolder`), wrapped for training."""
    dataset = DatasetFolder.open(data)
    return ConversationDataset(dataset.samples(), dataset.image_root, processor, **kwargs)


@dataclass
class Collator:
    """Right-pads a batch for training: per-token inputs (ids, labels, mask and the family's side inputs) are
    padded, the rest (pixels, image grids) concatenated; padding is masked out of attention and loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(b["input_ids"]) for b in batch)
        pad_values = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}
        out: dict[str, torch.Tensor] = {}
        for key, first in batch[0].items():
            if first.dim() == 1 and len(first) == len(batch[0]["input_ids"]):
                padded = torch.full((len(batch), length), pad_values.get(key, 0), dtype=first.dtype)
                for row, b in enumerate(batch):
                    padded[row, : len(b[key])] = b[key]
                out[key] = padded
            else:
                out[key] = torch.cat([b[key] for b in batch])
        return out
