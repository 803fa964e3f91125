"""What reading a photo source yields: labelled photos, the files left out and why, the folders read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class LabeledImage:
    """One usable photo with what is known about it.

    Boxes in `defects` are `[x0, y0, x1, y1]` in pixels of the upright image (EXIF orientation
    applied), which is also how the copied file decodes.
    """

    path: Path
    label: Literal["OK", "NG"]
    defect_type: str | None = None
    defects: list[dict[str, Any]] = field(default_factory=list)
    description: str | None = None
    width: int = 0
    height: int = 0
    sha256: str = ""
    suffix: str = ""
    """Suffix of the decoded format (`.jpg`, `.png`, ...), used to name the copy."""


@dataclass
class Skipped:
    """An input file left out, and why."""

    path: Path
    reason: str
    duplicate_of: Path | None = None


@dataclass
class Group:
    """A folder of photos sharing a label (and defect type)."""

    folder: Path
    label: Literal["OK", "NG"]
    defect_type: str | None = None
    recursive: bool = True
    masks: Path | None = None


@dataclass
class Scan:
    """Everything read from one source folder."""

    layout: str
    images: list[LabeledImage]
    skipped: list[Skipped]
    ignored_folders: list[Path]
