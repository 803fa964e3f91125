"""What the reference buys: the same models judged with and without their known-good references, on the same photos.

`evaluate` scores every photo with each model's references (the run's, or `--reference`); this section scores the
main question again with the photo alone (`NO_REFERENCE`), so a team sees on its own photos what the golden sample
changes: accuracy, escape, overkill and AUC side by side, and, for NG photos with boxes, how many of their boxes
the tuned model's located answers find (IoU ≥ 0.5) with and without. The scores with references are the ones results.json
already holds; only the runs without are new. A model trained with references and asked without them is off its
training: the "without" rows say how much it leans on the reference; a run prepared with `--reference none` is the
baseline of what a model without references would do.

results.json → `reference`:

```
reference   {question, reason, thumbnails: [{file, uri}],
             rows: [{key, name, with_reference, reference, metrics: BLOCK, localization, p_ng}]}
  localization  {n_photos, n_boxes, found, hit_rate, mean_best_iou} | null     (IoU ≥ 0.5 counts as found)
```
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Sequence
from typing import Any

from rich.table import Table

from vlm_inspect.data.images import load_image
from vlm_inspect.data.reference import NO_REFERENCE
from vlm_inspect.evaluation.metrics import score_metrics

CHUNK = 64
"""Photos held in memory at once."""
IOU_FOUND = 0.5
THUMBNAIL_SIDE = 256
MAX_LOCATED = 24
"""Most boxed NG photos whose boxes the tuned model is asked for (a generation each, with and without references)."""


def reference_comparison(
    sessions: Iterator[tuple[str, Any, dict]],
    items: Sequence[Any],
    question: Any,
    results: dict,
    settings: Any,
) -> dict:
    """The with/without rows of each model `sessions` yields (evaluate's `model_sessions`: tuned, then base).

    Args:
        sessions: (key, predictor, info) per model, loaded one at a time.
        items: The labelled photos, in results' order.
        question: The main question (its `id` and `text`).
        results: results.json so far: its images hold the scores with references.
        settings: The evaluate settings (threshold, max_escape, batch_size, max_new_tokens).
    """
    labels = [item.label for item in items]
    boxed = [item for item in items if item.label == "NG" and any(d.get("box") for d in item.defects)][:MAX_LOCATED]
    boxed = boxed if boxed else None
    rows: list[dict] = []
    thumbnails: list[dict] = []
    for key, predictor, _ in sessions:
        if not predictor.reference:
            return _unavailable(question, f"{predictor.name} has no references: prepare the data with a reference/")
        thumbnails = thumbnails or _thumbnails(predictor.reference)
        with_p = [image["p_ng"][key][question.id] for image in results["images"]]
        without_p = _scores(predictor, items, question.text, settings.batch_size)
        with_metrics = results["metrics"][key][question.id]  # the main table's, from the unrounded scores
        without_metrics = score_metrics(without_p, labels, settings.threshold, settings.max_escape)
        for used, p_ng, metrics in (
            (predictor.reference, with_p, with_metrics),
            (NO_REFERENCE, without_p, without_metrics),
        ):
            rows.append(
                {
                    "key": key,
                    "name": results["models"][key]["name"],
                    "with_reference": bool(used),
                    "reference": used.record(),
                    "metrics": metrics,
                    "localization": _localization(predictor, boxed, used, settings) if key == "tuned" else None,
                    "p_ng": [round(p, 6) for p in p_ng],
                }
            )
        del predictor
    return {"question": question.id, "reason": None, "thumbnails": thumbnails, "rows": rows}


def _thumbnails(reference: Any) -> list[dict]:
    """Small JPEG data URIs of the reference photos, so the report shows them without the run folder."""
    out = []
    for file, image in zip(reference.files, reference.images, strict=True):
        thumb = image.copy()
        thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        thumb.save(buffer, "JPEG", quality=80)
        out.append({"file": file, "uri": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()})
    return out


def _unavailable(question: Any, reason: str) -> dict:
    return {"question": question.id, "reason": reason, "rows": []}


def _scores(predictor: Any, items: Sequence[Any], question: str, batch_size: int) -> list[float]:
    out: list[float] = []
    for start in range(0, len(items), CHUNK):
        images = [load_image(item.path) for item in items[start : start + CHUNK]]
        out += predictor.score(images, question, batch_size=batch_size, reference=NO_REFERENCE)
    return out


def _localization(predictor: Any, items: Sequence[Any] | None, reference: Any, settings: Any) -> dict | None:
    """How many true boxes of the boxed NG photos a located answer finds (IoU ≥ 0.5), and their mean best IoU; None
    without boxed NG photos. The tuned model only: the base was never taught to box."""
    if not items:
        return None
    best: list[float] = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        images = [load_image(item.path) for item in chunk]
        answers = predictor.locate(images, settings.max_new_tokens, settings.batch_size, reference=reference)
        for item, answer in zip(chunk, answers, strict=True):
            found = [d["box"] for d in answer.defects]
            best += [max((iou(d["box"], box) for box in found), default=0.0) for d in item.defects if d.get("box")]
    hits = sum(b >= IOU_FOUND for b in best)
    return {
        "n_photos": len(items),
        "n_boxes": len(best),
        "found": hits,
        "hit_rate": round(hits / len(best), 4) if best else None,
        "mean_best_iou": round(sum(best) / len(best), 4) if best else None,
    }


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two `[x0, y0, x1, y1]` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_table(section: dict) -> Table:
    """The section's rows for the console: each model with and without its references."""
    table = Table(title="What the reference buys (the main question)")
    for column in ("model", "judged against", "accuracy", "escape", "overkill", "ROC AUC", "boxes found"):
        table.add_column(column, justify="left" if column in ("model", "judged against") else "right")
    for row in section["rows"]:
        m, loc = row["metrics"], row["localization"]
        against = ", ".join(p["file"] for p in row["reference"]["photos"]) if row["reference"] else "the photo alone"
        cells = [_pct(m[k]["value"]) for k in ("accuracy", "escape_rate", "overkill_rate")]
        auc = "–" if m["auc"]["value"] is None else f"{m['auc']['value']:.3f}"
        found = f"{loc['found']} of {loc['n_boxes']}" if loc else "–"
        table.add_row(f"{row['key']}: {row['name']}", against, *cells, auc, found)
    return table


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
