"""Training samples: LLaVA conversation JSON → (input_ids, labels, pixel_values) for the Trainer.

The loss covers only the assistant answers and the token that ends each turn; the question, the
image placeholder tokens and padding are labelled -100. A sample longer than max_length is
an error naming it: cutting it would silently drop image tokens or answers. Boxed defects are written into
the answers here, in the model family's frame, because only here are the family and the augmented photo known.

A sample with known-good references (its `reference` list) shows them first, as the family takes them
(image parts of their own, before the photo's), augmented exactly as the photo is, so
augmentation never invents a difference between them; its length counts every reference's image tokens, which the
memory plan reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageEnhance, ImageOps

from vlm_inspect.data.images import exif_size, load_image, model_input_size, square_image
from vlm_inspect.data.prompts import UNKNOWN_DEFECT, defect_name, parse_verdict
from vlm_inspect.errors import DataError
from vlm_inspect.folders import DatasetFolder
from vlm_inspect.models.boxes import write_boxes
from vlm_inspect.models.chat import Conversation, conversation
from vlm_inspect.models.family import Family

IGNORE_INDEX = -100


def conversation_turns(sample: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of an original-format sample."""
    conv = sample["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]


@dataclass(frozen=True)
class Augmentation:
    """One draw of the few-shot augmentation, applied alike to a photo and to each of its references."""

    mirror: bool
    flip: bool
    angle: float
    brightness: float
    contrast: float
    crop: tuple[float, float, float, float]
    """Share of the width or height cut from the left, top, right and bottom (before keeping defects in view)."""

    @classmethod
    def draw(cls, rng: random.Random, located: bool) -> Augmentation:
        """Photos with located defects are not flipped (a flip would turn 'top left' into 'top right' in the
        answer's words) and rotate at most 5 degrees."""
        mirror = not located and rng.random() < 0.5
        flip = not located and rng.random() < 0.3
        angle = rng.uniform(-5, 5) if located else rng.uniform(-10, 10)
        brightness, contrast = rng.uniform(0.85, 1.15), rng.uniform(0.85, 1.15)
        crop = (rng.uniform(0, 0.08), rng.uniform(0, 0.08), rng.uniform(0, 0.08), rng.uniform(0, 0.08))
        return cls(mirror, flip, angle, brightness, contrast, crop)

    def apply(
        self, image: Image.Image, boxes: list[list[float]], crop: tuple[float, float, float, float] | None = None
    ) -> tuple[Image.Image, list[list[float]], tuple[float, float, float, float]]:
        """The image and its boxes augmented, and the crop taken (shares of each side), which `crop` fixes."""
        if self.mirror:
            image = ImageOps.mirror(image)
        if self.flip:
            image = ImageOps.flip(image)
        image = image.rotate(self.angle, resample=Image.BILINEAR, fillcolor=_border_colour(image))
        boxes = [_turned(box, self.angle, image.size) for box in boxes]
        image = ImageEnhance.Brightness(image).enhance(self.brightness)
        image = ImageEnhance.Contrast(image).enhance(self.contrast)
        if crop is not None:  # a reference: the photo's crop, by share of each side
            w, h = image.size
            rect = (round(crop[0] * w), round(crop[1] * h), w - round(crop[2] * w), h - round(crop[3] * h))
            return image.crop(rect), [], crop
        return _mild_crop(image, boxes, self.crop)


def augment_image(
    image: Image.Image, boxes: list[list[float]], rng: random.Random
) -> tuple[Image.Image, list[list[float]]]:
    """Few-shot augmentation that keeps every annotated defect in view; the boxes move with the pixels.

    Photos with located defects are not flipped and rotate at most 5 degrees (a box becomes the box around its
    turned corners); crops never cut into a defect box.
    """
    augmented, moved, _ = Augmentation.draw(rng, bool(boxes)).apply(image, boxes)
    return augmented, moved


def augment_with_references(
    image: Image.Image, boxes: list[list[float]], references: Sequence[Image.Image], rng: random.Random
) -> tuple[Image.Image, list[list[float]], list[Image.Image]]:
    """`augment_image` for a photo judged against references: one draw, applied to each reference exactly as to
    the photo (the same flips, turn, light and crop, by share of each side), so no difference is invented between
    them; a flip or a crop of the photo alone would read as a defect."""
    augmentation = Augmentation.draw(rng, bool(boxes))
    augmented, moved, crop = augmentation.apply(image, boxes)
    return augmented, moved, [augmentation.apply(r, [], crop)[0] for r in references]


def _border_colour(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((0, 0))  # type: ignore[return-value]


def _turned(box: list[float], degrees: float, size: tuple[int, int]) -> list[float]:
    """The box around `box`'s corners after `Image.rotate(degrees)` (counter-clockwise about the centre), kept on the image."""
    (cx, cy), t = (size[0] / 2, size[1] / 2), math.radians(degrees)
    x0, y0, x1, y1 = box
    corners = [(x, y) for x in (x0, x1) for y in (y0, y1)]
    xs = [cx + (x - cx) * math.cos(t) + (y - cy) * math.sin(t) for x, y in corners]
    ys = [cy - (x - cx) * math.sin(t) + (y - cy) * math.cos(t) for x, y in corners]
    return [max(0.0, min(xs)), max(0.0, min(ys)), min(float(size[0]), max(xs)), min(float(size[1]), max(ys))]


def _mild_crop(
    image: Image.Image, boxes: list[list[float]], shares: tuple[float, float, float, float]
) -> tuple[Image.Image, list[list[float]], tuple[float, float, float, float]]:
    w, h = image.size
    left, top, right, bottom = shares[0] * w, shares[1] * h, w - shares[2] * w, h - shares[3] * h
    for x0, y0, x1, y1 in boxes:  # keep defects (with a small margin) inside the crop
        left, top = min(left, max(0, x0 - 2)), min(top, max(0, y0 - 2))
        right, bottom = max(right, min(w, x1 + 2)), max(bottom, min(h, y1 + 2))
    crop = (int(left), int(top), math.ceil(right), math.ceil(bottom))
    moved = [[x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1]] for x0, y0, x1, y1 in boxes]
    taken = (crop[0] / w, crop[1] / h, (w - crop[2]) / w, (h - crop[3]) / h)
    return image.crop(crop), moved, taken


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return exif_size(image)


def boxed_defects(sample: dict) -> list[tuple[str, list[float]]]:
    """(defect type in words, photo-pixel box) of each boxed defect of a sample (sidecars, masks, station exports)."""
    return [
        (defect_name(d.get("type") or UNKNOWN_DEFECT), list(d["box"]))
        for d in sample.get("defects") or []
        if d.get("box")
    ]


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA JSON samples rendered for training by the processor; augmentation seeded by (seed, epoch, item).

    Each item runs the processor on its (augmented) photo and conversation, so dynamic-resolution families get the
    image tokens the photo really costs, and every side input the model needs (M-RoPE token types, Gemma's image
    mask) comes with it. Labels are the answers' spans (`models.chat.conversation`), shifted past the expanded
    image placeholder.

    A sample whose defects are boxed answers with its boxes too, in the family's own format and frame
    (models/boxes.py), computed for the photo as augmented and as the processor will see it: after the verdict
    and description of its first answer, and in an item of its own that asks for the boxes alone (one of
    `locate_questions`, as `Predictor.locate` asks it: a first question; OK photos answer it with no box). A box
    is always on the photo, never on a reference.
    """

    def __init__(
        self,
        samples: list[dict],
        image_root: Path,
        processor: Any,
        max_length: int,
        family: Family,
        image_aspect: str = "pad",
        augment: bool = False,
        seed: int = 0,
        locate_questions: tuple[str, ...] = (),
    ):
        self.samples, self.image_root, self.processor, self.family = samples, image_root, processor, family
        self.image_aspect = image_aspect if family.square_pad else "native"
        self.augment, self.seed = augment, seed
        # Asked only when some photo is boxed: otherwise every answer to it would be "no box".
        self.locate_questions = locate_questions if any(boxed_defects(s) for s in samples) else ()
        self.epoch = 0  # set by the trainer callback so augmentation is reproducible on resume
        self.turns = [conversation_turns(s) for s in samples]
        self._reference_images: dict[str, Image.Image] = {}  # decoded once: every sample shows the same few
        self._marker_tokens = self._tokens_around_an_image()
        # (sample, asks for the boxes alone): every sample, then the locate items (boxed NG and OK photos; an NG
        # photo without boxes says nothing of where).
        self.items = [(i, False) for i in range(len(samples))]
        if self.locate_questions:
            self.items += [(i, True) for i, s in enumerate(samples) if boxed_defects(s) or self._label(i) == "OK"]
        # Each item's conversation as its photo is on disk; only a boxed photo that augmentation moves needs
        # another (rendering and tokenizing it again doubled the time per item of the demo's caption stage).
        self.conversations: list[Conversation] = []
        self.image_tokens: list[tuple[int, int]] = []
        """Per item: (the photo's image tokens, its references' image tokens), as the processor will expand them."""
        self.lengths = [self._estimated_length(i) for i in range(len(self.items))]
        too_long = [
            f"{samples[i].get('id', i)} ({n} tokens)"
            for (i, _), n in zip(self.items, self.lengths, strict=True)
            if n > max_length
        ]
        if too_long:
            raise DataError(
                f"samples longer than max_length={max_length} (image tokens included): {', '.join(too_long)}; "
                "shorten them, lower image_max_tokens or raise max_length"
            )

    def _label(self, index: int) -> str | None:
        return self.samples[index].get("label") or parse_verdict(self.turns[index][0][1])

    def _estimated_length(self, item: int) -> int:
        """Tokens of an item with its images expanded (the photo's and every reference's), from the headers
        (before augmentation, which keeps sizes within a crop of them)."""
        sample = self.samples[self.items[item][0]]
        photo = _header_size(self.image_root / sample["image"])
        references = [_header_size(self.image_root / r) for r in sample.get("reference", [])]
        conv = self.conversation(item, boxed_defects(sample), photo)
        self.conversations.append(conv)
        given = [*references, photo]  # what the processor gets, in the turn's order
        tokens = [self._image_tokens(size) + self._marker_tokens for size in given]
        self.image_tokens.append((tokens[-1], sum(tokens[:-1])))
        return len(conv.ids) - len(given) + sum(tokens)

    def _tokens_around_an_image(self) -> int:
        """Tokens the processor adds around an image's expanded tokens besides them (Gemma 3's and InternVL's start
        and end markers; 0 for LLaVA-1.5 and Qwen), measured once on a blank image: each image costs them again."""
        blank = square_image(Image.new("RGB", (64, 48)), self.processor.image_processor.image_mean, self.image_aspect)
        conv = conversation(self.processor, [("?", "OK")])
        expanded = self.processor(images=[[blank]], text=[conv.text], return_tensors="pt")["input_ids"].shape[1]
        return expanded - len(conv.ids) + 1 - self._image_tokens(blank.size)

    def _image_tokens(self, size: tuple[int, int]) -> int:
        width, height = model_input_size(*size)
        if self.image_aspect == "pad":
            width = height = max(width, height)
        return self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]

    def conversation(self, item: int, boxes: list[tuple[str, list[float]]], photo: tuple[int, int]) -> Conversation:
        """The item's turns, with its boxes (photo pixels of a `photo`-sized image) written in where they belong;
        its first turn holds an image part for each reference and the photo."""
        index, locate = self.items[item]
        parts = len(self.samples[index].get("reference", [])) + 1
        view = self.family.view(self.processor, photo, model_input_size(*photo), self.image_aspect)
        written = write_boxes(self.family.box_text, view, boxes)
        if locate:
            question = self.locate_questions[index % len(self.locate_questions)]
            return conversation(self.processor, [(question, written)], parts)
        turns = list(self.turns[index])
        if boxes:
            turns[0] = (turns[0][0], f"{turns[0][1].strip()} {written}")
        return conversation(self.processor, turns, parts)

    def references(self, index: int) -> list[Image.Image]:
        """The sample's reference photos, decoded once for all samples."""
        names = self.samples[index].get("reference", [])
        for name in names:
            if name not in self._reference_images:
                self._reference_images[name] = load_image(self.image_root / name)
        return [self._reference_images[name] for name in names]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = self.items[item][0]
        sample = self.samples[index]
        image = load_image(self.image_root / sample["image"])
        references = self.references(index)
        boxes = boxed_defects(sample)
        conv = self.conversations[item]
        if self.augment:
            rng = random.Random(f"{self.seed}-{self.epoch}-{item}")
            image, moved, references = augment_with_references(image, [box for _, box in boxes], references, rng)
            boxes = [(label, box) for (label, _), box in zip(boxes, moved, strict=True)]
            conv = self.conversation(item, boxes, image.size) if boxes else conv
        mean = self.processor.image_processor.image_mean
        images = [square_image(r.convert("RGB"), mean, self.image_aspect) for r in [*references, image]]
        inputs = self.processor(images=[images], text=[conv.text], return_tensors="pt")
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


def load_training_dataset(data: str | Path, processor: Any, family: Family, **kwargs: Any) -> ConversationDataset:
    """The samples of a dataset folder or LLaVA JSON file (`folders.DatasetFolder`), wrapped for training with the
    dataset's locate wordings."""
    dataset = DatasetFolder.open(data)
    locate = dataset.facts().locate_wordings()
    return ConversationDataset(
        dataset.samples(), dataset.image_root, processor, family=family, locate_questions=locate, **kwargs
    )


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
