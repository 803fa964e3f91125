"""`vlm-inspect evaluate`: the base and the tuned model on the same labelled photos, before vs after.

Both models answer the training wordings of the verdict question and held-out wordings they never
saw. Everything measured goes into results.json first; report.html is then rendered from that
file alone, so a report can always be rebuilt or audited from its data.

Run as: vlm-inspect evaluate --model BASE --adapter RUN --data DATASET --out REPORT
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import gc
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import vlm_inspect
from vlm_inspect.config import EvaluateConfig, require, save_config
from vlm_inspect.data.images import exif_size, load_image
from vlm_inspect.data.prompts import load_prompts, parse_verdict
from vlm_inspect.data.sources import Item, load_items
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.evaluation.localization import (
    localization_results,
    located_photo,
    photo_rows,
    photos_to_locate,
    summary_rows,
)
from vlm_inspect.evaluation.metrics import score_metrics, verdicts
from vlm_inspect.evaluation.reference import reference_comparison, reference_table
from vlm_inspect.evaluation.report import fmt_interval, fmt_pct, write_report
from vlm_inspect.evaluation.views import model_view
from vlm_inspect.evaluation.views import warning as view_warning
from vlm_inspect.folders import DatasetFacts, DatasetFolder, ModelFolder, RunFolder
from vlm_inspect.inference import Predictor, trained_reference, trained_with
from vlm_inspect.outputs import check_replaceable, staged_output

RESULTS_VERSION = 2
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
THUMBNAIL_SIDE = 256
# Images held in memory at once while scoring: bounds RAM on large sets of big photos.
IMAGES_PER_CHUNK = 64
MODELS = ("tuned", "base")  # tuned first: its mistakes choose the gallery

console = Console()


@dataclass(frozen=True)
class Question:
    """A wording of the verdict question; kind is training, heldout or extra (from --questions)."""

    id: str
    text: str
    kind: str
    default: bool = False


def evaluate(cfg: EvaluateConfig) -> Path:
    """Compare base and tuned models on labelled photos; write results.json, then report.html from it.

    With `adapter`, one model is loaded and the base is the same weights with the adapter
    switched off. With a merged `model`, `base` names the base folder and two models are
    loaded one after the other.

    Args:
        cfg: the evaluate settings.

    Returns:
        The report folder (holding results.json, report.html and config.yaml).

    Raises:
        ConfigError: listing every bad setting.
        OutputExistsError: the report folder exists and overwrite is off.
        DataError: the data cannot be read or holds no usable labelled photo.
        ModelFolderError: a model or adapter folder cannot be loaded.
    """
    validate(cfg)
    items, left_out = load_items(Path(cfg.data))
    items, skipped, thumbnails = check_images(items)
    skipped = left_out + skipped
    questions = build_questions(cfg)
    console.print(
        f"evaluating {len(items)} photos ({sum(i.label == 'OK' for i in items)} OK, "
        f"{sum(i.label == 'NG' for i in items)} NG) × {len(questions)} questions × base and tuned"
    )
    if not cfg.adapter:
        console.print(f"[bold]merged model[/]: 'after' is {cfg.model}, 'before' is the separate base {cfg.base}")
    scores, answers, models, gallery, located = score_both_models(cfg, items, questions)
    results = build_results(cfg, items, skipped, questions, scores, answers, models, gallery, thumbnails)
    results["comparison"] = compare_models(cfg, items, questions[0], results, located)
    add_localization(cfg, items, located, results)
    results["reference"] = reference_section(cfg, items, questions[0], results, located)
    out = write_outputs(cfg, results)
    print_summary(results, out)
    return out


# ---------------------------------------------------------------- settings


def validate(cfg: EvaluateConfig) -> None:
    """Raise one ConfigError listing every bad setting; OutputExistsError for an existing report."""
    problems = cfg.model_problems() + require(cfg, "data", "out")
    problems += [f"compare: {spec!r} is not MODEL or MODEL,ADAPTER" for spec in cfg.compare if not spec.split(",")[0]]
    if cfg.adapter and cfg.base:
        problems.append(
            "adapter and base: give one. With --adapter, --model is the base and the adapter is switched off "
            "for 'before'; with a merged --model, --base is the 'before' model"
        )
    if cfg.model and not cfg.adapter and not cfg.base:
        problems.append(
            f"base: required when --model has no --adapter. If {cfg.model} is a merged (tuned) model, the "
            "'before' needs the original model: pass --base BASE_FOLDER; otherwise pass --adapter RUN"
        )
    if not 0.0 <= cfg.max_escape <= 1.0:
        problems.append(f"max_escape: {cfg.max_escape} is not between 0 and 1")
    if not 0.0 <= cfg.threshold <= 1.0:
        problems.append(f"threshold: {cfg.threshold} is not between 0 and 1")
    if cfg.batch_size < 1:
        problems.append(f"batch_size: {cfg.batch_size} must be at least 1")
    if cfg.max_new_tokens < 1:
        problems.append(f"max_new_tokens: {cfg.max_new_tokens} must be at least 1")
    if cfg.gallery_size < 0:
        problems.append(f"gallery_size: {cfg.gallery_size} must be 0 or more")
    if cfg.data and not Path(cfg.data).exists():
        problems.append(f"data: {cfg.data} does not exist")
    if cfg.questions and not Path(cfg.questions).is_file():
        problems.append(f"questions: {cfg.questions} is not a file")
    if problems:
        raise ConfigError(problems)
    check_replaceable(cfg.out, cfg.overwrite, (cfg.model, cfg.adapter, cfg.base, cfg.data, cfg.questions))


# ---------------------------------------------------------------- data


def check_images(items: list[Item]) -> tuple[list[Item], list[dict], dict[str, str]]:
    """Decode every photo once: unreadable ones are skipped with their reason; thumbnails are made here."""

    good, skipped, thumbnails = [], [], {}
    for item in items:
        try:
            image = load_image(item.path)
        except DataError as err:
            skipped.append({"path": item.shown_path, "reason": str(err)})
            continue
        thumbnails[item.id] = thumbnail_uri(image)
        good.append(item)
    if not good:
        raise DataError(f"none of the {len(items)} photos could be read (first: {skipped[0]['reason']})")
    for s in skipped:
        console.print(f"[yellow]skipped[/] {s['path']}: {s['reason']}")
    return good, skipped, thumbnails


def thumbnail_uri(image: Image.Image, side: int = THUMBNAIL_SIDE) -> str:
    """A small JPEG data URI of the photo; the report draws the true and predicted boxes over it (from the
    photo's `size` and boxes in results.json)."""
    scale = min(1.0, side / max(image.size))
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_questions(cfg: EvaluateConfig) -> list[Question]:
    """Training wordings (the first is the default), held-out wordings, then the --questions file's."""
    training, heldout = prompt_questions(cfg)
    extra = read_questions_file(Path(cfg.questions)) if cfg.questions else []
    questions: list[Question] = []
    seen: set[str] = set()
    for kind, texts in (("training", training), ("heldout", heldout), ("extra", extra)):
        for text in texts:
            if text not in seen:
                seen.add(text)
                questions.append(Question(f"q{len(questions)}", text, kind, default=not questions))
    return questions


def prompt_questions(cfg: EvaluateConfig) -> tuple[list[str], list[str]]:
    """The verdict and held-out wordings, with the product word filled in.

    A prepared dataset's manifest records the wordings it was made with (a user may have edited prompts.yaml);
    else the tuned model's run recorded those of its own dataset; else the shipped templates are used."""
    facts = _dataset_facts(Path(cfg.data))
    if not facts.verdict_questions and cfg.model:
        facts = facts.or_else(trained_with(cfg, ModelFolder.open(cfg.model))[1])
    if facts.verdict_questions and facts.heldout_questions:
        return list(facts.verdict_questions), list(facts.heldout_questions)
    prompts = load_prompts(facts.language or "en")
    product = facts.product or prompts.default_product
    return (
        [q.format(product=product) for q in prompts.verdict_questions],
        [q.format(product=product) for q in prompts.heldout_questions],
    )


def _dataset_facts(data: Path) -> DatasetFacts:
    """The facts a prepared dataset's manifest records; defaults for class folders."""
    if data.is_dir() and not (data / DatasetFolder.TRAIN).is_file():
        return DatasetFacts()
    return DatasetFolder.open(data).facts()


def read_questions_file(path: Path) -> list[str]:
    """One question per line; blank lines and lines starting with # are ignored."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    questions = [line for line in lines if line and not line.startswith("#")]
    if not questions:
        raise DataError(f"{path}: holds no questions (one per line)")
    return questions


# ---------------------------------------------------------------- models


def model_sessions(cfg: EvaluateConfig) -> Iterator[tuple[str, Any, dict]]:
    """("tuned", predictor, info), then ("base", predictor, info) with the base active.

    One set of weights when there is an adapter; a merged model and its base are loaded one after the other
    so only one is in memory at a time, the base with every model setting of the tuned one (the same device,
    precision and image-token budget: both see the photos alike).
    """
    if cfg.adapter:
        predictor = Predictor.load(cfg)
        yield "tuned", predictor, {"model": cfg.model, "adapter": cfg.adapter, "how": "model + adapter"}
        with predictor.adapter_disabled():
            info = {"model": cfg.model, "adapter": None, "how": "same weights, adapter switched off"}
            yield "base", predictor, {"name": Path(cfg.model).name, **info}
        return
    tuned = Predictor.load(cfg)
    yield "tuned", tuned, {"model": cfg.model, "adapter": None, "how": "merged model folder"}
    base_settings = dataclasses.replace(tuned.settings, model=cfg.base, adapter=None)
    reference = tuned.reference
    del tuned
    _free_memory()
    base = Predictor.load(base_settings)
    base.reference = reference  # judged against what the tuned model is
    yield "base", base, {"model": cfg.base, "adapter": None, "how": "separate base folder (--base)"}


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_both_models(
    cfg: EvaluateConfig, items: list[Item], questions: list[Question]
) -> tuple[dict, dict, dict, list[str], dict]:
    """Scores of every image for every question and model, greedy answers for the gallery, and located boxes.

    Returns:
        scores[model][question id] → p(NG) per item; answers[model][item id] → text;
        models[model] → name and how it was loaded; the gallery's item ids; located[model] → `locate_items`
        (no key when localization is not measured).
    """
    scores: dict[str, dict[str, list[float]]] = {}
    answers: dict[str, dict[str, str]] = {}
    models: dict[str, dict] = {}
    gallery: list[str] = []
    located: dict[str, dict] = {}
    default = questions[0]
    asked, _ = photos_to_locate(items, cfg.locate)
    with _progress() as progress:
        for key, predictor, info in model_sessions(cfg):
            models[key] = {"name": info.pop("name", predictor.name), **info, "view": model_view(predictor, items)}
            task = progress.add_task(f"{key}: scoring", total=len(items) * len(questions))
            scores[key] = score_items(
                predictor, items, questions, cfg.batch_size, lambda n, t=task: progress.advance(t, n)
            )
            if key == "tuned":  # always first, so the base answers the same gallery
                gallery = choose_gallery(items, scores[key][default.id], cfg.threshold, cfg.gallery_size)
            shown = [i for i in items if i.id in set(gallery)]
            progress.update(task, description=f"{key}: answering", total=len(items) * len(questions) + len(shown))
            answers[key] = describe_items(predictor, shown, default.text, cfg, lambda n, t=task: progress.advance(t, n))
            if asked:
                boxes = progress.add_task(f"{key}: locating", total=len(asked))
                located[key] = locate_items(predictor, asked, cfg, lambda n, t=boxes: progress.advance(t, n))
            # Drop our reference before the next model loads, so a merged model and its base never share memory.
            del predictor
    return scores, answers, models, gallery, located


def compare_models(
    cfg: EvaluateConfig, items: list[Item], question: Question, results: dict, located: dict
) -> list[dict]:
    """Rows of the side-by-side table: the tuned model, the base, then each `--compare` model scored on the same
    photos with the main question (loaded one at a time); each compare model's boxes are added to `located`."""
    labels = [item.label for item in items]
    rows = [
        {"key": m, **results["models"][m], "metrics": results["metrics"][m][question.id]} for m in ("tuned", "base")
    ]
    for n, spec in enumerate(cfg.compare, start=1):
        model, _, adapter = spec.partition(",")
        # Every model setting but the folders is the tuned model's (device, precision, image_max_tokens).
        predictor = Predictor.load(dataclasses.replace(cfg.model_settings(), model=model, adapter=adapter or None))
        console.print(f"comparing {predictor.name}: scoring {len(items)} photos")
        p_ng = score_items(predictor, items, [question], cfg.batch_size, lambda _n: None)[question.id]
        asked, _ = photos_to_locate(items, cfg.locate)
        if asked:
            located[f"compare-{n}"] = locate_with_bar(predictor, asked, cfg, f"compare-{n}: locating")
        info = {"name": predictor.name, "model": model, "adapter": adapter or None, "how": "--compare"}
        rows.append(
            {
                "key": f"compare-{n}",
                **info,
                "view": model_view(predictor, items),
                "metrics": score_metrics(p_ng, labels, cfg.threshold, cfg.max_escape),
                "p_ng": [round(p, 6) for p in p_ng],
            }
        )
        del predictor
        _free_memory()
    for row in rows[:1] + rows[2:]:  # the base sees what the tuned model sees
        note = view_warning(row["view"], row["name"])
        if note:
            console.print(f"[yellow]warning:[/] {escape(note)}")
    return rows


def reference_section(cfg: EvaluateConfig, items: list[Item], question: Question, results: dict, located: dict) -> dict:
    """The tuned and base models with and without their references side by side (evaluation/reference.py); the
    models are loaded again, only when the tuned one has references."""
    if not trained_reference(cfg, ModelFolder.open(cfg.model)):
        reason = "the tuned model has no references (prepare the data with a reference/ folder or reference=ok)"
        return {"question": question.id, "reason": reason, "rows": []}
    console.print(f"scoring {len(items)} photos without references, beside the scores with them")
    section = reference_comparison(model_sessions(cfg), items, question, results, cfg, located)
    console.print(reference_table(section))
    return section


def score_items(
    predictor: Any, items: list[Item], questions: list[Question], batch_size: int, advance: Any
) -> dict[str, list[float]]:
    """p(NG) of every item for every question, loading photos a chunk at a time."""
    out: dict[str, list[float]] = {q.id: [] for q in questions}
    for chunk in _chunks(items, IMAGES_PER_CHUNK):
        images = [_load(item) for item in chunk]
        for q in questions:
            out[q.id].extend(predictor.score(images, q.text, batch_size=batch_size))
            advance(len(chunk))
    return out


def describe_items(predictor: Any, items: list[Item], question: str, cfg: EvaluateConfig, advance: Any) -> dict:
    """Greedy answers to the default question, keyed by item id."""
    answers: dict[str, str] = {}
    for chunk in _chunks(items, IMAGES_PER_CHUNK):
        images = [_load(item) for item in chunk]
        texts = predictor.describe(images, question, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        answers.update(zip((item.id for item in chunk), texts, strict=True))
        advance(len(chunk))
    return answers


def locate_items(predictor: Any, items: list[Item], cfg: EvaluateConfig, advance: Any) -> dict:
    """Each photo's boxes from the model's answer to its locate question (one generation per photo), with each NG
    photo's score against its true boxes: {"question", "photos": {item id: row}} (see `localization.located_photo`)."""
    photos: dict[str, dict] = {}
    for chunk in _chunks(items, IMAGES_PER_CHUNK):
        images = [_load(item) for item in chunk]
        found = predictor.locate(images, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        for item, answer in zip(chunk, found, strict=True):
            photos[item.id] = located_photo(item, answer.defects, answer.boxes_dropped)
        advance(len(chunk))
    return {"question": predictor.locate_question, "photos": photos}


def locate_with_bar(predictor: Any, items: list[Item], cfg: EvaluateConfig, title: str) -> dict:
    """`locate_items` with a progress bar of its own."""
    with _progress() as progress:
        task = progress.add_task(title, total=len(items))
        return locate_items(predictor, items, cfg, lambda n: progress.advance(task, n))


def choose_gallery(items: list[Item], p_ng: list[float], threshold: float, size: int) -> list[str]:
    """Item ids to describe: the tuned model's mistakes first, then OK and NG photos in turn."""
    called = verdicts(p_ng, threshold)
    wrong = [item.id for item, v in zip(items, called, strict=True) if v != item.label]
    rest_ok = [item.id for item, v in zip(items, called, strict=True) if v == item.label and item.label == "OK"]
    rest_ng = [item.id for item, v in zip(items, called, strict=True) if v == item.label and item.label == "NG"]
    interleaved = [i for pair in zip(rest_ng, rest_ok, strict=False) for i in pair]
    longer = rest_ng if len(rest_ng) > len(rest_ok) else rest_ok
    interleaved += longer[min(len(rest_ng), len(rest_ok)) :]
    return (wrong + interleaved)[:size]


def _progress() -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console)


def _chunks(items: list[Item], n: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), n):
        yield items[start : start + n]


def _load(item: Item) -> Image.Image:
    return load_image(item.path)


# ---------------------------------------------------------------- results


def build_results(
    cfg: EvaluateConfig,
    items: list[Item],
    skipped: list[dict],
    questions: list[Question],
    scores: dict,
    answers: dict,
    models: dict,
    gallery: list[str],
    thumbnails: dict[str, str],
) -> dict:
    """The results.json mapping (schema: see the README, "results.json")."""

    labels = [item.label for item in items]
    metrics = {
        m: {q.id: score_metrics(scores[m][q.id], labels, cfg.threshold, cfg.max_escape) for q in questions}
        for m in ("base", "tuned")
    }
    shown = set(gallery)
    images = []
    for n, item in enumerate(items):
        in_gallery = item.id in shown
        row_answers = {m: answers[m].get(item.id, "") for m in ("base", "tuned")} if in_gallery else None
        images.append(
            {
                "id": item.id,
                "path": item.shown_path,
                "label": item.label,
                "defect_type": item.defect_type,
                "defects": item.defects,
                "description": item.description,
                "p_ng": {m: {q.id: round(scores[m][q.id][n], 6) for q in questions} for m in ("base", "tuned")},
                "answers": row_answers,
                "answer_verdicts": {m: parse_verdict(a) for m, a in row_answers.items()} if row_answers else None,
                "thumbnail": thumbnails.get(item.id) if in_gallery else None,
            }
        )
    return {
        "version": RESULTS_VERSION,
        "tool": {"name": "vlm-inspect", "version": vlm_inspect.__version__},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "data": {
            "source": cfg.data,
            "n_images": len(items),
            "n_ok": labels.count("OK"),
            "n_ng": labels.count("NG"),
            "skipped": skipped,
        },
        "models": {m: models[m] for m in ("base", "tuned")},
        "questions": [dataclasses.asdict(q) for q in questions],
        "metrics": metrics,
        "images": images,
        "training": training_rows(cfg.adapter),
    }


def add_localization(cfg: EvaluateConfig, items: list[Item], located: dict, results: dict) -> None:
    """results.json's `localization` block, and each photo's size and every model's boxes on it."""
    _, reason = photos_to_locate(items, cfg.locate)
    names = {row["key"]: row["name"] for row in results["comparison"]}
    results["localization"] = localization_results(items, located, names, reason)
    for image, item in zip(results["images"], items, strict=True):
        with Image.open(item.path) as photo:  # the header only; check_images decoded every photo already
            image["size"] = list(exif_size(photo))
        image["located"] = photo_rows(item.id, located)


def training_rows(adapter: str | None) -> dict:
    """The run's loss per step from its metrics.jsonl, when the adapter is a run's."""
    run = RunFolder.named_by(adapter) if adapter else None
    if run is None or not run.metrics_path.is_file():
        return {"metrics_file": None, "rows": []}
    return {"metrics_file": str(run.metrics_path), "rows": read_loss_rows(run.metrics_path)}


def read_loss_rows(path: Path) -> list[dict]:
    """Rows with a numeric step and loss (other rows, e.g. run summaries, are left out)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        if not isinstance(row, dict):
            continue
        step, loss = row.get("step"), row.get("loss")
        if isinstance(step, (int, float)) and isinstance(loss, (int, float)):
            kept = {"step": step, "loss": loss}
            kept.update({k: row[k] for k in ("lr", "epoch") if isinstance(row.get(k), (int, float))})
            rows.append(kept)
    return rows


def write_outputs(cfg: EvaluateConfig, results: dict) -> Path:
    """results.json, then report.html from it, then config.yaml; built in a temporary sibling and renamed."""
    inputs = (cfg.model, cfg.adapter, cfg.base, cfg.data, cfg.questions)
    with staged_output(cfg.out, cfg.overwrite, "EvaluateConfig", inputs) as tmp:
        (tmp / RESULTS_NAME).write_text(json.dumps(results, indent=1, ensure_ascii=False, allow_nan=False), "utf-8")
        write_report(tmp / RESULTS_NAME, tmp / REPORT_NAME)
        save_config(cfg, tmp)
    return Path(cfg.out)


def print_summary(results: dict, out: Path) -> None:
    """A table of the default question's metrics, base vs tuned, and where the report is."""
    default = next(q for q in results["questions"] if q["default"])
    table = Table(title=f"{results['data']['n_images']} photos · {default['text']}")
    table.add_column("metric")
    for m in ("base", "tuned"):
        table.add_column(f"{m}: {results['models'][m]['name']}", justify="right")
    for key, title in (
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("escape_rate", "escape (NG passed)"),
        ("overkill_rate", "overkill (OK rejected)"),
    ):
        cells = []
        for m in ("base", "tuned"):
            est = results["metrics"][m][default["id"]][key]
            cells.append(f"{fmt_pct(est['value'])} {fmt_interval(est)}" if est["value"] is not None else "–")
        table.add_row(title, *cells)
    table.add_row("ROC AUC", *(_auc_text(results["metrics"][m][default["id"]]) for m in ("base", "tuned")))
    table.add_row("held-out wordings: mean bal. acc.", *(_heldout_mean(results, m) for m in ("base", "tuned")))
    for title, cells in summary_rows(results):
        table.add_row(title, *cells)
    console.print(table)
    console.print(f"report: {out / REPORT_NAME}")


def _auc_text(block: dict) -> str:
    return "–" if block["auc"]["value"] is None else f"{block['auc']['value']:.3f}"


def _heldout_mean(results: dict, model: str) -> str:
    ids = [q["id"] for q in results["questions"] if q["kind"] != "training"]
    values = [results["metrics"][model][i]["balanced_accuracy"]["value"] for i in ids]
    values = [v for v in values if v is not None]
    return fmt_pct(sum(values) / len(values)) if values else "–"
