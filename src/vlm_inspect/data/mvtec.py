"""The MVTec AD layout: `train/good`, `test/good`, `test/<defect>`, `ground_truth/<defect>/<stem>_mask.png`.

Masks become defect boxes, one per separate region; a mask whose size differs from its photo's is
refused (listed in `skipped`) rather than stretched onto it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vlm_inspect.data.images import load_image, read_file_bytes
from vlm_inspect.data.labelled import Group, LabeledImage, Skipped
from vlm_inspect.data.prompts import UNKNOWN_DEFECT
from vlm_inspect.data.safe_read import exists, list_folder, outside_reason, show_path
from vlm_inspect.errors import DataError

MVTEC_FOLDERS = ("train", "test", "ground_truth")
_MASK_GRID = 128  # masks are searched for separate regions on at most this many cells per side


def is_mvtec(src: Path) -> bool:
    """Whether `src` is laid out as one MVTec AD category."""
    return (src / "train" / "good").is_dir() or ((src / "test").is_dir() and (src / "ground_truth").is_dir())


def mvtec_groups(src: Path) -> tuple[list[Group], list[Path], list[Skipped]]:
    """(groups of photos, ignored folders, refused entries) of an MVTec AD category."""
    _, top, refused = list_folder(src, src)
    groups = []
    for split in (f for f in top if f.name in ("train", "test")):
        _, subfolders, split_refused = list_folder(split, src)
        refused += split_refused
        for folder in subfolders:
            if folder.name == "good":
                groups.append(Group(folder, "OK"))
            elif split.name == "test":
                groups.append(Group(folder, "NG", folder.name, masks=src / "ground_truth" / folder.name))
    # train/good before test/good before test/<defect>, as the photos' order in the dataset.
    groups.sort(key=lambda g: (g.label != "OK", g.folder.parent.name != "train", g.folder.name))
    ignored = [f for f in top if f.name not in MVTEC_FOLDERS]
    return groups, ignored, [Skipped(path, reason) for path, reason in refused]


def add_mask_defects(image: LabeledImage, group: Group, src: Path, max_pixels: int) -> list[Skipped]:
    """Defect boxes from the photo's mask, one per separate region; the mask is listed when it is not used."""
    if group.masks is None or image.defects:
        return []
    mask_path = group.masks / f"{image.path.stem}_mask.png"
    if not exists(mask_path):
        return []
    name = show_path(mask_path)
    reason = outside_reason(mask_path, src)
    try:
        if reason:
            raise DataError(f"{name}: {reason}")
        mask = np.asarray(load_image(read_file_bytes(mask_path, name), max_pixels, name).convert("L")) > 127
    except DataError as err:
        return [Skipped(mask_path, f"mask not used: {str(err).removeprefix(f'{name}: ')}")]
    if mask.shape != (image.height, image.width):
        return [
            Skipped(
                mask_path,
                f"mask not used: it is {mask.shape[1]}x{mask.shape[0]} but its photo "
                f"{show_path(image.path.name)} is {image.width}x{image.height}",
            )
        ]
    for box in mask_boxes(mask):
        image.defects.append({"type": group.defect_type or UNKNOWN_DEFECT, "box": box})
    return []


def mask_boxes(mask: np.ndarray) -> list[list[int]]:
    """Pixel boxes `[x0, y0, x1, y1]` (x1, y1 exclusive) of the separate regions of a mask, largest first.

    Regions are found on a grid of at most 128 cells per side, so specks a few pixels apart
    count as one region.
    """
    height, width = mask.shape
    step = max(1, math.ceil(max(height, width) / _MASK_GRID))
    coarse = _block_any(mask, step)
    found = []
    for cells in _components(coarse):
        rows, cols = zip(*cells, strict=True)
        y0, y1 = min(rows) * step, min(height, (max(rows) + 1) * step)
        x0, x1 = min(cols) * step, min(width, (max(cols) + 1) * step)
        region = mask[y0:y1, x0:x1]
        ys, xs = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
        box = [x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1]
        found.append((int(region.sum()), box))
    return [box for _, box in sorted(found, key=lambda f: -f[0])]


def _block_any(mask: np.ndarray, step: int) -> np.ndarray:
    height, width = mask.shape
    padded = np.zeros((math.ceil(height / step) * step, math.ceil(width / step) * step), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(padded.shape[0] // step, step, padded.shape[1] // step, step).any(axis=(1, 3))


def _components(grid: np.ndarray) -> Iterator[list[tuple[int, int]]]:
    """8-connected regions of a boolean grid, as lists of (row, column) cells."""
    seen = np.zeros_like(grid)
    rows, cols = grid.shape
    for start in zip(*np.nonzero(grid), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, cells = [start], []
        while stack:
            r, c = stack.pop()
            cells.append((int(r), int(c)))
            for nr in range(max(0, r - 1), min(rows, r + 2)):
                for nc in range(max(0, c - 1), min(cols, c + 2)):
                    if grid[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        stack.append((nr, nc))
        yield cells
