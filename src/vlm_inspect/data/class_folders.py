"""Reading a photo source folder: class folders (`ok/`, `ng/`, `ng/<defect>/`) or an MVTec AD category.

Every candidate file is checked by decoding it; per-image sidecars `<stem>.txt` (description) or
`<stem>.json` (description and defect boxes) add detail. Nothing outside the source folder is opened
(see `safe_read`); every file passed over that could have been meant as input gets a `Skipped` row.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_inspect.data.images import load_image, read_file_bytes
from vlm_inspect.data.labelled import Group, LabeledImage, Scan, Skipped
from vlm_inspect.data.llava_json import defects_problems
from vlm_inspect.data.mvtec import add_mask_defects, is_mvtec, mvtec_groups
from vlm_inspect.data.prompts import UNKNOWN_DEFECT
from vlm_inspect.data.safe_read import exists, list_folder, parse_json, read_sidecar, show_path, walk_files
from vlm_inspect.errors import DataError

OK_NAMES = ("ok", "good", "pass", "normal")
NG_NAMES = ("ng", "bad", "defect", "defective", "fail", "anomaly")
SIDECAR_SUFFIXES = (".txt", ".json")

_FORMAT_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
_SIDECAR_KEYS = {"description", "defects"}


def scan(
    src: Path, ok_names: tuple[str, ...] | list[str], ng_names: tuple[str, ...] | list[str], max_pixels: int
) -> Scan:
    """Labelled photos of `src`, checked by decoding, duplicates removed; the files left out with reasons.

    Raises:
        DataError: a class is missing or has no usable photo, or a sidecar is malformed; all listed at once.
    """
    if not src.is_dir():
        raise DataError(f"{show_path(src)}: no such folder")
    layout, groups, ignored, skipped = _find_groups(src, ok_names, ng_names)
    problems: list[str] = []
    images: list[LabeledImage] = []
    for group in groups:
        found, group_skipped = _read_group(group, src, max_pixels, problems)
        if not found:
            problems.append(_empty_group_problem(group, group_skipped))
        images += found
        skipped += group_skipped
    images, duplicates = _drop_duplicates(images)
    problems += _missing_label_problems(src, images, groups)
    if problems:
        raise DataError(f"{show_path(src)}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return Scan(layout, images, skipped + duplicates, ignored)


def _find_groups(
    src: Path, ok_names: tuple[str, ...] | list[str], ng_names: tuple[str, ...] | list[str]
) -> tuple[str, list[Group], list[Path], list[Skipped]]:
    if is_mvtec(src):
        return "mvtec", *mvtec_groups(src)
    return "class_folders", *_class_groups(src, ok_names, ng_names)


def _class_groups(
    src: Path, ok_names: tuple[str, ...] | list[str], ng_names: tuple[str, ...] | list[str]
) -> tuple[list[Group], list[Path], list[Skipped]]:
    ok = {n.lower() for n in (*OK_NAMES, *ok_names)}
    ng = {n.lower() for n in (*NG_NAMES, *ng_names)}
    groups: list[Group] = []
    ignored: list[Path] = []
    _, folders, refused = list_folder(src, src)
    skipped = [Skipped(path, reason) for path, reason in refused]
    for folder in folders:
        if folder.name.lower() in ok:
            groups.append(Group(folder, "OK"))
        elif folder.name.lower() in ng:
            ng_groups, ng_refused = _ng_groups(folder, src)
            groups += ng_groups
            skipped += ng_refused
        else:
            ignored.append(folder)
    missing = [label for label in ("OK", "NG") if not any(g.label == label for g in groups)]
    if missing:
        raise DataError(_missing_class_message(src, missing, ok, ng, ignored))
    return groups, ignored, skipped


def _ng_groups(folder: Path, src: Path) -> tuple[list[Group], list[Skipped]]:
    """Photos directly in ng/ have no defect type; each subfolder's name is a defect type.

    Entries of ng/ refused as subfolders are returned; those refused as files come with the group of ng/.
    """
    files, subfolders, refused = list_folder(folder, src)
    groups = [Group(sub, "NG", sub.name) for sub in subfolders]
    if _candidates(files) or not groups:
        groups.insert(0, Group(folder, "NG", recursive=False))
        return groups, []
    return groups, [Skipped(path, reason) for path, reason in refused]


def _missing_class_message(src: Path, missing: list[str], ok: set[str], ng: set[str], ignored: list[Path]) -> str:
    lines = [f"{show_path(src)}: no {' and no '.join(missing)} class folder found."]
    if "OK" in missing:
        lines.append(f"  OK folder names (any case): {', '.join(sorted(ok))}; add more with --ok-name.")
    if "NG" in missing:
        lines.append(f"  NG folder names (any case): {', '.join(sorted(ng))}; add more with --ng-name.")
    if ignored:
        lines.append(f"  Subfolders found: {', '.join(show_path(f.name) for f in ignored)}.")
        if any(f.name in ("train", "test") for f in ignored) or any(f.name == "good" for f in ignored):
            lines.append("  For MVTec AD give one category folder (the one holding train/, test/, ground_truth/).")
    return "\n".join(lines)


def _candidates(files: list[Path]) -> list[Path]:
    """Every file that may be a photo; decoding decides. Sidecars are not candidates."""
    return [p for p in files if p.suffix.lower() not in SIDECAR_SUFFIXES]


def _orphan_sidecars(files: list[Path]) -> list[Skipped]:
    """Sidecars with no photo of the same stem beside them: listed, so a misnamed one is noticed."""
    stems = {p.with_suffix("") for p in _candidates(files)}
    return [
        Skipped(p, "sidecar with no photo of the same name beside it")
        for p in files
        if p.suffix.lower() in SIDECAR_SUFFIXES and p.with_suffix("") not in stems
    ]


def _read_group(
    group: Group, src: Path, max_pixels: int, problems: list[str]
) -> tuple[list[LabeledImage], list[Skipped]]:
    files, refused = walk_files(group.folder, src, group.recursive)
    images, skipped = [], [Skipped(path, reason) for path, reason in refused]
    skipped += _orphan_sidecars(files)
    for path in _candidates(files):
        item = _read_photo(path, group, max_pixels)
        if isinstance(item, Skipped):
            skipped.append(item)
            continue
        sidecar_problems, sidecar_skipped = _add_sidecars(item, group, src)
        problems += sidecar_problems
        skipped += sidecar_skipped
        skipped += add_mask_defects(item, group, src, max_pixels)
        images.append(item)
    return images, _first_per_path(skipped)


def _first_per_path(skipped: list[Skipped]) -> list[Skipped]:
    """One row per file: a sidecar refused while listing its folder is not listed again when it is looked up."""
    seen: set[Path] = set()
    return [s for s in skipped if not (s.path in seen or seen.add(s.path))]


def _read_photo(path: Path, group: Group, max_pixels: int) -> LabeledImage | Skipped:
    name = show_path(path.name)
    try:
        data = read_file_bytes(path, name)
        image = load_image(data, max_pixels, name=name)
    except DataError as err:
        return Skipped(path, str(err).removeprefix(f"{name}: "))
    return LabeledImage(
        path=path,
        label=group.label,
        defect_type=group.defect_type,
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(data).hexdigest(),
        suffix=format_suffix(data, path),
    )


def format_suffix(data: bytes, path: Path) -> str:
    """The suffix of the format the bytes decode as (`.jpg` for a JPEG named `.png`)."""
    with Image.open(io.BytesIO(data)) as image:
        return _FORMAT_SUFFIX.get(image.format or "", path.suffix.lower() or ".img")


def _empty_group_problem(group: Group, skipped: list[Skipped]) -> str:
    what = f"{group.label}" + (f" ({group.defect_type})" if group.defect_type else "")
    if not skipped:
        return f"{show_path(group.folder)}: no photos in this {what} folder"
    reasons = "; ".join(f"{show_path(s.path.name)}: {s.reason}" for s in skipped[:3])
    return f"{show_path(group.folder)}: no usable photo in this {what} folder ({len(skipped)} skipped: {reasons})"


def _missing_label_problems(src: Path, images: list[LabeledImage], groups: list[Group]) -> list[str]:
    # Only reachable when every photo of a class was a duplicate of the other class.
    present = {im.label for im in images}
    return [
        f"{show_path(src)}: no usable {label} photo left after removing duplicates"
        for label in ("OK", "NG")
        if label not in present and any(g.label == label for g in groups)
    ]


# ---------------------------------------------------------------- sidecars


def _add_sidecars(image: LabeledImage, group: Group, src: Path) -> tuple[list[str], list[Skipped]]:
    """Fill description and defects from `<stem>.txt` / `<stem>.json`.

    Returns problems in their content (errors) and sidecars that could not be read (skipped).
    """
    skipped = []
    texts = {}
    for suffix in SIDECAR_SUFFIXES:
        sidecar = image.path.with_suffix(suffix)
        if not exists(sidecar):
            continue
        try:
            texts[suffix] = read_sidecar(sidecar, src)
        except DataError as err:
            skipped.append(Skipped(sidecar, "sidecar not used: " + str(err).removeprefix(f"{show_path(sidecar)}: ")))
    if ".txt" in texts:
        image.description = texts[".txt"].decode("utf-8", errors="replace").strip() or None
    if ".json" not in texts:
        return [], skipped
    json_file = image.path.with_suffix(".json")
    data, problems = _read_sidecar_json(texts[".json"], json_file, image)
    if problems:
        return [f"{show_path(json_file)}: {p}" for p in problems], skipped
    if isinstance(data.get("description"), str) and data["description"].strip():
        image.description = data["description"].strip()
    for defect in data.get("defects", []):
        image.defects.append({"type": defect.get("type") or group.defect_type or UNKNOWN_DEFECT, "box": defect["box"]})
    if image.defect_type is None and image.defects and image.defects[0]["type"] != UNKNOWN_DEFECT:
        image.defect_type = image.defects[0]["type"]
    return [], skipped


def _read_sidecar_json(text: bytes, json_file: Path, image: LabeledImage) -> tuple[dict[str, Any], list[str]]:
    try:
        data = parse_json(text, show_path(json_file))
    except DataError as err:
        return {}, [str(err).removeprefix(f"{show_path(json_file)}: ")]
    if not isinstance(data, dict):
        return {}, ['expected an object like {"description": ..., "defects": [{"type": ..., "box": [...]}]}']
    problems = [f"unknown key {k!r} (known: description, defects)" for k in data if k not in _SIDECAR_KEYS]
    if "description" in data and not isinstance(data["description"], str):
        problems.append("'description' must be a text")
    problems += _sidecar_defect_problems(data.get("defects", []), image)
    return data, problems


def _sidecar_defect_problems(defects: Any, image: LabeledImage) -> list[str]:
    if isinstance(defects, list) and defects and image.label == "OK":
        return [f"lists defects but {show_path(image.path.name)} is in an OK folder"]
    problems = defects_problems(defects)
    if problems:
        return problems
    return [
        f"defects[{i}]: 'box' {d['box']} reaches outside the {image.width}x{image.height} upright image"
        for i, d in enumerate(defects)
        if d["box"][2] > image.width or d["box"][3] > image.height
    ]


# ---------------------------------------------------------------- duplicates


def _drop_duplicates(images: list[LabeledImage]) -> tuple[list[LabeledImage], list[Skipped]]:
    """Keep the first of identical files; identical files labelled both OK and NG are all dropped."""
    first: dict[str, LabeledImage] = {}
    conflicts: dict[str, list[LabeledImage]] = defaultdict(list)
    skipped = []
    for image in images:
        kept = first.setdefault(image.sha256, image)
        if kept is image:
            continue
        if kept.label != image.label:
            conflicts[image.sha256].append(image)
        else:
            skipped.append(Skipped(image.path, f"same bytes as {show_path(kept.path)}", duplicate_of=kept.path))
    for sha, others in conflicts.items():
        copies = [first[sha], *others]
        listing = ", ".join(f"{show_path(im.path)} ({im.label})" for im in copies)
        skipped += [Skipped(im.path, f"conflicting labels: identical files {listing}") for im in copies]
    kept_images = [im for im in images if first[im.sha256] is im and im.sha256 not in conflicts]
    return kept_images, skipped
