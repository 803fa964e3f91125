"""`vlm-inspect prepare`: photo folders → LLaVA conversation datasets (train.json, val.json).

Input layouts, recognised automatically:
- class folders `SRC/ok/…`, `SRC/ng/…` (aliases, any case), NG optionally split into
  defect-type subfolders `SRC/ng/<defect>/…`;
- an MVTec AD category (`train/good`, `test/good`, `test/<defect>`, `ground_truth/<defect>/<stem>_mask.png`);
- an existing LLaVA JSON (`from_llava_json` + `image_folder`).
Per-image sidecars `<stem>.txt` (description) or `<stem>.json` (description and defect boxes)
add detail. Masks and boxes become location words on a 3x3 grid. Folders are read by `folders` and
`mvtec`; nothing outside the named source folders is opened (`safe_read`), and every file left out
is listed in the manifest's `skipped` with its reason.

With known-good references (`reference`: a `reference/` folder beside `ok/` and `ng/`, a folder named, or chosen
among the OK photos; `data/reference_choice.py`) they are copied to `reference/` with its index, listed in the
manifest, and every conversation shows them first and says so in its first question (`reference_intro` of
prompts.yaml); `reference=none` writes the single-photo conversations of a dataset without references.

The dataset is built in a hidden sibling folder and renamed into place at the end; manifest.json is
written last, so a folder with a manifest is complete. Inputs are only ever read.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlm_inspect import __version__
from vlm_inspect.config import PrepareConfig, save_config
from vlm_inspect.data.class_folders import NG_NAMES, OK_NAMES, format_suffix, scan
from vlm_inspect.data.images import load_image, read_file_bytes
from vlm_inspect.data.labelled import LabeledImage, Skipped
from vlm_inspect.data.llava_json import IMAGE_TOKEN, read_llava_json
from vlm_inspect.data.prompts import Prompts, load_prompts, location_word, parse_verdict
from vlm_inspect.data.reference import MAX_REFERENCES, write_reference_folder
from vlm_inspect.data.reference_choice import FOLDER as REFERENCE_FOLDER
from vlm_inspect.data.reference_choice import Chosen, choose_references
from vlm_inspect.data.safe_read import outside_reason, show_path
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.outputs import check_replaceable, staged_output

FEW_VAL_IMAGES = 30
"""Below this many validation images prepare prints the statistical caveat."""


@dataclass
class _Unit:
    """One image file to copy and the samples that use it; the split never separates them."""

    path: Path
    name: str
    stratum: str
    samples: list[dict[str, Any]]


# ---------------------------------------------------------------- public API


def prepare(cfg: PrepareConfig) -> Path:
    """Build a LLaVA conversation dataset from photo folders or an existing LLaVA JSON.

    Args:
        cfg: The settings; see `PrepareConfig`.

    Returns:
        The dataset folder, holding train.json, val.json, images/, config.yaml and manifest.json.

    Raises:
        ConfigError: listing every bad setting.
        OutputExistsError: `out` exists, is not empty, and `overwrite` is off.
        DataError: a class is missing or empty, a sidecar or the LLaVA JSON is malformed.
    """
    _validate(cfg)
    out = Path(cfg.out)
    _refuse_existing(out, cfg.overwrite)
    console = Console()
    prompts = load_prompts(cfg.language, getattr(cfg, "prompts", None))
    product = _product_word(cfg, prompts)
    with console.status("Reading and checking photos..."):
        units, skipped, ignored, source, chosen = _gather(cfg, prompts, product)
    is_val = stratified_split([u.stratum for u in units], cfg.val_fraction, cfg.seed)
    manifest = _manifest(cfg, source, units, is_val, skipped, ignored, prompts.as_dict(product))
    if chosen.photos:
        manifest = _with_references(manifest, chosen, prompts, product)
    _build_then_move(out, lambda tmp: _write_dataset(tmp, cfg, units, is_val, manifest, chosen))
    _print_summary(console, out, units, is_val, skipped, ignored)
    _print_references(console, chosen)
    return out


def stratified_split(strata: list[str], val_fraction: float, seed: int) -> list[bool]:
    """Which items go to validation: `val_fraction` of each stratum, chosen with a seeded shuffle.

    A stratum of two or more items gives at least one to validation and keeps at least one
    for training; a single item always trains.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for index, stratum in enumerate(strata):
        groups[stratum].append(index)
    is_val = [False] * len(strata)
    for stratum, members in groups.items():
        # One generator per stratum: adding photos of one class leaves the split of the others as it was.
        random.Random(f"{seed}/{stratum}").shuffle(members)
        for index in members[: _val_count(len(members), val_fraction)]:
            is_val[index] = True
    return is_val


def _val_count(n: int, val_fraction: float) -> int:
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * val_fraction)))


# ---------------------------------------------------------------- settings and output folder


def _validate(cfg: PrepareConfig) -> None:
    problems = _input_problems(cfg)
    if not cfg.out:
        problems.append("out: required (the dataset folder to create)")
    elif Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        problems.append(f"out: {cfg.out} exists and is not a folder")
    if not 0 <= cfg.val_fraction < 1:
        problems.append(f"val_fraction: {cfg.val_fraction} must be at least 0 and below 1")
    if cfg.language not in ("en", "zh"):
        problems.append(f"language: {cfg.language!r} is not en or zh")
    if cfg.max_image_pixels <= 0:
        problems.append(f"max_image_pixels: {cfg.max_image_pixels} must be positive")
    problems += _reference_problems(cfg)
    problems += _name_problems(cfg)
    problems += _overlap_problems(cfg)
    if problems:
        raise ConfigError(problems)


def _input_problems(cfg: PrepareConfig) -> list[str]:
    if not cfg.from_llava_json:
        problems = [] if cfg.src else ["src: required (a photo folder), unless from_llava_json is given"]
        if cfg.src and not Path(cfg.src).is_dir():
            problems.append(f"src: {cfg.src} is not a folder")
        if cfg.image_folder:
            problems.append("image_folder: only used together with from_llava_json")
        return problems
    problems = ["src and from_llava_json: give one of them, not both"] if cfg.src else []
    if not Path(cfg.from_llava_json).is_file():
        problems.append(f"from_llava_json: {cfg.from_llava_json} is not a file")
    if not cfg.image_folder:
        problems.append("image_folder: required with from_llava_json (the folder its image paths are relative to)")
    elif not Path(cfg.image_folder).is_dir():
        problems.append(f"image_folder: {cfg.image_folder} is not a folder")
    return problems


def _reference_problems(cfg: PrepareConfig) -> list[str]:
    problems = []
    if not 1 <= cfg.reference_count <= MAX_REFERENCES:
        problems.append(f"reference_count: {cfg.reference_count} is not between 1 and {MAX_REFERENCES}")
    if cfg.from_llava_json and cfg.reference not in ("auto", "none"):
        problems.append(
            "reference: references are added to class folders (a reference/ folder or reference=ok), not to an "
            "existing LLaVA JSON, whose conversations are kept as they are"
        )
    elif cfg.reference not in ("auto", "none", "ok") and not Path(cfg.reference).is_dir():
        problems.append(f"reference: {cfg.reference} is not auto, ok, none or a folder of known-good photos")
    return problems


def _name_problems(cfg: PrepareConfig) -> list[str]:
    ok = {n.lower() for n in (*OK_NAMES, *cfg.ok_names)}
    ng = {n.lower() for n in (*NG_NAMES, *cfg.ng_names)}
    return [f"ok_names/ng_names: {name!r} would mean both OK and NG" for name in sorted(ok & ng)]


def _overlap_problems(cfg: PrepareConfig) -> list[str]:
    """Out may not sit inside an input (that would modify it) nor hold one (overwrite would delete it)."""
    if not cfg.out:
        return []
    out = Path(cfg.out).resolve()
    problems = []
    for name in ("src", "image_folder"):
        value = getattr(cfg, name)
        if not value:
            continue
        source = Path(value).resolve()
        if out == source or source in out.parents or out in source.parents:
            problems.append(
                f"out: {cfg.out} overlaps {name} {value}; write the dataset next to the photos, not among them"
            )
    return problems


def _refuse_existing(out: Path, overwrite: bool) -> None:
    check_replaceable(out, overwrite)  # before any photo is read: a refusal comes at once


def _product_word(cfg: PrepareConfig, prompts: Prompts) -> str:
    # The setting's default "product" is English; other languages use their own default word.
    word = (cfg.product or "").strip()
    return prompts.default_product if word in ("", "product") else word


def _build_then_move(out: Path, build: Callable[[Path], None]) -> None:
    """Build in a hidden sibling, then rename into place; an error or interrupt removes the partial build."""
    with staged_output(out, True, "PrepareConfig") as tmp:  # _refuse_existing checked --overwrite
        build(tmp)


# ---------------------------------------------------------------- conversations


def _gather(
    cfg: PrepareConfig, prompts: Prompts, product: str
) -> tuple[list[_Unit], list[Skipped], list[Path], dict[str, Any], Chosen]:
    if cfg.from_llava_json:
        units, skipped = _llava_units(Path(cfg.from_llava_json), Path(cfg.image_folder or ""), cfg.max_image_pixels)
        source = {"layout": "llava_json", "path": show_path(Path(cfg.from_llava_json).resolve())}
        source["image_folder"] = show_path(Path(cfg.image_folder or "").resolve())
        return units, skipped, [], source, Chosen("none")
    src = Path(cfg.src)
    found = scan(src, cfg.ok_names, cfg.ng_names, cfg.max_image_pixels)
    chosen = choose_references(cfg.reference, cfg.reference_count, src, found.images, cfg.max_image_pixels, src)
    ignored = [f for f in found.ignored_folders if not chosen.folder or f.resolve() != chosen.folder.resolve()]
    units = _folder_units(chosen.images, prompts, product, cfg.seed, src, chosen.files)
    source = {"layout": found.layout, "path": show_path(src.resolve())}
    return units, found.skipped + chosen.skipped, ignored, source, chosen


def _folder_units(
    images: list[LabeledImage], prompts: Prompts, product: str, seed: int, src: Path, references: list[str]
) -> list[_Unit]:
    rng = random.Random(f"{seed}-questions")
    verdict_questions = _cycle_shuffled(_weighted_verdict_questions(prompts), rng)
    describe_questions = _cycle_shuffled(list(prompts.describe_questions), rng)
    names = _UniqueNames()
    units = []
    for image in images:
        name = names.new(image.label, image.defect_type, image.suffix)
        turns = conversation(
            image, prompts, product, next(verdict_questions), next(describe_questions), len(references)
        )
        sample = {
            "id": Path(name).stem,
            "image": f"images/{name}",
            **({"reference": list(references)} if references else {}),
            "conversations": turns,
            "label": image.label,
            "defect_type": image.defect_type,
            "defects": image.defects,
            "source": _relative(image.path, src),
        }
        units.append(_Unit(image.path, name, _stratum(image.label, image.defect_type), [sample]))
    return units


def _weighted_verdict_questions(prompts: Prompts) -> list[str]:
    # Predict and serve ask the first question, so it gets about a third of the samples;
    # the paraphrases share the rest so other wordings still work.
    first, others = prompts.verdict_questions[0], list(prompts.verdict_questions[1:])
    return [first] * max(1, len(others) // 2) + others


def _cycle_shuffled(items: list[str], rng: random.Random) -> Iterator[str]:
    """Every item once per round, in a new seeded order each round, so few images still see many wordings."""
    while True:
        yield from rng.sample(items, len(items))


def conversation(
    image: LabeledImage,
    prompts: Prompts,
    product: str,
    verdict_question: str,
    describe_question: str,
    references: int = 0,
) -> list[dict[str, str]]:
    """The turns of one training sample: a verdict, then for NG a description when anything is known.

    Args:
        image: The photo and what is known about it.
        prompts: Templates of the language.
        product: Word for what the photo shows.
        verdict_question: Template of the first question (`{product}` unfilled).
        describe_question: Template of the second question, asked for NG photos.
        references: How many known-good references the sample shows first: one `<image>` each before the photo's,
            and the first question says so.
    """
    located = [(d["type"], location_word(d["box"], image.width, image.height, prompts.language)) for d in image.defects]
    question = verdict_question.format(product=product)
    if references:
        question = prompts.reference_question(verdict_question, references, product)
    turns = [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n" * (references + 1) + question},
        {
            "from": "gpt",
            "value": prompts.verdict_answer(image.label, _verdict_sentence(image, located, prompts, product)),
        },
    ]
    description = _description(image, located, prompts, product)
    if description:
        turns.append({"from": "human", "value": describe_question.format(product=product)})
        turns.append({"from": "gpt", "value": description})
    return turns


def _verdict_sentence(image: LabeledImage, located: list[tuple[str, str]], prompts: Prompts, product: str) -> str:
    if image.label == "OK":
        return prompts.join_sentences([image.description]) if image.description else prompts.ok_sentence(product)
    if located:
        return prompts.defect_sentence(*located[0], product)
    return prompts.defect_sentence(image.defect_type, None, product)


def _description(image: LabeledImage, located: list[tuple[str, str]], prompts: Prompts, product: str) -> str | None:
    """The answer to 'describe the defects': description, count, then each defect with its place."""
    if image.label == "OK":
        return None
    sentences = [image.description] if image.description else []
    if len(located) > 1:
        sentences.append(prompts.several_sentence(len(located)))
    sentences += [prompts.defect_sentence(kind, where, product) for kind, where in located]
    if not located and image.defect_type:
        sentences.append(prompts.defect_sentence(image.defect_type, None, product))
    return prompts.join_sentences(sentences) or None


class _UniqueNames:
    """File names for copies: `ok_0001.jpg`, `ng_scratch_0003.png`, numbered per class and type."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def new(self, label: str | None, defect_type: str | None, suffix: str) -> str:
        prefix = "_".join(p for p in ((label or "sample").lower(), _slug(defect_type or "")) if p)
        self.counts[prefix] += 1
        return f"{prefix}_{self.counts[prefix]:04d}{suffix}"


def _slug(text: str) -> str:
    return re.sub(r"[^\w]+", "_", text.lower()).strip("_")


def _stratum(label: str | None, defect_type: str | None) -> str:
    return f"{label or 'unlabelled'}/{defect_type or ''}"


def _relative(path: Path, root: Path) -> str:
    try:
        return show_path(path.relative_to(root).as_posix())
    except ValueError:
        return show_path(path)


# ---------------------------------------------------------------- existing LLaVA JSON


def _llava_units(json_path: Path, image_folder: Path, max_pixels: int) -> tuple[list[_Unit], list[Skipped]]:
    """Samples of a LLaVA JSON grouped by image bytes; each image is checked by decoding and copied once."""
    by_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in read_llava_json(json_path, image_folder):
        if sample.get("reference"):
            raise DataError(
                f"{show_path(json_path)}: sample {sample.get('id', sample['image'])!r} lists references; prepare "
                "copies photos of a LLaVA JSON but not their references: give class folders with a reference/ folder"
            )
        by_image[sample["image"]].append(sample)
    units: dict[str, _Unit] = {}
    skipped: list[Skipped] = []
    names = _UniqueNames()
    for image_rel, samples in by_image.items():
        path = image_folder / image_rel
        checked = _check_json_image(path, image_folder, max_pixels, len(samples))
        if isinstance(checked, Skipped):
            skipped.append(checked)
            continue
        sha, suffix = checked
        if sha not in units:
            units[sha] = _json_unit(path, image_rel, samples, names, suffix)
            continue
        # Same bytes under another name: one copy, and its samples stay on one side of the split.
        kept = units[sha]
        kept.samples += _relabelled(samples, kept.name, image_rel, first_index=len(kept.samples))
        skipped.append(Skipped(path, f"same bytes as {show_path(kept.path)}", duplicate_of=kept.path))
    if not units:
        raise DataError(f"{show_path(json_path)}: no sample has a usable image ({len(skipped)} skipped)")
    return list(units.values()), skipped


def _check_json_image(path: Path, image_folder: Path, max_pixels: int, n_samples: int) -> tuple[str, str] | Skipped:
    name = show_path(path.name)
    try:
        reason = outside_reason(path, image_folder)
        if reason:
            raise DataError(f"{name}: {reason}")
        data = read_file_bytes(path, name)
        load_image(data, max_pixels, name=name)
    except DataError as err:
        reason = str(err).removeprefix(f"{name}: ")
        return Skipped(path, f"{reason} ({n_samples} sample(s) dropped)")
    return hashlib.sha256(data).hexdigest(), format_suffix(data, path)


def _json_unit(path: Path, image_rel: str, samples: list[dict[str, Any]], names: _UniqueNames, suffix: str) -> _Unit:
    label, defect_type = _sample_label(samples[0]), samples[0].get("defect_type")
    name = names.new(label, defect_type, suffix)
    return _Unit(path, name, _stratum(label, defect_type), _relabelled(samples, name, image_rel))


def _relabelled(samples: list[dict[str, Any]], name: str, image_rel: str, first_index: int = 0) -> list[dict[str, Any]]:
    """Samples pointing at the copy; a label parsed from the first answer is added when missing."""
    out = []
    for k, sample in enumerate(samples, start=first_index):
        new = {**sample, "image": f"images/{name}", "source": sample.get("source", image_rel)}
        new.setdefault("id", f"{Path(name).stem}_{k}")
        label = _sample_label(sample)
        if label:
            new["label"] = label
        out.append(new)
    return out


def _sample_label(sample: dict[str, Any]) -> str | None:
    if sample.get("label") in ("OK", "NG"):
        return sample["label"]
    answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
    return parse_verdict(answers[0]) if answers else None


# ---------------------------------------------------------------- writing


def _write_dataset(
    tmp: Path, cfg: PrepareConfig, units: list[_Unit], is_val: list[bool], manifest: dict, chosen: Chosen
) -> None:
    images = tmp / "images"
    images.mkdir()
    for unit in units:
        # copyfile copies bytes only: the source is opened read-only and never touched.
        shutil.copyfile(unit.path, images / unit.name)
    if chosen.photos:
        write_reference_folder(tmp / REFERENCE_FOLDER, chosen.photos)
    train = [s for unit, val in zip(units, is_val, strict=True) if not val for s in unit.samples]
    val = [s for unit, val in zip(units, is_val, strict=True) if val for s in unit.samples]
    _write_json(tmp / "train.json", train)
    _write_json(tmp / "val.json", val)
    save_config(cfg, tmp)
    # Last: a dataset folder with a manifest is complete.
    _write_json(tmp / "manifest.json", manifest)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _manifest(
    cfg: PrepareConfig,
    source: dict[str, Any],
    units: list[_Unit],
    is_val: list[bool],
    skipped: list[Skipped],
    ignored: list[Path],
    prompts: dict[str, Any],
) -> dict[str, Any]:
    train = [u for u, val in zip(units, is_val, strict=True) if not val]
    val = [u for u, val in zip(units, is_val, strict=True) if val]
    return {
        "tool": "vlm-inspect",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "language": cfg.language,
        "product": prompts["product"],
        "default_question": prompts["default_question"],
        "settings": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "max_image_pixels": cfg.max_image_pixels},
        "counts": _counts(units),
        "split": {"train": _counts(train), "val": _counts(val)},
        "skipped": [{"path": show_path(s.path), "reason": s.reason} for s in skipped if s.duplicate_of is None],
        "duplicates": [
            {"path": show_path(s.path), "same_as": show_path(s.duplicate_of)} for s in skipped if s.duplicate_of
        ],
        "ignored_folders": [show_path(f) for f in ignored],
        "prompts": prompts,
        "files": {"train": "train.json", "val": "val.json", "images": "images", "config": "config.yaml"},
    }


def _with_references(manifest: dict[str, Any], chosen: Chosen, prompts: Prompts, product: str) -> dict[str, Any]:
    """The manifest with the references (before `prompts`, so the file reads top down) and their wording."""
    reference = {
        "mode": chosen.mode,
        "folder": REFERENCE_FOLDER,
        "photos": [photo.__dict__ for _, photo in chosen.photos],
    }
    out: dict[str, Any] = {}
    for key, value in manifest.items():
        if key == "prompts":
            out["reference"] = reference
            value = {**value, "reference_intro": prompts.reference_intros(product)}
        out[key] = value
    return out


def _counts(units: list[_Unit]) -> dict[str, Any]:
    samples = [s for u in units for s in u.samples]
    by_class = Counter(s.get("label") or "unlabelled" for s in samples)
    by_type = Counter(s.get("defect_type") or "(unknown)" for s in samples if s.get("label") == "NG")
    return {
        "images": len(units),
        "samples": len(samples),
        "by_class": dict(sorted(by_class.items())),
        "by_defect_type": dict(sorted(by_type.items())),
    }


# ---------------------------------------------------------------- summary


def _print_summary(
    console: Console, out: Path, units: list[_Unit], is_val: list[bool], skipped: list[Skipped], ignored: list[Path]
) -> None:
    console.print(_summary_table(units, is_val))
    duplicates = [s for s in skipped if s.duplicate_of]
    bad = [s for s in skipped if not s.duplicate_of]
    for item in bad[:10]:
        console.print(f"[yellow]skipped[/] {escape(show_path(item.path))}: {escape(item.reason)}", highlight=False)
    if len(bad) > 10:
        console.print(f"[yellow]... and {len(bad) - 10} more skipped (all listed in manifest.json)[/]")
    if duplicates:
        console.print(f"[yellow]{len(duplicates)} duplicate file(s) left out[/] (same bytes; listed in manifest.json)")
    for folder in ignored:
        console.print(
            f"[yellow]ignored folder[/] {escape(show_path(folder))}: its name is neither an OK nor an NG name",
            highlight=False,
        )
    val_labels = [s.get("label") for u, v in zip(units, is_val, strict=True) if v for s in u.samples[:1]]
    caveat = few_val_caveat(val_labels.count("OK"), val_labels.count("NG"), len(val_labels))
    if caveat:
        console.print(f"[bold yellow]caveat:[/] {escape(caveat)}", highlight=False)
    console.print(f"dataset written to [bold]{escape(show_path(out))}[/]", highlight=False)


def _print_references(console: Console, chosen: Chosen) -> None:
    if not chosen.photos:
        return
    how = "the most typical OK photo(s), taken out of the samples" if chosen.mode == "ok" else "known-good photos"
    listed = ", ".join(f"{photo.file} (from {photo.source})" for _, photo in chosen.photos)
    console.print(f"references ({escape(how)}), shown before every photo: {escape(listed)}", highlight=False)


def _summary_table(units: list[_Unit], is_val: list[bool]) -> Table:
    table = Table(title="vlm-inspect prepare")
    for column in ("class", "defect type", "train", "val", "total"):
        table.add_column(column, justify="right" if column in ("train", "val", "total") else "left")
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for unit, val in zip(units, is_val, strict=True):
        label, _, defect_type = unit.stratum.partition("/")
        rows[(label, defect_type or "-")][int(val)] += 1
    for (label, defect_type), (n_train, n_val) in sorted(rows.items()):
        table.add_row(label, defect_type, str(n_train), str(n_val), str(n_train + n_val))
    n_val = sum(is_val)
    table.add_row("all", "", str(len(units) - n_val), str(n_val), str(len(units)), style="bold")
    return table


def few_val_caveat(n_ok: int, n_ng: int, n_total: int) -> str | None:
    """The statistical caveat for a small validation set, or None with enough images.

    With 0 errors in n images the 95 % upper bound on the error rate is about 3/n (rule of three).
    """
    if n_total >= FEW_VAL_IMAGES:
        return None
    if n_total == 0:
        return "no validation images (val_fraction is 0 or classes are too small): evaluate has nothing to measure."
    return (
        f"only {n_total} validation images ({n_ok} OK, {n_ng} NG). Zero errors on n images only bounds the "
        f"error rate at about 3/n (95 % confidence): overkill below {_bound(n_ok)}, escape below {_bound(n_ng)}. "
        f"Measured rates on fewer than {FEW_VAL_IMAGES} images are not line-grade evidence."
    )


def _bound(n: int) -> str:
    return "100 %" if n == 0 else f"{min(1.0, 3 / n):.0%}".replace("%", " %")
