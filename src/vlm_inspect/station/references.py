"""A product's golden set in the station: known-good reference photos chosen on the history page from records an
operator confirmed OK (#26).

`serve --station` and `watch --station` judge every photo of the product against the station's set when one is in
force and no `--reference` was given (then the run's own references), and record which set each verdict was judged
against. A set is only added, never changed: the newest row per product is in force (one without photos clears
it), so the older rows say which set was in force when. The photos are the station's own stored files, each checked
against its content hash when it is read back, so a set never depends on a file outside the station.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from vlm_inspect.data.reference import MAX_REFERENCES, Reference
from vlm_inspect.errors import StationError
from vlm_inspect.station.history import iso_utc
from vlm_inspect.station.schema import GoldenSet, Inspection, Photo, Review
from vlm_inspect.station.store import MAX_OPERATOR_CHARS, MAX_RECORD_ID, StationStore

SET_NAME = "station"
"""The name a station's set has where verdicts are recorded (`Reference.name`)."""
MAX_PRODUCT_CHARS = 80


@dataclass(frozen=True)
class GoldenPhoto:
    record_id: int
    sha256: str
    suffix: str
    file: str


@dataclass(frozen=True)
class Golden:
    """The set in force for a product: its id (newer sets have larger ones), photos, who chose them and when."""

    id: int
    product: str
    photos: tuple[GoldenPhoto, ...]
    operator: str
    time: str

    def as_dict(self) -> dict[str, Any]:
        photos = [{"record_id": p.record_id, "file": p.file, "sha256": p.sha256} for p in self.photos]
        return {"id": self.id, "product": self.product, "photos": photos, "operator": self.operator, "time": self.time}


def golden_set(store: StationStore, product: str) -> Golden | None:
    """The set in force for `product`, or None (never set, or cleared)."""
    with store.reading() as session:
        row = session.scalars(
            select(GoldenSet).where(GoldenSet.product == product).order_by(GoldenSet.id.desc()).limit(1)
        ).first()
    if row is None:
        return None
    photos = tuple(GoldenPhoto(**p) for p in json.loads(row.photos_json))
    if not photos:
        return None
    return Golden(row.id, row.product, photos, row.operator, iso_utc(row.created_at))


def set_golden(store: StationStore, product: str, record_ids: list[int], operator: str) -> Golden | None:
    """Put a new set in force for `product`: the photos of these records, in this order (none: clear the set).

    Raises:
        StationError: every problem at once: a product or operator name missing or too long, more than
            MAX_REFERENCES records, a record named twice, a record that does not exist, that no operator has
            confirmed OK (its latest review), or whose stored photo is missing or changed.
    """
    problems = _name_problems(product, operator)
    if len(record_ids) > MAX_REFERENCES:
        problems.append(f"{len(record_ids)} records: a golden set holds at most {MAX_REFERENCES} photos")
    if len(set(record_ids)) != len(record_ids):
        problems.append("a record is named twice")
    photos = []
    with store.writing() as session:
        for record_id in record_ids[: MAX_REFERENCES + 1]:
            found = _confirmed_ok(session, store, record_id)
            if isinstance(found, str):
                problems.append(f"record {record_id}: {found}")
            else:
                photos.append(found)
        if problems:
            raise StationError(f"golden set for {product!r}: " + "; ".join(problems))
        row = GoldenSet(
            product=product.strip(),
            photos_json=json.dumps([vars(p) for p in photos], ensure_ascii=False),
            operator=operator.strip(),
        )
        session.add(row)
    return golden_set(store, product.strip())


def _name_problems(product: str, operator: str) -> list[str]:
    problems = []
    for what, value, limit in (("product", product, MAX_PRODUCT_CHARS), ("operator", operator, MAX_OPERATOR_CHARS)):
        if not value or not value.strip():
            problems.append(f"{what}: give a name")
        elif len(value.strip()) > limit:
            problems.append(f"{what}: {len(value.strip())} characters, more than {limit}")
    return problems


def _confirmed_ok(session: Any, store: StationStore, record_id: int) -> GoldenPhoto | str:
    """The record's photo when an operator's latest review says OK and the stored file is intact, else why not."""
    inspection = session.get(Inspection, record_id) if 0 < record_id <= MAX_RECORD_ID else None
    if inspection is None:
        return "no such record"
    review = session.scalars(
        select(Review).where(Review.inspection_id == record_id).order_by(Review.id.desc()).limit(1)
    ).first()
    if review is None or review.verdict != "OK":
        said = "not reviewed" if review is None else f"its latest review says {review.verdict}"
        return f"only photos an operator confirmed OK can be golden samples ({said})"
    suffix = session.get(Photo, inspection.photo_sha256).suffix
    problem = store.photo_problem(inspection.photo_sha256, suffix)
    if problem:
        return problem
    return GoldenPhoto(record_id, inspection.photo_sha256, suffix, inspection.file_name)


def golden_reference(store: StationStore, golden: Golden) -> Reference:
    """The set as the predictor takes it: each stored photo read back, checked against its content hash.

    Raises:
        StationError: a stored photo is missing or changed since the set was chosen (naming the file).
        DataError: a stored photo can no longer be decoded.
    """
    photos = [(p.file, store.read_photo(p.sha256, p.suffix)) for p in golden.photos]
    return Reference.from_bytes(SET_NAME, photos)


class GoldenSource:
    """What a serving process or hot folder judges a product against from the station: the set in force, read back
    once per set (a new set is picked up at the next photo), or None to fall back on the predictor's own."""

    def __init__(self, store: StationStore | None, product: str, enabled: bool = True):
        self.store, self.product, self.enabled = store, product, enabled
        self._cached: tuple[int, Reference] | None = None

    def current(self) -> Reference | None:
        if self.store is None or not self.enabled:
            return None
        golden = golden_set(self.store, self.product)
        if golden is None:
            return None
        if self._cached is None or self._cached[0] != golden.id:
            self._cached = (golden.id, golden_reference(self.store, golden))
        return self._cached[1]
