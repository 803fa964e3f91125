"""What each model actually sees: the photo's size in the vision encoder's pixels, and each annotated defect's.

A defect smaller than one patch of the vision encoder (14 px for LLaVA-1.5, Qwen2.5-VL, InternVL and
Gemma 3, 16 px for Qwen3-VL, in the pixels the encoder reads) shares that patch's features with its
surroundings; well below it, it can vanish before the model sees it, and no tuning brings it back.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from PIL import Image

from vlm_inspect.data.images import exif_size


def patch_px(model: Any) -> int:
    """The vision encoder's patch side, in the pixels it reads."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    patch = base.config.vision_config.patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def model_view(predictor: Any, items: Sequence[Any]) -> dict:
    """The model's view of these photos: a typical photo's size as seen, and every boxed defect's seen size.

    Returns {family, patch_px, photo: {width, height, seen_width, seen_height}, defects: [{id, type, box_px,
    seen_px, below_patch}], n_boxes, n_below_patch, median_seen_px, smallest, reason}; `reason` says why there is no
    defect to measure (no NG photo with a box)."""
    family = predictor.family
    patch = patch_px(predictor.model)
    sizes = [_size(item.path) for item in items]
    rows = []
    for item, (width, height) in zip(items, sizes, strict=True):
        boxes = [d for d in item.defects or [] if d.get("box")] if item.label == "NG" else []
        if not boxes:
            continue
        scale = seen_scale(predictor, (width, height))[0]
        for defect in boxes:
            x0, y0, x1, y1 = defect["box"]
            seen = [round((x1 - x0) * scale, 1), round((y1 - y0) * scale, 1)]
            rows.append(
                {
                    "id": item.id,
                    "type": defect.get("type"),
                    "box_px": [round(x1 - x0, 1), round(y1 - y0, 1)],
                    "seen_px": seen,
                    "below_patch": max(seen) < patch,
                }
            )
    width, height = _typical(sizes)
    scale_x, scale_y = seen_scale(predictor, (width, height))
    seen_width, seen_height = width * scale_x, height * scale_y
    return {
        "family": family.name,
        "patch_px": patch,
        "photo": {"width": width, "height": height, "seen_width": round(seen_width), "seen_height": round(seen_height)},
        "defects": rows,
        "n_boxes": len(rows),
        "n_below_patch": sum(r["below_patch"] for r in rows),
        "median_seen_px": round(statistics.median(max(r["seen_px"]) for r in rows), 1) if rows else None,
        "smallest": min(rows, key=lambda r: max(r["seen_px"])) if rows else None,
        "reason": None if rows else "no NG photo with a defect box or mask to measure",
    }


def seen_scale(predictor: Any, photo: tuple[int, int]) -> tuple[float, float]:
    """Encoder pixels per photo pixel across and down, the photo judged against the predictor's references: its
    part of a composite (LLaVA-1.5 with references) is seen smaller than the photo alone."""
    view = predictor.view(photo)
    (width, height), canvas = predictor.family.seen(predictor.processor, *view.canvas), view.canvas
    return view.scale * width / canvas[0], view.scale * height / canvas[1]


def warning(view: dict, name: str) -> str | None:
    """A sentence for the console and the report when defects shrink below what the model can resolve."""
    if not view["n_below_patch"]:
        return None
    return (
        f"{name}: {view['n_below_patch']} of {view['n_boxes']} defects are smaller than one {view['patch_px']} px "
        f"patch in what the model sees (a {view['photo']['width']}×{view['photo']['height']} photo becomes "
        f"{view['photo']['seen_width']}×{view['photo']['seen_height']}); it may not see them at all. "
        "Use a family that sees more pixels, raise image_max_tokens, or crop photos to the product"
    )


def _size(path: Any) -> tuple[int, int]:
    """The photo's size as viewed (EXIF rotation applied), from its header."""
    with Image.open(path) as image:
        return exif_size(image)


def _typical(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The median photo size (by area)."""
    return sorted(sizes, key=lambda s: s[0] * s[1])[len(sizes) // 2] if sizes else (1, 1)
