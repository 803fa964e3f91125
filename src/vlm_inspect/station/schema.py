"""The station's tables: photos (stored once by content hash), inspections, and operator reviews.

An inspection row is never changed after it is written: an operator's review is a new row that
points at it, so the model's original verdict always stays on record. The latest review of an
inspection is its final label. Migrations (migrations/versions/) create these tables; a change
here needs a new revision there.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SOURCES = ("page", "api", "chat", "watch", "label")
"""Where an inspection came from: the operator page, POST /v1/inspect, the OpenAI route, a hot folder, the labeller."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Photo(Base):
    """One stored photo file, `photos/<sha[:2]>/<sha[2:]><suffix>` under the station folder."""

    __tablename__ = "photos"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    suffix: Mapped[str] = mapped_column(String(8))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Inspection(Base):
    """One verdict on one photo by one model (or a photo queued for labelling: verdict None)."""

    __tablename__ = "inspections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    photo_sha256: Mapped[str] = mapped_column(ForeignKey("photos.sha256"), index=True)
    file_name: Mapped[str] = mapped_column(String(255))
    verdict: Mapped[str | None] = mapped_column(String(2), index=True)
    p_ng: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    description: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(255), index=True)
    model_hash: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(8))
    source_key: Mapped[str | None] = mapped_column(Text, unique=True)
    """Hot folder and labeller ledger: `path|size|mtime_ns` of the file, so no photo is inspected twice."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    line: Mapped[str | None] = mapped_column(String(80))
    """The line: a `--line` name, else the hot folder's name (watch) or the source (serve, label)."""
    margin: Mapped[float | None] = mapped_column(Float, index=True)
    """|p(NG) − threshold|: how unsure the verdict was (the least-sure review queue reads it)."""
    audit_u: Mapped[float | None] = mapped_column(Float, index=True)
    """The inspection's place in [0, 1) for the random audit sample (station/audit.py)."""
    defects_json: Mapped[str | None] = mapped_column(Text)
    """The defects the model's answer boxed: JSON `[{"type", "box": [x0, y0, x1, y1]}]` in the photo's pixels;
    NULL when no box was asked for (scoring alone)."""
    boxes_dropped: Mapped[int | None] = mapped_column(Integer)
    """Boxes the model wrote that could not be used (unparseable, inverted, off the photo, too many)."""
    reference_json: Mapped[str | None] = mapped_column(Text)
    """What the verdict was judged against: JSON `{"name", "photos": [{"file", "sha256"}]}`, or JSON `null` for the
    photo alone; NULL (no text) on records written before references were recorded."""
    __table_args__ = (Index("ix_inspections_model_hash_line_id", "model_hash", "line", "id"),)


class Baseline(Base):
    """A model's reference p(NG) distribution for drift (station/drift.py): its first inspections, or an evaluation."""

    __tablename__ = "baselines"
    model_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    """`station` (the first inspections under the model) or `evaluate` (an evaluate report's photos)."""
    model_name: Mapped[str | None] = mapped_column(String(255))
    source: Mapped[str] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Float)
    scores_json: Mapped[str] = mapped_column(Text)
    labels_json: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Review(Base):
    """An operator's verdict, defect type, boxes (photo pixels) and description for one inspection."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id"), index=True)
    verdict: Mapped[str] = mapped_column(String(2))
    defect_type: Mapped[str | None] = mapped_column(String(80))
    boxes_json: Mapped[str] = mapped_column(Text, default="[]")
    description: Mapped[str | None] = mapped_column(Text)
    operator: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class GoldenSet(Base):
    """A product's known-good reference photos, chosen on the history page from confirmed-OK records
    (station/references.py). Rows are only added: the newest per product is in force (no photos: cleared), and
    the older ones say which set was in force when."""

    __tablename__ = "golden_sets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    product: Mapped[str] = mapped_column(String(80), index=True)
    photos_json: Mapped[str] = mapped_column(Text)
    """JSON `[{"record_id", "sha256", "suffix", "file"}]`, in the order the model sees them."""
    operator: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Claim(Base):
    """A hot-folder photo a watcher is inspecting now (station/claims.py): taken before the model runs, so a second
    watcher on the same folder leaves the photo alone; deleted once the inspection is recorded."""

    __tablename__ = "claims"
    source_key: Mapped[str] = mapped_column(Text, primary_key=True)
    """The photo's ledger key, as `Inspection.source_key` will hold it."""
    owner: Mapped[str] = mapped_column(String(200))
    """`host:pid:token` of the watcher holding it."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
