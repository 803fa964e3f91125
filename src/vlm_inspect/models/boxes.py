"""Defect boxes in a family's answers: how a photo reaches the model (`View`), and how answers write boxes.

A box is always `[x0, y0, x1, y1]` in the *photo's* pixels (upright, after EXIF rotation) outside this module.
Inside an answer it is in the family's own frame, computed from the same steps the model's input takes:

1. the photo is shrunk to at most `MODEL_INPUT_MAX_SIDE` px a side (`data.images.fit_model_input`);
2. the square families (LLaVA-1.5, Gemma 3) centre it on a square of the mean colour (`data.images.square_image`);
   that square, or the shrunk photo for the others, is the *canvas* the processor receives;
3. the frame: Qwen2.5-VL's absolute pixels of the canvas after the processor's resize (`smart_resize` at the
   run's `image_max_tokens`), or thousandths (0–1000) of the canvas for Qwen3-VL, InternVL, and, as this
   project's documented convention, LLaVA-1.5 and Gemma 3 (which have none of their own).

Training answers and the boxes read back from a model's answer go through the same `View`, so a box never
shifts between training and inference. Writing and reading the text is the family's `BoxText`: Qwen's JSON
`[{"bbox_2d": [x0, y0, x1, y1], "label": "scratch"}]` (also LLaVA-1.5 and Gemma 3) or InternVL's
`<ref>scratch</ref><box>[[x0, y0, x1, y1]]</box>`. What a model writes badly (unparseable, non-finite, inverted,
outside the photo, more than `MAX_BOXES`) is dropped and counted, never raised and never returned unclamped. A box
always refers to the inspected photo, never to a reference: each reference is an image part of its own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_BOXES = 20
"""Most boxes read from one answer; more are dropped and counted (a model stuck in a loop writes hundreds)."""
MAX_ANSWER_CHARS = 20_000
"""Only this much of an answer is searched for boxes."""
THOUSANDTHS = 1000.0

Box = list[float]
Found = tuple[str, Box]  # (defect type as written, box)


@dataclass(frozen=True)
class View:
    """Where a photo of `photo` size lies on the canvas the processor gets, and the frame answers use."""

    photo: tuple[int, int]
    scale: float
    """Photo pixels → canvas pixels (the memory shrink; 1 for photos up to 2,048 px a side)."""
    offset: tuple[float, float]
    """Where the shrunk photo's top left lies on the canvas (square padding; 0 for the other families)."""
    canvas: tuple[float, float]
    frame: tuple[float, float]
    """The size of the canvas in answer coordinates: the resized image (pixels) or (1000, 1000)."""

    def to_frame(self, box: Box) -> list[int]:
        """A photo-pixel box in answer coordinates, rounded to whole units."""
        return [round(v) for v in self._map(box, forward=True)]

    def to_photo(self, box: Box) -> Box | None:
        """An answer box in photo pixels, clamped to the photo; None when nothing of it lies on the photo."""
        x0, y0, x1, y1 = self._map(box, forward=False)
        width, height = self.photo
        x0, x1 = max(0.0, x0), min(float(width), x1)
        y0, y1 = max(0.0, y0), min(float(height), y1)
        if x1 - x0 < 0.5 or y1 - y0 < 0.5:
            return None
        return [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]

    def frame_unit_px(self) -> float:
        """How many photo pixels one answer unit spans (the larger of the two axes)."""
        return max(self.canvas[0] / self.frame[0], self.canvas[1] / self.frame[1]) / self.scale

    def _map(self, box: Box, forward: bool) -> list[float]:
        sx, sy = self.frame[0] / self.canvas[0], self.frame[1] / self.canvas[1]
        (ox, oy), s = self.offset, self.scale
        if forward:
            x0, y0, x1, y1 = box
            return [(x0 * s + ox) * sx, (y0 * s + oy) * sy, (x1 * s + ox) * sx, (y1 * s + oy) * sy]
        x0, y0, x1, y1 = box
        return [(x0 / sx - ox) / s, (y0 / sy - oy) / s, (x1 / sx - ox) / s, (y1 / sy - oy) / s]


def make_view(
    photo: tuple[int, int], model_input: tuple[int, int], square: str | None, resized: tuple[float, float] | None
) -> View:
    """The view of a `photo`-sized photo whose model input is `model_input` (after the memory shrink).

    Args:
        square: "pad" (centred on a square, as `square_image` does), "crop" (the processor's centre crop), or
            None (the photo as it is).
        resized: the frame in pixels (Qwen2.5-VL's resized canvas), or None for thousandths of the canvas.
    """
    width, height = model_input
    scale = width / photo[0]
    if square is None:
        canvas, offset = (float(width), float(height)), (0.0, 0.0)
    else:
        side = max(width, height) if square == "pad" else min(width, height)
        canvas = (float(side), float(side))
        # square_image pastes at integer offsets; the processor's centre crop is centred.
        offset = (
            ((side - width) // 2, (side - height) // 2)
            if square == "pad"
            else ((side - width) / 2, (side - height) / 2)
        )
    frame = resized or (THOUSANDTHS, THOUSANDTHS)
    return View(photo, scale, (float(offset[0]), float(offset[1])), canvas, (float(frame[0]), float(frame[1])))


# ---------------------------------------------------------------- box text


@dataclass(frozen=True)
class Parsed:
    """What an answer says: its prose (boxes taken out), the boxes found (answer frame), and how many were dropped."""

    prose: str
    found: list[Found]
    dropped: int


class JsonBoxes:
    """Qwen's grounding JSON: `[{"bbox_2d": [x0, y0, x1, y1], "label": "scratch"}]`; an empty list when none."""

    _OBJECT = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}")
    _LIST = re.compile(r"(?:```(?:json)?\s*)?\[\s*(?:\{[^\[\]]*?(?:\[[^\[\]]*\][^\[\]]*?)*\}\s*,?\s*)*\]\s*(?:```)?")

    def write(self, boxes: list[tuple[str, list[int]]]) -> str:
        return json.dumps([{"bbox_2d": box, "label": label} for label, box in boxes], ensure_ascii=False)

    def read(self, answer: str) -> Parsed:
        text = answer[:MAX_ANSWER_CHARS]
        found, dropped = [], 0
        for match in self._OBJECT.finditer(text):
            item = _json_object(match.group(0))
            box = _four_numbers(item.get("bbox_2d")) if item is not None else None
            if box is None:
                dropped += 1
            else:
                found.append((str(item.get("label") or "").strip(), box))
        prose = self._LIST.sub(" ", text)
        prose = self._OBJECT.sub(" ", prose)
        return _limited(_tidy(prose), found, dropped)


class RefBoxes:
    """InternVL's grounding: `<ref>scratch</ref><box>[[x0, y0, x1, y1], ...]</box>`; `[]` when none."""

    _PAIR = re.compile(r"<ref>(.*?)</ref>\s*<box>(.*?)</box>", re.S)
    _BOX = re.compile(r"\[([^\[\]]*)\]")

    def write(self, boxes: list[tuple[str, list[int]]]) -> str:
        if not boxes:
            return "[]"
        return " ".join(f"<ref>{label}</ref><box>[{json.dumps(box)}]</box>" for label, box in boxes)

    def read(self, answer: str) -> Parsed:
        text = answer[:MAX_ANSWER_CHARS]
        found, dropped = [], 0
        for label, inside in self._PAIR.findall(text):
            numbers = self._BOX.findall(inside) or [inside]
            for part in numbers:
                box = _four_numbers(_numbers(part))
                if box is None:
                    dropped += 1
                else:
                    found.append((label.strip(), box))
        prose = self._PAIR.sub(" ", text).replace("[]", " ")
        return _limited(_tidy(prose), found, dropped)


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _numbers(text: str) -> list[Any]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        return []


def _four_numbers(value: Any) -> Box | None:
    """Four finite numbers with x0 < x1 and y0 < y1, else None (dropped)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x0, y0, x1, y1 = (float(v) for v in value)
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1, y1]


def _limited(prose: str, found: list[Found], dropped: int) -> Parsed:
    return Parsed(prose, found[:MAX_BOXES], dropped + max(0, len(found) - MAX_BOXES))


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


JSON_BOXES = JsonBoxes()
REF_BOXES = RefBoxes()


def write_boxes(text: JsonBoxes | RefBoxes, view: View, defects: list[tuple[str, Box]]) -> str:
    """The answer text of (label, photo-pixel box) pairs in the family's frame and format."""
    return text.write([(label, view.to_frame(box)) for label, box in defects])


def read_boxes(text: JsonBoxes | RefBoxes, view: View, answer: str) -> tuple[str, list[dict], int]:
    """(prose, defects `[{"type", "box"}]` in photo pixels, how many boxes were dropped) of a model's answer."""
    parsed = text.read(answer)
    defects, dropped = [], parsed.dropped
    for label, box in parsed.found:
        on_photo = view.to_photo(box)
        if on_photo is None:
            dropped += 1
        else:
            defects.append({"type": label or None, "box": on_photo})
    return parsed.prose, defects, dropped
