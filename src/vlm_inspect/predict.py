"""`vlm-inspect predict`: score (and describe) photos with a base, tuned or merged model; one row per photo.

Scoring is one forward pass; `--describe` adds each photo's answer and `--locate` asks for its defects' boxes
alone; either fills `defects` (`[{"type", "box": [x0, y0, x1, y1]}]` in the photo's pixels) and `boxes_dropped`.
Each row says which known-good references its verdict was judged against (`reference`: the run's by default,
`--reference` for others or `none`; null without).

Run as: vlm-inspect predict --model M [--adapter A] PHOTOS... --out preds.jsonl
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from vlm_inspect.config import PredictConfig, require
from vlm_inspect.data.safe_read import show_path
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.inference import Predictor
from vlm_inspect.outputs import file_replace_problems


def validate(cfg: PredictConfig) -> None:
    problems = cfg.model_problems() + require(cfg, "paths", "out")
    if not 0 <= cfg.threshold <= 1:
        problems.append(f"threshold: {cfg.threshold} is not in [0, 1]")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        problems.append("batch_size and max_new_tokens must be at least 1")
    if Path(cfg.out).suffix not in (".jsonl", ".csv"):
        problems.append(f"out: {cfg.out} must end in .jsonl or .csv")
    problems += file_replace_problems(cfg.out, cfg.overwrite, cfg.paths, ('{"path"', "path,verdict"))
    if problems:
        raise ConfigError(problems)


def predict(cfg: PredictConfig) -> Path:
    """Score (and describe) every image under cfg.paths; one row per image, errors in their row."""
    from rich.progress import Progress

    from vlm_inspect.data.images import find_images, load_image

    validate(cfg)
    paths = find_images(cfg.paths)
    if not paths:
        raise DataError(f"no images found under {', '.join(map(show_path, cfg.paths))}")
    predictor = Predictor.load(cfg)
    print(f"judged against references: {predictor.reference.label()}")
    rows: list[dict] = []
    with Progress() as progress:
        task = progress.add_task("inspecting", total=len(paths))
        for start in range(0, len(paths), cfg.batch_size):
            rows.extend(_predict_batch(predictor, paths[start : start + cfg.batch_size], cfg, load_image))
            progress.advance(task, len(paths[start : start + cfg.batch_size]))
    out = write_rows(rows, Path(cfg.out))
    n_ng = sum(r["verdict"] == "NG" for r in rows)
    n_err = sum(r["verdict"] == "ERROR" for r in rows)
    print(f"{len(rows)} images: {n_ng} NG, {len(rows) - n_ng - n_err} OK, {n_err} unreadable → {show_path(out)}")
    return out


def _predict_batch(predictor: Predictor, paths: list[Path], cfg: PredictConfig, load_image: Any) -> list[dict]:
    images, rows = [], []
    for path in paths:
        try:
            images.append(load_image(path))
            rows.append({"path": show_path(path)})
        except DataError as err:
            rows.append({"path": show_path(path), "verdict": "ERROR", "p_ng": None, "error": str(err)})
    good = [r for r in rows if "error" not in r]
    if not good:
        return rows
    start = time.perf_counter()
    p_ng = predictor.score(images, cfg.question, batch_size=len(images))
    answers = predictor.answers(images, cfg.question, cfg.max_new_tokens, len(images)) if cfg.describe else None
    located = predictor.locate(images, cfg.max_new_tokens, len(images)) if cfg.locate else None
    ms = 1000 * (time.perf_counter() - start) / len(images)
    for i, row in enumerate(good):
        row.update(verdict="NG" if p_ng[i] >= cfg.threshold else "OK", p_ng=round(p_ng[i], 6), ms=round(ms, 1))
        row["reference"] = predictor.reference.record()
        if answers is not None:
            row["description"] = answers[i].text
        boxed = located[i] if located is not None else answers[i] if answers is not None else None
        if boxed is not None:  # boxes in the photo's pixels; the locate answer's when asked for
            row.update(defects=boxed.defects, boxes_dropped=boxed.boxes_dropped)
    return rows


def write_rows(rows: list[dict], out: Path) -> Path:
    """Rows as JSON lines or CSV, written to a temporary file and renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".csv":
        fields = ["path", "verdict", "p_ng", "description", "defects", "boxes_dropped", "reference", "ms", "error"]
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: spreadsheet_safe(_cell(v)) for k, v in row.items()} for row in rows)
    else:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _cell(value: Any) -> Any:
    """A CSV cell: the defects list and the reference record as their JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text cell starting like a formula (= + - @ tab CR) gets a leading `'`, so a spreadsheet shows it
    instead of running it (a photo named `=HYPERLINK(...).png`); numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value
