"""The station store: a database of inspections and reviews, and a folder of photos stored once each.

SQLite in the station folder by default (`DIR/station.db`: WAL, synchronous=FULL, a busy timeout,
every write transaction taken with BEGIN IMMEDIATE so concurrent writers queue instead of failing),
or PostgreSQL by URL. Photos go to `DIR/photos/<sha[:2]>/<sha[2:]><suffix>`, written and fsynced
before the row that names them is committed: a crash leaves at worst an orphan file, never a row
without its photo. The schema is brought to the newest Alembic revision whenever a store is opened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from vlm_inspect.data.llava_json import box_problems
from vlm_inspect.errors import StationError
from vlm_inspect.station.audit import audit_u
from vlm_inspect.station.schema import SOURCES, Inspection, Photo, Review

DB_NAME = "station.db"
PHOTOS = "photos"
BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).parent / "migrations"
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}
_PG_MIGRATION_LOCK = 720_020  # pg_advisory_xact_lock key: one process migrates at a time


@dataclass
class StoredPhoto:
    """A photo as stored: content hash, file suffix, size and upright pixel size."""

    sha256: str
    suffix: str
    size_bytes: int
    width: int
    height: int


class StationStore:
    """An open station: the database engine and the photo folder. Close it when done."""

    def __init__(self, engine: Engine, folder: Path, where: str):
        self.engine = engine
        self.folder = folder
        self.photos = folder / PHOTOS
        self.where = where
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------ sessions

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for queries; database errors become a StationError naming the store."""
        try:
            with self._sessions() as session:
                yield session
        except SQLAlchemyError as err:
            raise StationError(f"{self.where}: cannot read the station database ({_short(err)})") from err

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """One transaction: committed whole at the end of the block, or not at all."""
        try:
            with self._sessions.begin() as session:
                yield session
        except IntegrityError:
            raise
        except SQLAlchemyError as err:
            raise StationError(f"{self.where}: cannot write to the station database ({_short(err)})") from err

    # ------------------------------------------------------------ photos

    def photo_path(self, sha256: str, suffix: str) -> Path:
        return self.photos / sha256[:2] / f"{sha256[2:]}{suffix}"

    def store_photo(self, data: bytes, image: Image.Image | None = None) -> StoredPhoto:
        """Write the photo file once (by content hash), fsynced, before any row names it."""
        sha = hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as header:
            suffix = _SUFFIXES.get(header.format or "", ".img")
            size = image.size if image is not None else _upright_size(header)
        path = self.photo_path(sha, suffix)
        if not path.exists():
            _write_durably(path, data, self.folder)
        return StoredPhoto(sha, suffix, len(data), size[0], size[1])

    # ------------------------------------------------------------ inspections and reviews

    def record(self, data: bytes, image: Image.Image | None = None, **fields: Any) -> int | None:
        """Store the photo, then one inspection row; its id, or None when `source_key` is already recorded.

        Args:
            data: The photo's bytes as received.
            image: The decoded upright image, when the caller has it (saves decoding again).
            fields: `Inspection` columns: file_name, source, verdict, p_ng, threshold, description,
                model_name, model_hash, latency_ms, source_key, line (default: the source), boxes_dropped; and
                `defects`, the model's boxed defects (`[{"type", "box"}]`, photo pixels), kept as JSON.
        """
        if fields.get("source") not in SOURCES:
            raise StationError(f"source {fields.get('source')!r} is not one of {', '.join(SOURCES)}")
        photo = self.store_photo(data, image)
        fields["file_name"] = (fields.get("file_name") or "photo")[-255:]
        fields["line"] = (fields.get("line") or fields["source"])[:80]
        defects = fields.pop("defects", None)
        fields["defects_json"] = json.dumps(defects, ensure_ascii=False) if defects is not None else None
        if fields.get("p_ng") is not None and fields.get("threshold") is not None:
            fields["margin"] = abs(fields["p_ng"] - fields["threshold"])
        try:
            with self.writing() as session:
                if session.get(Photo, photo.sha256) is None:
                    session.add(Photo(**vars(photo)))
                    session.flush()
                    self._restore_if_pruned(photo, data)
                row = Inspection(photo_sha256=photo.sha256, **fields)
                session.add(row)
                session.flush()
                row.audit_u = audit_u(row.id)  # written with the row, in the same transaction
                return row.id
        except IntegrityError:
            if fields.get("source_key") and self.find_key(fields["source_key"]) is not None:
                return None  # another process recorded this file first
            raise StationError(f"{self.where}: could not record the inspection (a conflicting row)") from None

    def _restore_if_pruned(self, photo: StoredPhoto, data: bytes) -> None:
        # A prune may have removed the file between store_photo and this transaction's write lock.
        path = self.photo_path(photo.sha256, photo.suffix)
        if not path.exists():
            _write_durably(path, data, self.folder)

    def find_key(self, source_key: str) -> Inspection | None:
        """The inspection recorded for a hot-folder or labeller file key, if any."""
        with self.reading() as session:
            return session.scalars(select(Inspection).where(Inspection.source_key == source_key)).first()

    def review(
        self,
        inspection_id: int,
        verdict: str,
        operator: str,
        defect_type: str | None = None,
        boxes: list[list[float]] | None = None,
        description: str | None = None,
    ) -> int:
        """Add an operator's review (the inspection itself is left as it was); the review's id.

        Raises:
            StationError: the inspection does not exist, or the review is malformed (every problem listed).
        """
        boxes = boxes or []
        with self.writing() as session:
            inspection = session.get(Inspection, inspection_id)
            if inspection is None:
                raise StationError(f"{self.where}: no inspection with id {inspection_id}")
            photo = session.get(Photo, inspection.photo_sha256)
            problems = review_problems(verdict, operator, defect_type, boxes, photo)
            if problems:
                raise StationError(f"review of inspection {inspection_id}: " + "; ".join(problems))
            row = Review(
                inspection_id=inspection_id,
                verdict=verdict,
                operator=operator.strip(),
                defect_type=(defect_type or "").strip() or None,
                boxes_json=json.dumps([[round(v, 1) for v in box] for box in boxes]),
                description=(description or "").strip() or None,
            )
            session.add(row)
            session.flush()
            return row.id


def review_problems(
    verdict: str, operator: str, defect_type: str | None, boxes: list[Any], photo: Photo | None
) -> list[str]:
    """Every problem with a review: verdict, operator, defect type, and boxes inside the photo."""
    problems = []
    if verdict not in ("OK", "NG"):
        problems.append(f"verdict {verdict!r} is not OK or NG")
    if not operator or not operator.strip():
        problems.append("operator: give the reviewer's name")
    if defect_type and (len(defect_type) > 80 or "/" in defect_type or "\\" in defect_type):
        problems.append(f"defect type {defect_type!r} must be under 80 characters without slashes")
    if verdict == "OK" and (boxes or defect_type):
        problems.append("an OK verdict takes no defect type or boxes")
    if not isinstance(boxes, list):
        return [*problems, "boxes must be a list of [x0, y0, x1, y1]"]
    for i, box in enumerate(boxes):
        problems += [f"boxes[{i}]: {p}" for p in box_problems(box)]
        if photo is not None and not box_problems(box) and (box[2] > photo.width or box[3] > photo.height):
            problems.append(f"boxes[{i}]: {box} reaches outside the {photo.width}x{photo.height} photo")
    return problems


# ---------------------------------------------------------------- opening


def open_store(station: str | Path | None, db: str | None = None) -> StationStore:
    """Open (creating if needed) the station in folder `station`, its database there or at URL `db`.

    Raises:
        StationError: the folder cannot be made or written, the URL is malformed, or the database
            cannot be reached or migrated.
    """
    if not station:
        raise StationError("a station folder is needed for the photos (--station DIR), also with --db")
    folder = Path(station).expanduser()
    try:
        (folder / PHOTOS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StationError(f"{folder}: cannot create the station folder ({err.strerror or err})") from None
    url = db or f"sqlite:///{(folder / DB_NAME).resolve()}"
    where = _shown(url, folder)
    engine = _engine(url, where)
    try:
        migrate(engine)
    except SQLAlchemyError as err:
        engine.dispose()
        raise StationError(f"{where}: cannot open the station database ({_short(err)})") from None
    return StationStore(engine, folder, where)


def _engine(url: str, where: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StationError(f"--db {url!r}: not a database URL (e.g. postgresql+psycopg://user@host/db)") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StationError(f"--db {where}: only sqlite and postgresql are supported")
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not the older psycopg2
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # Take the write lock up front: a reader that later writes cannot deadlock with another writer.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; concurrent openers wait for each other."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


# ---------------------------------------------------------------- helpers


def _write_durably(path: Path, data: bytes, folder: Path) -> None:
    """Write to a temporary name, fsync, rename into place, fsync the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise StationError(
            f"{folder}: cannot store the photo ({err.strerror or err}); is the disk full or read-only?"
        ) from None


def _upright_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _shown(url: str, folder: Path) -> str:
    """The store as named in messages: the SQLite file, or the URL without its password."""
    if url.startswith("sqlite"):
        return str(folder / DB_NAME)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "the --db URL"


def _short(err: Exception) -> str:
    text = str(getattr(err, "orig", None) or err).strip().splitlines()
    return text[0] if text else type(err).__name__
