"""Read and check a conversation JSON in the original LLaVA format, as its `train.py` needs it.

The format (LLaVA `docs/Finetune_Custom_Data.md`): a JSON list of samples, each with `id`,
`image` (a path relative to the image folder) and `conversations`, a list of
`{"from": "human" | "gpt", "value": text}` turns alternating from human, `<image>` in the first
human turn. Extra keys are kept: prepare adds `label`, `defect_type`, `defects` and `source`,
which the original `train.py` ignores.

A sample judged against known-good references (`prepare --reference`) also lists them, `"reference": [path, ...]`
relative to the same folder, and its first human turn holds one `<image>` per picture: the references' first, then
the photo's (`image` stays the photo to inspect, so everything that reads the photo reads it as before).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vlm_inspect.data.safe_read import exists, outside_reason, parse_json, show_path
from vlm_inspect.errors import DataError

IMAGE_TOKEN = "<image>"
ROLES = ("human", "gpt")
_MAX_LISTED = 50


def read_llava_json(path: Path, image_folder: Path) -> list[dict[str, Any]]:
    """Read a LLaVA conversation JSON and check every sample; return normalised copies.

    The first human turn is rewritten as LLaVA's `preprocess_multimodal` does: `<image>` is
    removed and put back as `"<image>\\n"` at the start of the turn.

    Args:
        path: The JSON file.
        image_folder: The folder each sample's `image` is relative to.

    Returns:
        The samples, with every key kept and the first human turn normalised.

    Raises:
        DataError: naming the file and, for each bad sample, its index, id and problem.
    """
    path, image_folder = Path(path), Path(image_folder)
    data = _load_json(path)
    problems: list[str] = []
    samples = []
    for index, sample in enumerate(data):
        sample_problems = _sample_problems(sample, image_folder)
        if sample_problems:
            where = f"sample {index}" + (
                f" (id {sample['id']!r})" if isinstance(sample, dict) and "id" in sample else ""
            )
            problems += [f"{where}: {p}" for p in sample_problems]
        else:
            samples.append(_normalised(sample))
    if problems:
        raise DataError(_problems_message(path, problems))
    return samples


def read_contained_llava_json(path: Path, image_folder: Path) -> list[dict[str, Any]]:
    """`read_llava_json` for verbs that read the photos straight from it (train, evaluate): a sample whose
    `image` leads outside `image_folder` (`../`, an absolute path, a link out) is an error naming it, so
    nothing outside the named inputs is opened. (`prepare` lists such samples as skipped instead.)"""
    samples = read_llava_json(path, image_folder)
    outside = [
        f"sample {index} ({name!r}): {reason}"
        for index, sample in enumerate(samples)
        for name in [sample["image"], *sample.get("reference", [])]
        if (reason := outside_reason(Path(image_folder) / name, Path(image_folder)))
    ]
    if outside:
        raise DataError(_problems_message(Path(path), outside))
    return samples


def _load_json(path: Path) -> list[Any]:
    name = show_path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except OSError as err:
        raise DataError(f"{name}: cannot be read ({err.strerror or err})") from None
    data = parse_json(text, name)
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a JSON list of samples, got {type(data).__name__}")
    if not data:
        raise DataError(f"{name}: contains no samples")
    return data


def _sample_problems(sample: Any, image_folder: Path) -> list[str]:
    if not isinstance(sample, dict):
        return [f"expected an object, got {type(sample).__name__}"]
    problems = _image_problems(sample.get("image"), image_folder)
    references = sample.get("reference", [])
    problems += _reference_problems(references, image_folder)
    pictures = 1 + len(references) if isinstance(references, list) else 1
    problems += _conversation_problems(sample.get("conversations"), pictures)
    problems += _extra_key_problems(sample)
    return problems


def _image_problems(image: Any, image_folder: Path) -> list[str]:
    if not isinstance(image, str) or not image.strip():
        return ["'image' must be a non-empty path text (one image per sample)"]
    # Only looked up, never opened, here: a path leading out of the folder is refused by the reader
    # (prepare lists it in `skipped`).
    if not exists(image_folder / image):
        return [f"image {image!r} not found in {show_path(image_folder)}"]
    return []


def _reference_problems(references: Any, image_folder: Path) -> list[str]:
    if not isinstance(references, list) or not all(isinstance(r, str) and r.strip() for r in references):
        return ["'reference' must be a list of path texts (the known-good photos shown first)"]
    return [
        f"reference {r!r} not found in {show_path(image_folder)}" for r in references if not exists(image_folder / r)
    ]


def _conversation_problems(conversations: Any, pictures: int = 1) -> list[str]:
    if not isinstance(conversations, list) or not conversations:
        return ["'conversations' must be a non-empty list of turns"]
    problems = []
    for i, turn in enumerate(conversations):
        expected = ROLES[i % 2]
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(f"turn {i}: must be an object with 'from' and a text 'value'")
        elif turn.get("from") not in ROLES:
            problems.append(f"turn {i}: 'from' is {turn.get('from')!r}, must be 'human' or 'gpt'")
        elif turn["from"] != expected:
            problems.append(f"turn {i}: from {turn['from']!r}, expected {expected!r} (turns alternate from human)")
        elif not turn["value"].replace(IMAGE_TOKEN, "").strip():
            problems.append(f"turn {i}: empty {turn['from']} text")
    if problems:
        return problems
    if len(conversations) % 2:
        problems.append("the last turn is a human turn with no answer")
    image_count = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if IMAGE_TOKEN not in conversations[0]["value"]:
        problems.append(f"the first human turn has no {IMAGE_TOKEN}")
    elif image_count != pictures:
        what = "one image per sample means exactly once" if pictures == 1 else f"its photo and references: {pictures}"
        problems.append(f"{IMAGE_TOKEN} appears {image_count} times; {what}")
    elif conversations[0]["value"].count(IMAGE_TOKEN) != image_count:
        problems.append(f"every {IMAGE_TOKEN} belongs in the first human turn")
    return problems


def _extra_key_problems(sample: dict[str, Any]) -> list[str]:
    problems = []
    if "label" in sample and sample["label"] not in ("OK", "NG"):
        problems.append(f"'label' is {sample['label']!r}, must be 'OK' or 'NG'")
    if "defect_type" in sample and sample["defect_type"] is not None and not isinstance(sample["defect_type"], str):
        problems.append("'defect_type' must be a text or null")
    if "defects" in sample:
        problems += defects_problems(sample["defects"])
    return problems


def defects_problems(defects: Any) -> list[str]:
    """Problems with a `defects` list: each `{"type": text, "box": [x0, y0, x1, y1]}`, x0 < x1, y0 < y1."""
    if not isinstance(defects, list):
        return ["'defects' must be a list"]
    problems = []
    for i, defect in enumerate(defects):
        if not isinstance(defect, dict):
            problems.append(f"defects[{i}]: must be an object with 'type' and 'box'")
            continue
        if "type" in defect and not isinstance(defect["type"], str):
            problems.append(f"defects[{i}]: 'type' must be a text")
        problems += [f"defects[{i}]: {p}" for p in box_problems(defect.get("box"))]
    return problems


def box_problems(box: Any) -> list[str]:
    """Problems with one `[x0, y0, x1, y1]` pixel box."""
    numeric = isinstance(box, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
    if not numeric or len(box) != 4:
        return [f"'box' must be 4 numbers [x0, y0, x1, y1], got {box!r}"]
    if not all(math.isfinite(v) for v in box):
        return [f"'box' {box} must hold finite numbers (not Infinity or NaN)"]
    x0, y0, x1, y1 = box
    if not (x0 < x1 and y0 < y1):
        return [f"'box' {box} needs x0 < x1 and y0 < y1"]
    if min(box) < 0:
        return [f"'box' {box} has negative coordinates"]
    return []


def _normalised(sample: dict[str, Any]) -> dict[str, Any]:
    conversations = [dict(turn) for turn in sample["conversations"]]
    text = conversations[0]["value"].replace(IMAGE_TOKEN, "").strip()
    conversations[0]["value"] = f"{IMAGE_TOKEN}\n" * (1 + len(sample.get("reference", []))) + text
    return {**sample, "conversations": conversations}


def _problems_message(path: Path, problems: list[str]) -> str:
    listed = problems[:_MAX_LISTED]
    more = len(problems) - len(listed)
    lines = [f"{show_path(path)}: {len(problems)} problem(s):", *(f"  - {p}" for p in listed)]
    if more:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)
