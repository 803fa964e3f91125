"""Which photos of a source become its known-good references, for `prepare --reference`.

- `auto` (the default): the source's `reference/` folder (also `references/`, `golden/`, any case) beside `ok/` and
  `ng/` when there is one, else none;
- a folder: its photos, in name order;
- `ok`: the `reference_count` most typical OK photos (`data.reference.typical_photos`), taken out of the samples so
  no conversation shows a reference beside itself and none sits in the validation split;
- `none`: no references; a `reference/` folder is then an ignored folder, as before references existed.

Each reference photo is read like any photo of the source (decoded, size-checked, nothing outside the folder named),
and a sample photo with the same bytes as a reference is left out with that reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from vlm_inspect.data.class_folders import format_suffix
from vlm_inspect.data.images import load_image, read_file_bytes
from vlm_inspect.data.labelled import LabeledImage, Skipped
from vlm_inspect.data.reference import MAX_REFERENCES, ReferencePhoto, typical_photos
from vlm_inspect.data.safe_read import list_folder, show_path, walk_files
from vlm_inspect.errors import DataError

REFERENCE_NAMES = ("reference", "references", "golden")
"""Names (any case) of a source's folder of known-good reference photos."""
FOLDER = "reference"
"""The dataset's folder of reference copies (relative to the dataset; samples name their references in it)."""


@dataclass
class Chosen:
    """The references of a source and what choosing them did to its samples."""

    mode: str
    """`folder` or `ok`; `none` without references."""
    photos: list[tuple[Path, ReferencePhoto]] = field(default_factory=list)
    """(source file, its entry in the dataset's reference folder), in the order the model sees them."""
    images: list[LabeledImage] = field(default_factory=list)
    """The sample photos left once references were taken out."""
    skipped: list[Skipped] = field(default_factory=list)
    folder: Path | None = None
    """The folder the references were read from (not an ignored folder then)."""

    @property
    def files(self) -> list[str]:
        """Each reference's path relative to the dataset, as samples list them."""
        return [f"{FOLDER}/{photo.file}" for _, photo in self.photos]


def reference_folder(src: Path) -> Path | None:
    """The source's folder of reference photos (`reference/`, `references/`, `golden/`, any case), if any."""
    _, folders, _ = list_folder(src, src)
    found = [f for f in folders if f.name.lower() in REFERENCE_NAMES]
    return found[0] if found else None


def choose_references(
    setting: str, count: int, src: Path, images: list[LabeledImage], max_pixels: int, show_root: Path
) -> Chosen:
    """The references `setting` names for a source whose sample photos are `images`.

    Raises:
        DataError: the folder named has no usable photo or more than MAX_REFERENCES, or too few OK photos are left.
    """
    if setting == "none":
        return Chosen("none", images=images)
    if setting == "ok":
        return _typical_ok(images, count, show_root)
    folder = reference_folder(src) if setting == "auto" else Path(setting)
    if folder is None:
        return Chosen("none", images=images)
    root = src if setting == "auto" else folder
    photos, skipped = _folder_photos(folder, root, max_pixels, show_root)
    kept, duplicates = _without_copies(images, photos)
    return Chosen("folder", photos, kept, skipped + duplicates, folder)


def _folder_photos(
    folder: Path, root: Path, max_pixels: int, show_root: Path
) -> tuple[list[tuple[Path, ReferencePhoto]], list[Skipped]]:
    files, refused = walk_files(folder, root, recursive=False)
    photos, skipped = [], [Skipped(path, reason) for path, reason in refused]
    for path in files:
        entry = _entry(path, len(photos) + 1, max_pixels, show_root)
        if isinstance(entry, Skipped):
            skipped.append(entry)
        else:
            photos.append((path, entry))
    if not photos:
        raise DataError(f"{show_path(folder)}: no usable reference photo ({len(skipped)} skipped)")
    if len(photos) > MAX_REFERENCES:
        raise DataError(
            f"{show_path(folder)}: {len(photos)} reference photos; keep at most {MAX_REFERENCES} (each costs as many "
            "image tokens as the photo, in every sample and every inspection)"
        )
    return photos, skipped


def _entry(path: Path, number: int, max_pixels: int, show_root: Path) -> ReferencePhoto | Skipped:
    name = show_path(path.name)
    try:
        data = read_file_bytes(path, name)
        image = load_image(data, max_pixels, name=name)
    except DataError as err:
        return Skipped(path, "reference photo not used: " + str(err).removeprefix(f"{name}: "))
    return ReferencePhoto(
        file=f"ref_{number:02d}{format_suffix(data, path)}",
        source=_relative(path, show_root),
        sha256=hashlib.sha256(data).hexdigest(),
        width=image.width,
        height=image.height,
    )


def _without_copies(
    images: list[LabeledImage], photos: list[tuple[Path, ReferencePhoto]]
) -> tuple[list[LabeledImage], list[Skipped]]:
    """Sample photos with a reference's bytes are left out: a reference beside itself teaches nothing."""
    by_sha = {photo.sha256: path for path, photo in photos}
    kept = [im for im in images if im.sha256 not in by_sha]
    skipped = [
        Skipped(im.path, f"same bytes as the reference {show_path(by_sha[im.sha256])}", duplicate_of=by_sha[im.sha256])
        for im in images
        if im.sha256 in by_sha
    ]
    return kept, skipped


def _typical_ok(images: list[LabeledImage], count: int, show_root: Path) -> Chosen:
    ok = [im for im in images if im.label == "OK"]
    if len(ok) <= count:
        raise DataError(
            f"reference=ok: {len(ok)} OK photo(s), and {count} would become references; at least one must stay a "
            "sample (add OK photos, lower reference_count, or give a reference/ folder)"
        )
    chosen = [ok[i] for i in typical_photos([load_image(im.path) for im in ok], count)]
    photos = [
        (
            im.path,
            ReferencePhoto(f"ref_{n:02d}{im.suffix}", _relative(im.path, show_root), im.sha256, im.width, im.height),
        )
        for n, im in enumerate(chosen, start=1)
    ]
    taken = {id(im) for im in chosen}
    return Chosen("ok", photos, [im for im in images if id(im) not in taken])


def _relative(path: Path, root: Path) -> str:
    try:
        return show_path(path.relative_to(root).as_posix())
    except ValueError:
        return show_path(path)
