"""Localization measures: how well a model's boxes point at the defects. Pure functions on boxes, no model.

A box is `[x0, y0, x1, y1]` in the photo's pixels. The truth of an NG photo is its defect boxes (sidecars; an
MVTec mask became one box per separate region in `data/mvtec.py`); a model's boxes are what `Predictor.locate`
read back from its answer. The measures, over the NG photos with at least one true box and over the OK photos:

- **IoU of a photo**: the area the model's boxes cover *and* the true boxes cover, over the area either covers,
  each set of boxes taken as the region it covers (its union). This is MMAD-BBox's "BBox-Mask IoU" (AD-Copilot,
  arXiv:2603.13779: both sets of boxes are turned into binary masks and IoU is taken in mask space), computed here
  exactly from the rectangles. No box is paired with another, so one box around two close scratches and two boxes
  around them score alike; a photo the model drew no box on has IoU 0.
- **ACC@IoU t** (t = 0.5, MMAD's headline, and 0.3): the share of NG photos whose IoU is at least t.
- **Mean IoU**: the mean of the photos' IoU (MMAD's mIoU).
- **Pointing**: the share of true boxes that hold the centre of at least one of the model's boxes (edges count as
  inside). The truth is the boxes, not the mask: a thin diagonal scratch's box is mostly clean surface, so
  this is looser than "inside the mask" (the report is rebuilt from results.json alone, which carries no masks).
- **Stray boxes per NG photo**: the model's boxes on NG photos whose centre lies in no true box. Pointing alone
  would reward a model that covers the photo with boxes; this number, the false alarms and the IoU (a box over
  everything has the IoU of the defect's share of the photo) do not.
- **False alarms per OK photo**: the model's boxes per OK photo, and the share of OK photos with any box.

Every share is k/n with its 95% Wilson interval (`metrics.proportion`); the mean IoU carries a normal-theory 95%
interval of a mean (mean ± 1.96 standard errors, kept in [0, 1]), which is rough below some 30 photos. Photos,
not boxes, are the unit of ACC@IoU and mean IoU; pointing counts boxes, whose Wilson interval treats the boxes of
one photo as independent and so is a little narrow on photos with several defects. Per defect type, the same
measures over the NG photos of each type (the photo's `defect_type`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from vlm_inspect.data.prompts import UNKNOWN_DEFECT
from vlm_inspect.data.sources import Item
from vlm_inspect.evaluation.metrics import NO_OK, Z_95, proportion
from vlm_inspect.evaluation.report import fmt_interval, fmt_pct

Box = Sequence[float]
IOU_THRESHOLDS = (0.5, 0.3)
NO_BOXED_NG = "no NG photo has a defect box or mask to compare boxes with"
SWITCHED_OFF = "switched off (--no-locate)"


# ---------------------------------------------------------------- boxes


def is_box(box: object) -> bool:
    """Four finite numbers with x0 < x1 and y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return False
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        return False
    return box[2] > box[0] and box[3] > box[1]


def true_boxes(defects: Iterable[dict]) -> list[list[float]]:
    """The usable boxes of a photo's defects (a defect without a box, or with an empty one, says nothing of where)."""
    return [[float(v) for v in d["box"]] for d in defects if is_box(d.get("box"))]


def covered_areas(predicted: Sequence[Box], truth: Sequence[Box]) -> tuple[float, float]:
    """(area both sets of boxes cover, area either covers), each set taken as the region its boxes cover.

    Exact: the plane is cut into cells at every box edge; each cell lies wholly inside or outside each box.
    """
    boxes = np.array([*predicted, *truth], dtype=float).reshape(-1, 4)
    if boxes.size == 0:
        return 0.0, 0.0
    xs, ys = np.unique(boxes[:, [0, 2]]), np.unique(boxes[:, [1, 3]])
    cx, cy = (xs[1:] + xs[:-1]) / 2, (ys[1:] + ys[:-1]) / 2
    inside = ((boxes[:, 0, None] <= cx) & (cx <= boxes[:, 2, None]))[:, :, None] & (
        (boxes[:, 1, None] <= cy) & (cy <= boxes[:, 3, None])
    )[:, None, :]  # (box, x cell, y cell)
    in_predicted, in_truth = inside[: len(predicted)].any(0), inside[len(predicted) :].any(0)
    cells = np.diff(xs)[:, None] * np.diff(ys)[None, :]
    return float(cells[in_predicted & in_truth].sum()), float(cells[in_predicted | in_truth].sum())


def region_iou(predicted: Sequence[Box], truth: Sequence[Box]) -> float:
    """IoU of the region the predicted boxes cover with the region the true boxes cover (0 with no prediction).

    Raises:
        ValueError: no true box (a photo without one has nothing to locate).
    """
    if not truth:
        raise ValueError("region_iou needs at least one true box")
    both, either = covered_areas(predicted, truth)
    return both / either if either > 0 else 0.0


def centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def holds(box: Box, point: tuple[float, float]) -> bool:
    """Whether the point lies in the box, edges included."""
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


@dataclass(frozen=True)
class PhotoScore:
    """How a model's boxes on one NG photo compare with its true boxes."""

    iou: float
    pointed: int
    """True boxes holding the centre of at least one predicted box."""
    n_true: int
    n_predicted: int
    stray: int
    """Predicted boxes whose centre lies in no true box."""

    def to_dict(self) -> dict:
        return {
            "iou": round(self.iou, 6),
            "pointed": self.pointed,
            "n_true": self.n_true,
            "n_predicted": self.n_predicted,
            "stray": self.stray,
        }


def score_photo(predicted: Sequence[Box], truth: Sequence[Box]) -> PhotoScore:
    """The model's boxes on one NG photo against its true boxes (at least one)."""
    centres = [centre(box) for box in predicted]
    return PhotoScore(
        iou=region_iou(predicted, truth),
        pointed=sum(any(holds(t, c) for c in centres) for t in truth),
        n_true=len(truth),
        n_predicted=len(predicted),
        stray=sum(not any(holds(t, c) for t in truth) for c in centres),
    )


# ---------------------------------------------------------------- measures over a set


def mean_estimate(values: Sequence[float], reason_if_empty: str) -> dict:
    """{value, low, high, n, reason}: the mean with mean ± 1.96 standard errors kept in [0, 1] (n ≥ 2)."""
    n = len(values)
    if n == 0:
        return {"value": None, "low": None, "high": None, "n": 0, "reason": reason_if_empty}
    mean = float(np.mean(values))
    if n == 1:
        return {"value": mean, "low": None, "high": None, "n": 1, "reason": None}
    half = Z_95 * float(np.std(values, ddof=1)) / math.sqrt(n)
    return {"value": mean, "low": max(0.0, mean - half), "high": min(1.0, mean + half), "n": n, "reason": None}


def per_photo_rate(boxes: int, photos: int, reason_if_empty: str) -> dict:
    """{value, boxes, photos, reason}: boxes per photo (None with the reason when there is no photo)."""
    value = boxes / photos if photos else None
    return {"value": value, "boxes": boxes, "photos": photos, "reason": None if photos else reason_if_empty}


def ng_measures(scores: Sequence[PhotoScore]) -> dict:
    """ACC@IoU, mean IoU, pointing, photos with any box and stray boxes over NG photos' scores."""
    n = len(scores)
    return {
        "n_ng": n,
        "n_true_boxes": sum(s.n_true for s in scores),
        "acc_iou": {
            f"{t:g}": proportion(sum(s.iou >= t for s in scores), n, NO_BOXED_NG).to_dict() for t in IOU_THRESHOLDS
        },
        "mean_iou": mean_estimate([s.iou for s in scores], NO_BOXED_NG),
        "pointing": proportion(sum(s.pointed for s in scores), sum(s.n_true for s in scores), NO_BOXED_NG).to_dict(),
        "ng_photos_with_boxes": proportion(sum(s.n_predicted > 0 for s in scores), n, NO_BOXED_NG).to_dict(),
        "stray_boxes_per_ng_photo": per_photo_rate(sum(s.stray for s in scores), n, NO_BOXED_NG),
    }


def ok_measures(box_counts: Sequence[int]) -> dict:
    """False alarms over OK photos, from the number of boxes the model drew on each."""
    n = len(box_counts)
    return {
        "n_ok": n,
        "false_alarms_per_ok_photo": per_photo_rate(sum(box_counts), n, NO_OK),
        "ok_photos_with_boxes": proportion(sum(c > 0 for c in box_counts), n, NO_OK).to_dict(),
    }


# ---------------------------------------------------------------- evaluate's photos and results


def photo_type(item: Item) -> str:
    return item.defect_type or UNKNOWN_DEFECT


def photos_to_locate(items: Sequence[Item], enabled: bool = True) -> tuple[list[Item], str | None]:
    """The photos each model is asked for boxes: NG photos with a true box, then OK photos; or none and why."""
    if not enabled:
        return [], SWITCHED_OFF
    boxed = [item for item in items if item.label == "NG" and true_boxes(item.defects)]
    if not boxed:
        return [], NO_BOXED_NG
    return boxed + [item for item in items if item.label == "OK"], None


def located_photo(item: Item, defects: list[dict], dropped: int) -> dict:
    """What results.json keeps of one model's boxes on one photo; with its score when the photo is NG."""
    row: dict = {"defects": defects, "dropped": dropped}
    if item.label == "NG":
        row.update(score_photo([d["box"] for d in defects], true_boxes(item.defects)).to_dict())
    return row


def model_measures(items: Sequence[Item], photos: dict[str, dict]) -> dict:
    """Every localization measure of one model, overall and per defect type, from its `located_photo` rows."""
    asked = [item for item in items if item.id in photos]
    ng = [item for item in asked if item.label == "NG"]
    scores = {item.id: _score(photos[item.id]) for item in ng}
    per_type = []
    for kind in sorted({photo_type(item) for item in ng}):
        of_kind = [scores[item.id] for item in ng if photo_type(item) == kind]
        per_type.append({"type": kind, **ng_measures(of_kind)})
    ok_counts = [len(photos[item.id]["defects"]) for item in asked if item.label == "OK"]
    return {
        **ng_measures(list(scores.values())),
        **ok_measures(ok_counts),
        "boxes_dropped": sum(photos[item.id]["dropped"] for item in asked),
        "per_type": per_type,
    }


def _score(row: dict) -> PhotoScore:
    return PhotoScore(row["iou"], row["pointed"], row["n_true"], row["n_predicted"], row["stray"])


def localization_results(
    items: Sequence[Item], located: dict[str, dict], names: dict[str, str], reason: str | None
) -> dict:
    """results.json's `localization` block.

    Args:
        items: every evaluated photo.
        located: per model key ("tuned", "base", "compare-N"): {"question": the locate question asked,
            "photos": {item id: `located_photo` row}}.
        names: each model key's display name.
        reason: why localization was not measured (`photos_to_locate`), or None.
    """
    asked, _ = photos_to_locate(items, reason is None)
    return {
        "reason": reason,
        "iou_thresholds": list(IOU_THRESHOLDS),
        "n_ng": sum(item.label == "NG" for item in asked),
        "n_true_boxes": sum(len(true_boxes(item.defects)) for item in asked if item.label == "NG"),
        "n_ok": sum(item.label == "OK" for item in asked),
        "questions": {key: block["question"] for key, block in located.items()},
        "models": {
            key: {"name": names.get(key, key), **model_measures(items, block["photos"])}
            for key, block in located.items()
        },
    }


def photo_rows(item_id: str, located: dict[str, dict]) -> dict | None:
    """One photo's boxes from every model that located it (results.json `images[].located`), None if none did."""
    rows = {key: block["photos"][item_id] for key, block in located.items() if item_id in block["photos"]}
    return rows or None


def summary_rows(results: dict, models: Sequence[str] = ("base", "tuned")) -> list[tuple[str, list[str]]]:
    """Rows of the console table: (title, one cell per model), or one row saying why nothing was measured."""
    block = results.get("localization") or {"reason": "not in this results.json"}
    if block["reason"]:
        return [("boxes", [f"not measured: {block['reason']}", *[""] * (len(models) - 1)])]
    measured = [block["models"][m] for m in models]
    return [
        ("ACC@IoU 0.5 (boxes)", [_share(m["acc_iou"]["0.5"]) for m in measured]),
        ("pointing (boxes)", [_share(m["pointing"]) for m in measured]),
        ("false boxes / OK photo", [_rate(m["false_alarms_per_ok_photo"]) for m in measured]),
    ]


def _share(est: dict) -> str:
    return "–" if est["value"] is None else f"{fmt_pct(est['value'])} {fmt_interval(est)}"


def _rate(rate: dict) -> str:
    return "–" if rate["value"] is None else f"{rate['value']:.2f} ({rate['boxes']}/{rate['photos']})"
