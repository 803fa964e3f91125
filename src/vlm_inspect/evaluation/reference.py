"""What the reference buys: the same models judged with and without their known-good references, on the same photos.

`evaluate` scores every photo with each model's references (the run's, or `--reference`); this section scores the
main question again with the photo alone (`NO_REFERENCE`), so a team sees on its own photos what the golden sample
changes: accuracy, escape, overkill and AUC side by side, and the tuned model's boxes with and without
(evaluation/localization.py's measures on the first `MAX_LOCATED` boxed NG photos and as many OK photos). The
scores and boxes with references are the ones results.json already holds; only the runs without are new. A model trained with references and asked without them is off its
training: the "without" rows say how much it leans on the reference; a run prepared with `--reference none` is the
baseline of what a model without references would do.

results.json → `reference`:

```
reference   {question, reason, thumbnails: [{file, uri}],
             rows: [{key, name, with_reference, reference, metrics: BLOCK, localization, p_ng}]}
  localization  LOC (localization.py's measures, per_type left out; the tuned model only) | null
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
from vlm_inspect.evaluation.localization import located_photo, model_measures, true_boxes
from vlm_inspect.evaluation.metrics import score_metrics

CHUNK = 64
"""Photos held in memory at once."""
THUMBNAIL_SIDE = 256
MAX_LOCATED = 24
"""Most boxed NG photos, and OK photos, whose boxes the tuned model is asked for again without its references (a
generation each)."""


def reference_comparison(
    sessions: Iterator[tuple[str, Any, dict]],
    items: Sequence[Any],
    question: Any,
    results: dict,
    settings: Any,
    located: dict | None = None,
) -> dict:
    """The with/without rows of each model `sessions` yields (evaluate's `model_sessions`: tuned, then base).

    Args:
        sessions: (key, predictor, info) per model, loaded one at a time.
        items: The labelled photos, in results' order.
        question: The main question (its `id` and `text`).
        results: results.json so far: its images hold the scores with references.
        settings: The evaluate settings (threshold, max_escape, batch_size, max_new_tokens).
        located: evaluate's boxes per model key (`{"photos": {item id: located_photo row}}`), asked with the
            references; the tuned model's are compared with its boxes asked again without them.
    """
    labels = [item.label for item in items]
    with_boxes = (located or {}).get("tuned", {}).get("photos") or {}
    boxed = [i for i in items if i.label == "NG" and true_boxes(i.defects) and i.id in with_boxes][:MAX_LOCATED]
    asked = boxed + [i for i in items if i.label == "OK" and i.id in with_boxes][:MAX_LOCATED] if boxed else []
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
                    "localization": _localization(predictor, asked, used, with_boxes, settings)
                    if key == "tuned"
                    else None,
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


def _localization(predictor: Any, items: Sequence[Any], reference: Any, with_boxes: dict, settings: Any) -> dict | None:
    """The tuned model's localization measures on `items`: from evaluate's boxes with its references, or asked again
    with `reference` (the photo alone); None without boxed NG photos. The base is not asked again: evaluate's own
    localization table has it."""
    if not items:
        return None
    if reference:
        photos = {item.id: with_boxes[item.id] for item in items}
    else:
        photos = {}
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            images = [load_image(item.path) for item in chunk]
            answers = predictor.locate(images, settings.max_new_tokens, settings.batch_size, reference=reference)
            for item, answer in zip(chunk, answers, strict=True):
                photos[item.id] = located_photo(item, answer.defects, answer.boxes_dropped)
    measures = model_measures(items, photos)
    measures.pop("per_type")
    return measures


def reference_table(section: dict) -> Table:
    """The section's rows for the console: each model with and without its references."""
    table = Table(title="What the reference buys (the main question)")
    for column in ("model", "judged against", "accuracy", "escape", "overkill", "ROC AUC", "ACC@IoU 0.5, pointing"):
        table.add_column(column, justify="left" if column in ("model", "judged against") else "right")
    for row in section["rows"]:
        m, loc = row["metrics"], row["localization"]
        against = ", ".join(p["file"] for p in row["reference"]["photos"]) if row["reference"] else "the photo alone"
        cells = [_pct(m[k]["value"]) for k in ("accuracy", "escape_rate", "overkill_rate")]
        auc = "–" if m["auc"]["value"] is None else f"{m['auc']['value']:.3f}"
        found = f"{_pct(loc['acc_iou']['0.5']['value'])}, {_pct(loc['pointing']['value'])}" if loc else "–"
        table.add_row(f"{row['key']}: {row['name']}", against, *cells, auc, found)
    return table


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"
