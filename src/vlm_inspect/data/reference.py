"""Known-good reference photos ("golden samples"): the set a photo is judged against, and the folder that keeps one.

A human inspector holds the part next to a golden sample; a model with a reference sees one or more known-good
photos of the product first, then the photo to inspect, and is asked about the last one. A `Reference` is such a
set, named so every verdict can say which set it was judged against (`record`). `NO_REFERENCE` is the empty set:
the photo alone, as without references.

A reference folder (in a dataset, a run, a merged model) holds the photos and `reference.json`, which lists them in
the order the model sees them, each with its source and SHA-256. `prepare` writes one (`write_reference_folder`),
`train` and `merge` copy it along, and `Predictor.load` reads it back (`read_reference_folder`), so serving never
needs the dataset. `typical_photos` chooses references among a product's OK photos.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlm_inspect.data.images import find_images, load_image, read_file_bytes
from vlm_inspect.data.safe_read import show_path
from vlm_inspect.errors import DataError

INDEX = "reference.json"
"""The file in a reference folder that lists its photos, in order."""
MAX_REFERENCES = 4
"""Most reference photos in one set: each costs as many image tokens as the photo, in every sample and call."""
THUMB_SIDE = 32
"""Side of the grey thumbnails `typical_photos` compares."""


@dataclass(frozen=True, eq=False)
class Reference:
    """A named set of known-good photos shown before the photo to inspect (empty: none, the photo alone)."""

    name: str
    """What the set is called where verdicts are recorded: `run` (the run's own), `upload`, a station set's name."""
    images: tuple[Image.Image, ...] = ()
    files: tuple[str, ...] = ()
    """Each photo's file name, in order."""
    sha256: tuple[str, ...] = field(default=())
    """Each photo's SHA-256 (of its file's bytes), in order."""

    def __bool__(self) -> bool:
        return bool(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def key(self) -> tuple[str, ...]:
        """What tells two sets apart (photos batched together must share it)."""
        return (self.name, *self.sha256)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [image.size for image in self.images]

    def record(self) -> dict[str, Any] | None:
        """Which set a verdict was judged against, for outputs and records; None without a reference."""
        if not self:
            return None
        photos = [{"file": f, "sha256": h} for f, h in zip(self.files, self.sha256, strict=True)]
        return {"name": self.name, "photos": photos}

    def label(self) -> str:
        """One line for consoles and CSV cells: `run: ref_01.png, ref_02.png`, or `none`."""
        return f"{self.name}: {', '.join(self.files)}" if self else "none"

    @classmethod
    def from_bytes(cls, name: str, photos: Sequence[tuple[str, bytes]]) -> Reference:
        """A set from files' bytes (uploads): each decoded with the usual checks (`data.images.load_image`).

        Raises:
            DataError: a photo cannot be used, naming it; more than MAX_REFERENCES photos.
        """
        _check_count(len(photos), name)
        images = tuple(load_image(data, name=file) for file, data in photos)
        digests = tuple(hashlib.sha256(data).hexdigest() for _, data in photos)
        return cls(name, images, tuple(file for file, _ in photos), digests)

    @classmethod
    def from_paths(cls, name: str, paths: Sequence[str | Path]) -> Reference:
        """A set from photo files, or folders of them (searched as `predict` searches its inputs)."""
        files = find_images(paths)
        if not files:
            raise DataError(f"{', '.join(map(show_path, paths))}: no reference photos found")
        return cls.from_bytes(name, [(show_path(p.name), read_file_bytes(p)) for p in files])


NO_REFERENCE = Reference("none")
"""The empty set: the photo alone."""


def _check_count(n: int, where: str) -> None:
    if n > MAX_REFERENCES:
        raise DataError(
            f"{where}: {n} reference photos; at most {MAX_REFERENCES} (each costs a photo's image tokens in every "
            "sample and every call)"
        )


# ---------------------------------------------------------------- reference folders


@dataclass(frozen=True)
class ReferencePhoto:
    """One photo of a reference folder: its file name there, where it came from, its bytes' SHA-256."""

    file: str
    source: str
    sha256: str
    width: int
    height: int


def write_reference_folder(folder: Path, photos: Sequence[tuple[Path, ReferencePhoto]]) -> list[ReferencePhoto]:
    """Copy (source file, its entry) pairs into `folder` and write its index, in that order."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, photo in photos:
        shutil.copyfile(path, folder / photo.file)
    entries = [photo for _, photo in photos]
    index = {"photos": [photo.__dict__ for photo in entries]}
    (folder / INDEX).write_text(json.dumps(index, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return entries


def read_index(folder: Path) -> list[ReferencePhoto]:
    """The photos a reference folder lists; [] when there is no such folder.

    Raises:
        DataError: the index is unreadable or names a photo that is missing.
    """
    path = folder / INDEX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["photos"]
        photos = [ReferencePhoto(**entry) for entry in entries]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{show_path(path)}: not a reference index ({err})") from None
    missing = [p.file for p in photos if not (folder / p.file).is_file()]
    if missing:
        raise DataError(f"{show_path(folder)}: reference photos listed but missing: {', '.join(missing)}")
    _check_count(len(photos), show_path(folder))
    return photos


def read_reference_folder(folder: Path, name: str = "run") -> Reference:
    """The set a reference folder holds (NO_REFERENCE when there is none)."""
    photos = read_index(folder)
    if not photos:
        return NO_REFERENCE
    images = tuple(load_image(folder / p.file) for p in photos)
    return Reference(name, images, tuple(p.file for p in photos), tuple(p.sha256 for p in photos))


def copy_reference_folder(source: Path, target: Path) -> bool:
    """Copy a reference folder (its index and photos) to `target`; False when `source` holds none."""
    photos = read_index(source)
    if not photos:
        return False
    target.mkdir(parents=True, exist_ok=True)
    for name in [INDEX, *(p.file for p in photos)]:
        shutil.copyfile(source / name, target / name)
    return True


# ---------------------------------------------------------------- choosing references among OK photos


def typical_photos(images: Sequence[Image.Image], n: int) -> list[int]:
    """Indices of the `n` photos nearest the mean of all of them (small grey thumbnails, L2), nearest first.

    The most typical OK photos make the best golden samples: one with an odd pose, light or a mark nobody noticed
    would teach every comparison that oddity. Deterministic: the same photos give the same choice.
    """
    thumbs = np.stack([_thumb(image) for image in images])
    distance = ((thumbs - thumbs.mean(0)) ** 2).sum(axis=(1, 2))
    return [int(i) for i in np.argsort(distance, kind="stable")[:n]]


def _thumb(image: Image.Image) -> np.ndarray:
    small = image.convert("L").resize((THUMB_SIDE, THUMB_SIDE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0
