"""Reading the record back: filtered lists of inspections with their latest review, one record in full, CSV.

Review state: `unreviewed` (no review), `confirmed` (latest review agrees with the model's verdict),
`corrected` (it does not), `labelled` (a labeller photo, which has no model verdict, with a review),
`reviewed` (any of the last three).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import Select, and_, exists, func, select
from sqlalchemy.orm import aliased

from vlm_inspect.errors import StationError
from vlm_inspect.station.audit import AuditSample
from vlm_inspect.station.periods import day_problems
from vlm_inspect.station.queue import ORDERS, ordered, unreviewed
from vlm_inspect.station.schema import Inspection, Photo, Review
from vlm_inspect.station.store import MAX_RECORD_ID, StationStore

REVIEW_STATES = ("unreviewed", "reviewed", "confirmed", "corrected", "labelled")
CSV_COLUMNS = (
    "id", "time", "file", "source", "verdict", "p_ng", "threshold", "model", "model_hash", "latency_ms",
    "description", "review", "final_verdict", "defect_type", "boxes", "operator", "review_description", "photo_sha256",
    "line", "model_defects", "reference",
)  # fmt: skip
MAX_LIMIT = 1000
MAX_OFFSET = 2**63 - 1 - MAX_LIMIT
"""The largest offset SQL takes (a 64-bit integer, with room for one more page)."""


@dataclass
class HistoryFilter:
    """What a history view shows; every field is optional."""

    verdict: str | None = None
    review: str | None = None
    p_min: float | None = None
    p_max: float | None = None
    since: date | None = None
    until: date | None = None
    model: str | None = None
    source: str | None = None
    line: str | None = None
    order: str = "newest"
    sample: AuditSample = AuditSample()
    queue: bool = False
    limit: int = 200
    offset: int = 0

    def problems(self) -> list[str]:
        problems = [] if self.order in ORDERS else [f"order: {self.order!r} is not one of {', '.join(ORDERS)}"]
        if self.verdict not in (None, "OK", "NG"):
            problems.append(f"verdict: {self.verdict!r} is not OK or NG")
        if self.review not in (None, *REVIEW_STATES):
            problems.append(f"review: {self.review!r} is not one of {', '.join(REVIEW_STATES)}")
        for name in ("p_min", "p_max"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                problems.append(f"{name}: {value} is not between 0 and 1")
        if not 1 <= self.limit <= MAX_LIMIT:
            problems.append(f"limit: {self.limit} is not between 1 and {MAX_LIMIT}")
        if not 0 <= self.offset <= MAX_OFFSET:
            problems.append(f"offset: {self.offset} is not between 0 and {MAX_OFFSET:,}")
        return problems + day_problems(since=self.since, until=self.until)


def _query(flt: HistoryFilter, counting: bool = False) -> Select:
    # The latest review is the one no later review of the same inspection follows (an anti-join: SQLite
    # re-runs an IN (SELECT max ...) list for every row, which took minutes on a million records).
    later = aliased(Review)
    newer = exists(select(later.id).where(later.inspection_id == Review.inspection_id, later.id > Review.id))
    query = (
        select(Inspection.id)
        if counting
        else select(Inspection, Review, Photo).join(Photo, Photo.sha256 == Inspection.photo_sha256)
    )
    query = query.outerjoin(Review, and_(Review.inspection_id == Inspection.id, ~newer))
    conditions = []
    if flt.verdict:
        conditions.append(Inspection.verdict == flt.verdict)
    if flt.p_min is not None:
        conditions.append(Inspection.p_ng >= flt.p_min)
    if flt.p_max is not None:
        conditions.append(Inspection.p_ng <= flt.p_max)
    if flt.since:
        conditions.append(Inspection.created_at >= datetime.combine(flt.since, time(), timezone.utc))
    if flt.until:
        conditions.append(Inspection.created_at < datetime.combine(flt.until + timedelta(days=1), time(), timezone.utc))
    if flt.model:
        conditions.append(Inspection.model_name == flt.model)
    if flt.source:
        conditions.append(Inspection.source == flt.source)
    if flt.line:
        conditions.append(Inspection.line == flt.line)
    conditions += _review_condition(flt.review)
    return query.where(*conditions)


def _review_condition(state: str | None) -> list[Any]:
    if state == "unreviewed":
        return [unreviewed()]
    if state == "reviewed":
        return [Review.id.is_not(None)]
    if state == "confirmed":
        return [Review.id.is_not(None), Review.verdict == Inspection.verdict]
    if state == "corrected":
        return [Review.id.is_not(None), Inspection.verdict.is_not(None), Review.verdict != Inspection.verdict]
    if state == "labelled":
        return [Review.id.is_not(None), Inspection.verdict.is_(None)]
    return []


def list_records(store: StationStore, flt: HistoryFilter, oldest_first: bool = False) -> tuple[list[dict], int]:
    """The records a filter selects (newest first, one page) and how many it selects in all."""
    problems = flt.problems()
    if problems:
        raise StationError("history filter: " + "; ".join(problems))
    order_name = "oldest" if oldest_first else flt.order
    query, order = ordered(_query(flt), order_name, flt.sample, flt.queue)
    counted, _ = ordered(_query(flt, counting=True), order_name, flt.sample, flt.queue)  # no photo columns
    with store.reading() as session:
        total = session.scalar(select(func.count()).select_from(counted.subquery())) or 0
        rows = session.execute(query.order_by(*order).limit(flt.limit).offset(flt.offset)).all()
    return [as_dict(*row) for row in rows], total


def all_records(store: StationStore, flt: HistoryFilter) -> list[dict]:
    """Every record a filter selects, oldest first, read a page at a time."""
    out: list[dict] = []
    page = HistoryFilter(**{**vars(flt), "limit": MAX_LIMIT, "offset": 0})
    while True:
        rows, _ = list_records(store, page, oldest_first=True)
        out += rows
        if len(rows) < MAX_LIMIT:
            return out
        page.offset += MAX_LIMIT


def get_record(store: StationStore, inspection_id: int) -> dict:
    """One record with its photo's details and every review, oldest first."""
    with store.reading() as session:
        inspection = session.get(Inspection, inspection_id) if 0 < inspection_id <= MAX_RECORD_ID else None
        if inspection is None:
            raise StationError(f"{store.where}: no inspection with id {inspection_id}")
        photo = session.get(Photo, inspection.photo_sha256)
        reviews = session.scalars(select(Review).where(Review.inspection_id == inspection_id).order_by(Review.id)).all()
    record = as_dict(inspection, reviews[-1] if reviews else None, photo)
    record["reviews"] = [_review_dict(r) for r in reviews]
    return record


def models_seen(store: StationStore) -> list[str]:
    with store.reading() as session:
        names = session.scalars(select(Inspection.model_name).where(Inspection.model_name.is_not(None)).distinct())
        return sorted(names)


def as_dict(inspection: Inspection, review: Review | None, photo: Photo) -> dict[str, Any]:
    """A record as the API and exports show it; `final_verdict` is the latest review's, else the model's."""
    return {
        "id": inspection.id,
        "time": iso_utc(inspection.created_at),
        "file": inspection.file_name,
        "source": inspection.source,
        "line": inspection.line,
        "verdict": inspection.verdict,
        "p_ng": inspection.p_ng,
        "threshold": inspection.threshold,
        "description": inspection.description,
        "defects": json.loads(inspection.defects_json) if inspection.defects_json else None,
        "boxes_dropped": inspection.boxes_dropped,
        # What the verdict was judged against ({name, photos}; None: the photo alone, or not recorded) and whether
        # that is known: records from before references were recorded say nothing of it.
        "reference": json.loads(inspection.reference_json) if inspection.reference_json else None,
        "reference_known": inspection.reference_json is not None,
        "model": inspection.model_name,
        "model_hash": inspection.model_hash,
        "latency_ms": inspection.latency_ms,
        "photo_sha256": photo.sha256,
        "photo_suffix": photo.suffix,
        "width": photo.width,
        "height": photo.height,
        "review": _state(inspection, review),
        "final_verdict": review.verdict if review else inspection.verdict,
        "latest_review": _review_dict(review) if review else None,
    }


def _state(inspection: Inspection, review: Review | None) -> str:
    if review is None:
        return "unreviewed"
    if inspection.verdict is None:
        return "labelled"
    return "confirmed" if review.verdict == inspection.verdict else "corrected"


def _review_dict(review: Review) -> dict[str, Any]:
    return {
        "id": review.id,
        "verdict": review.verdict,
        "defect_type": review.defect_type,
        "boxes": json.loads(review.boxes_json or "[]"),
        "description": review.description,
        "operator": review.operator,
        "time": iso_utc(review.created_at),
    }


def iso_utc(moment: datetime) -> str:
    """A stored time as ISO 8601 in UTC, to the second, `Z`-suffixed (the records' and golden sets' format)."""
    if moment.tzinfo is None:  # SQLite hands back naive values; they were written in UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def csv_text(records: list[dict]) -> str:
    """The records as CSV (UTF-8 with a byte-order mark for Excel); cells that look like formulas are quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for record in records:
        latest = record["latest_review"] or {}
        values = {
            **record,
            "defect_type": latest.get("defect_type"),
            "boxes": json.dumps(latest.get("boxes")) if latest.get("boxes") else "",
            "operator": latest.get("operator"),
            "review_description": latest.get("description"),
            "model_defects": json.dumps(record["defects"], ensure_ascii=False) if record["defects"] else "",
            "reference": _reference_cell(record),
        }
        writer.writerow([_cell(values.get(c)) for c in CSV_COLUMNS])
    return "\ufeff" + buf.getvalue()


def _reference_cell(record: dict) -> str:
    """`station: a.png, b.png` (the set's name and its photos), `none` for the photo alone, empty when unknown."""
    if not record["reference_known"]:
        return ""
    reference = record["reference"]
    return f"{reference['name']}: {', '.join(p['file'] for p in reference['photos'])}" if reference else "none"


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
