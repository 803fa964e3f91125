"""Labelled photos to read from a source: class folders or an MVTec AD category (`collect_images`, as `prepare`
reads them), or the items `evaluate` scores from a dataset's val.json, a LLaVA JSON file or class folders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlm_inspect.data.class_folders import scan
from vlm_inspect.data.labelled import LabeledImage, Skipped
from vlm_inspect.data.llava_json import read_contained_llava_json
from vlm_inspect.data.prompts import parse_verdict
from vlm_inspect.errors import DataError


@dataclass
class Item:
    """One labelled photo to evaluate."""

    id: str
    path: Path
    shown_path: str
    label: str
    defect_type: str | None = None
    defects: list[dict] = field(default_factory=list)
    description: str | None = None


def load_items(data: Path) -> tuple[list[Item], list[dict]]:
    """Labelled photos from a prepare dataset folder (val.json), a LLaVA JSON file, or class folders.

    Returns:
        The items, and the files left out with their reasons (class folders only; a dataset's
        files were checked when it was made).
    """
    if data.is_dir() and (data / "val.json").is_file():
        return items_from_llava_json(data / "val.json", data), []
    if data.is_file() and data.suffix == ".json":
        return items_from_llava_json(data, data.parent), []
    if data.is_dir():
        return items_from_folders(data)
    raise DataError(f"{data}: not a dataset folder (with val.json), a LLaVA JSON file or a folder of class folders")


def items_from_llava_json(path: Path, image_folder: Path) -> list[Item]:
    """Items from LLaVA samples; the label is the `label` key, else the verdict word of the first answer."""
    items, unlabelled = [], []
    for index, sample in enumerate(read_contained_llava_json(path, image_folder)):
        answers = [t["value"] for t in sample["conversations"] if t["from"] == "gpt"]
        label = sample.get("label") or parse_verdict(answers[0])
        if label is None:
            unlabelled.append(f"sample {index} ({sample.get('id', sample['image'])})")
            continue
        items.append(
            Item(
                id=str(sample.get("id") or sample["image"]),
                path=image_folder / sample["image"],
                shown_path=sample["image"],
                label=label,
                defect_type=sample.get("defect_type"),
                defects=list(sample.get("defects") or []),
                description=answers[-1] if label == "NG" and len(answers) > 1 else None,
            )
        )
    if unlabelled:
        raise DataError(
            f"{path}: {len(unlabelled)} sample(s) have no 'label' key and no answer starting with OK or NG: "
            + ", ".join(unlabelled[:20])
        )
    return unique_ids(items)


def items_from_folders(src: Path) -> tuple[list[Item], list[dict]]:
    """Items from a labelled class-folder tree (ok/, ng/, ng/<defect>/, MVTec AD), read as prepare reads it."""
    images, skipped = collect_images(src)
    items = [
        Item(
            id=_relative(image.path, src),
            path=Path(image.path),
            shown_path=_relative(image.path, src),
            label=image.label,
            defect_type=image.defect_type,
            defects=list(image.defects),
            description=image.description,
        )
        for image in images
    ]
    return unique_ids(items), [{"path": _relative(s.path, src), "reason": s.reason} for s in skipped]


def _relative(path: Path, root: Path) -> str:
    path = Path(path)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def unique_ids(items: list[Item]) -> list[Item]:
    """Make repeated ids unique (`id`, `id#2`, ...): rows of results.json are keyed by id."""
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
        if seen[item.id] > 1:
            item.id = f"{item.id}#{seen[item.id]}"
    return items


def collect_images(
    src: str | Path,
    ok_names: tuple[str, ...] | list[str] = (),
    ng_names: tuple[str, ...] | list[str] = (),
    max_pixels: int = 100_000_000,
) -> tuple[list[LabeledImage], list[Skipped]]:
    """Labelled photos from class folders or an MVTec AD category, checked by decoding each one.

    Args:
        src: Folder with `ok/` and `ng/` class folders (aliases, any case) or MVTec AD layout.
        ok_names: Folder names meaning OK besides ok/good/pass/normal.
        ng_names: Folder names meaning NG besides ng/bad/defect/defective/fail/anomaly.
        max_pixels: Larger photos are skipped (decompression-bomb guard).

    Returns:
        The usable photos (sorted by folder, duplicates removed) and the files left out with reasons.

    Raises:
        DataError: a class is missing or has no usable photo (naming the folder), or a sidecar
            is malformed; every such problem is listed at once.
    """
    found = scan(Path(src), ok_names, ng_names, max_pixels)
    return found.images, found.skipped
