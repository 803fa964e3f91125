"""The references and the photo to inspect as one composite image, for families that read one image per turn
(LLaVA-1.5: `Family.reference_layout == "composite"`).

The references come first (left, or top) and the photo last, in reading order, as the reference question says
("the first picture ..., the second ..."). The photo is pasted as it is, never scaled, so a box on it moves only by
where it lies (`Placement.at`); each reference is resized to the photo's height (in a row) or width (in a column),
so every part is at one scale and no difference of size is invented. A row or a column, whichever leaves the photo
larger once the composite is padded to the family's square: a landscape 4:3 photo and one reference stack into a
column at 2/3 of the square's side (side by side: 1/2), a portrait one sits side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from PIL import Image

Size = tuple[int, int]


@dataclass(frozen=True)
class Placement:
    """Where the photo to inspect lies in the composite: its top left, in composite pixels (the photo unscaled)."""

    size: Size
    """The composite's (width, height)."""
    at: tuple[int, int]
    """The photo's top left in the composite."""
    direction: Literal["row", "column"]
    parts: tuple[tuple[int, int, int, int], ...]
    """Each part's (x0, y0, x1, y1), the references first and the photo last."""


def placement(photo: Size, references: Sequence[Size]) -> Placement:
    """The layout of a composite of `references` then `photo`, from their sizes alone (headers are enough)."""
    width, height = photo
    row = [(round(w * height / h), height) for w, h in references]
    column = [(width, round(h * width / w)) for w, h in references]
    row_size = (sum(w for w, _ in row) + width, height)
    column_size = (width, sum(h for _, h in column) + height)
    # The photo's share of the square the composite is padded to: the larger wins; a tie (square photos) is a row.
    direction = "row" if max(row_size) <= max(column_size) else "column"
    sizes = [*(row if direction == "row" else column), photo]
    parts, offset = [], 0
    for w, h in sizes:
        parts.append((offset, 0, offset + w, h) if direction == "row" else (0, offset, w, offset + h))
        offset += w if direction == "row" else h
    size = row_size if direction == "row" else column_size
    return Placement(size, parts[-1][:2], direction, tuple(parts))


def composite(references: Sequence[Image.Image], photo: Image.Image) -> tuple[Image.Image, Placement]:
    """One image of the references then the photo (`placement`), and where the photo lies in it."""
    placed = placement(photo.size, [r.size for r in references])
    canvas = Image.new("RGB", placed.size)
    for image, (x0, y0, x1, y1) in zip([*references, photo], placed.parts, strict=True):
        part = image if image.size == (x1 - x0, y1 - y0) else image.resize((x1 - x0, y1 - y0), Image.BICUBIC)
        canvas.paste(part.convert("RGB"), (x0, y0))
    return canvas, placed
