"""`vlm-inspect prune`: drop old inspections by age or by the photo folder's size; reviewed ones always stay.

Inspection rows go in batches, one transaction each; then photos no inspection names, row and file
together under the write lock. A crash at any point never leaves an inspection without its photo.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

from rich.console import Console
from sqlalchemy import delete, func, select

from vlm_inspect.config import PruneConfig
from vlm_inspect.errors import ConfigError
from vlm_inspect.station.schema import Inspection, Photo, Review
from vlm_inspect.station.store import StationStore, open_store

BATCH = 200
MAX_AGE_DAYS = 36_525
"""Longest retention `max_age_days` takes: a hundred years (further back than any record, and inside the calendar)."""
MAX_GB = 1_000_000
"""Largest `max_gb`: a petabyte of photos."""
console = Console()


def prune(cfg: PruneConfig) -> Path:
    """Apply the retention settings to a station; the station folder.

    Raises:
        ConfigError: no station folder, or neither limit given, or a limit outside its range (NaN too).
        StationError: no station there (prune never creates one), or the store cannot be opened or written.
    """
    _validate(cfg)
    store = open_store(cfg.station, cfg.db, create=False)
    try:
        cutoff = datetime.now(timezone.utc) - timedelta(days=cfg.max_age_days) if cfg.max_age_days is not None else None
        max_bytes = int(cfg.max_gb * 1024**3) if cfg.max_gb is not None else None
        removed, files = prune_store(store, cutoff, max_bytes)
        console.print(f"pruned {removed} inspection(s) and {files} photo file(s) from {store.where}")
    finally:
        store.close()
    return Path(cfg.station)


def _validate(cfg: PruneConfig) -> None:
    problems = [] if cfg.station else ["station: required (the station folder)"]
    if cfg.max_age_days is None and cfg.max_gb is None:
        problems.append("give max_age_days, max_gb or both")
    for name, most in (("max_age_days", MAX_AGE_DAYS), ("max_gb", MAX_GB)):
        value = getattr(cfg, name)
        if value is not None and not 0 <= value <= most:  # NaN fails this too
            problems.append(f"{name}: {value} is not between 0 and {most:,}")
    if problems:
        raise ConfigError(problems)


def prune_store(store: StationStore, cutoff: datetime | None, max_bytes: int | None) -> tuple[int, int]:
    """Delete unreviewed inspections older than `cutoff`, then the oldest until photos fit `max_bytes`.

    Returns:
        (inspections deleted, photo files deleted).
    """
    removed = files = 0
    while True:
        over = max_bytes is not None and photo_bytes(store) > max_bytes
        ids = _oldest_unreviewed(store, None if over else cutoff)
        if not ids or (cutoff is None and not over):
            break
        gone, deleted = _delete(store, ids)
        removed, files = removed + gone, files + deleted
    return removed, files + _delete_orphans(store)


def photo_bytes(store: StationStore) -> int:
    with store.reading() as session:
        return int(session.scalar(select(func.coalesce(func.sum(Photo.size_bytes), 0))) or 0)


def _oldest_unreviewed(store: StationStore, cutoff: datetime | None) -> list[int]:
    query = select(Inspection.id).where(~Inspection.id.in_(select(Review.inspection_id)))
    if cutoff is not None:
        query = query.where(Inspection.created_at < cutoff)
    with store.reading() as session:
        return list(session.scalars(query.order_by(Inspection.id).limit(BATCH)))


def _delete(store: StationStore, ids: list[int]) -> tuple[int, int]:
    with store.writing() as session:
        # Reviewed rows are excluded again inside the transaction: a review may have arrived meanwhile.
        reviewed = select(Review.inspection_id)
        result = session.execute(delete(Inspection).where(Inspection.id.in_(ids), ~Inspection.id.in_(reviewed)))
    return result.rowcount or 0, _delete_orphans(store)


def _delete_orphans(store: StationStore) -> int:
    """Photo rows and files that no inspection names.

    The files go while the transaction holds the write lock, so a concurrent `record` of the same photo
    either sees the row gone (and writes the file again) or commits first (and its photo stays).
    """
    with store.writing() as session:
        orphans = session.execute(
            select(Photo.sha256, Photo.suffix).where(~Photo.sha256.in_(select(Inspection.photo_sha256)))
        ).all()
        if orphans:
            session.execute(delete(Photo).where(Photo.sha256.in_([sha for sha, _ in orphans])))
        for sha, suffix in orphans:
            store.photo_path(sha, suffix).unlink(missing_ok=True)
    return len(orphans)
