"""The station store: a database of inspections and reviews, and a folder of photos stored once each.

SQLite in the station folder by default (`DIR/station.db`: WAL, synchronous=FULL, a busy timeout,
every write transaction taken with BEGIN IMMEDIATE so concurrent writers queue instead of failing),
or PostgreSQL by URL. Photos go to `DIR/photos/<sha[:2]>/<sha[2:]><suffix>`, written and fsynced
before the row that names them is committed: a crash leaves at worst an orphan file, never a row
without its photo, and a photo file is checked against its content hash whenever it is read back (`read_photo`).
The schema is brought to the newest Alembic revision whenever a store is opened; a store of a newer revision
than this version knows is refused, naming both. A read-only station (a read-only mount, another user's files)
is opened read-only for the verbs that only read it (`write=False`), and nothing is created by a verb that
expects a station to be there (`create=False`).
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
from urllib.parse import quote

from PIL import Image
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from vlm_inspect.data.images import read_file_bytes
from vlm_inspect.data.llava_json import box_problems
from vlm_inspect.data.safe_read import outside_reason, show_path
from vlm_inspect.errors import DataError, StationError
from vlm_inspect.station.audit import audit_u
from vlm_inspect.station.schema import SOURCES, Inspection, Photo, Review

DB_NAME = "station.db"
PHOTOS = "photos"
BUSY_TIMEOUT_MS = 30_000
MIGRATIONS = Path(__file__).parent / "migrations"
_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif"}
_PG_MIGRATION_LOCK = 720_020  # pg_advisory_xact_lock key: one process migrates at a time
MAX_RECORD_ID = 2**31 - 1
"""The largest id an inspection can have (the schema's Integer on PostgreSQL); a larger one names no record."""
MAX_REVIEW_BOXES = 1000
"""Most boxes one review holds. Its `export` sidecar then stays far under the 1 MiB `prepare` reads
(data/safe_read.MAX_SIDECAR_BYTES): about 600 bytes a box at most, 0.6 MB with the longest description."""
MAX_DESCRIPTION_CHARS = 4000
"""Longest description an operator's review holds."""
MAX_OPERATOR_CHARS = 80
"""Longest operator name a review holds (the column's size)."""


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
        """Write the photo file once (by content hash), fsynced, before any row names it; a file already there
        that no longer holds these bytes (replaced, damaged) is written again."""
        sha = hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as header:
            suffix = _SUFFIXES.get(header.format or "", ".img")
            size = image.size if image is not None else _upright_size(header)
        if self.photo_problem(sha, suffix) is not None:
            _write_durably(self.photo_path(sha, suffix), data, self.folder)
        return StoredPhoto(sha, suffix, len(data), size[0], size[1])

    def read_photo(self, sha256: str, suffix: str) -> bytes:
        """The bytes of a stored photo, checked against its content hash before anyone trusts them.

        Raises:
            StationError: naming the file when it is missing, not a regular file inside the photo folder (a
                folder, a link out of it, a FIFO), or no longer the photo it was stored as.
        """
        path = self.photo_path(sha256, suffix)
        name = show_path(path)
        reason = outside_reason(path, self.photos)  # links are followed only inside the photo folder
        if reason == "no such file":
            raise StationError(f"{name}: the stored photo is missing (deleted or pruned)")
        if reason:
            raise StationError(f"{name}: the stored photo {reason}")
        try:
            data = read_file_bytes(path, name)
        except DataError as err:
            raise StationError(f"stored photo {err}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise StationError(f"{name}: the stored photo was changed since it was recorded (its content hash differs)")
        return data

    def photo_problem(self, sha256: str, suffix: str) -> str | None:
        """Why the stored photo cannot be trusted (`read_photo`'s message), or None when it can."""
        try:
            self.read_photo(sha256, suffix)
        except StationError as err:
            return str(err)
        return None

    # ------------------------------------------------------------ inspections and reviews

    def record(self, data: bytes, image: Image.Image | None = None, **fields: Any) -> int | None:
        """Store the photo, then one inspection row; its id, or None when `source_key` is already recorded.

        Args:
            data: The photo's bytes as received.
            image: The decoded upright image, when the caller has it (saves decoding again).
            fields: `Inspection` columns: file_name, source, verdict, p_ng, threshold, description,
                model_name, model_hash, latency_ms, source_key, line (default: the source), boxes_dropped;
                `defects`, the model's boxed defects (`[{"type", "box"}]`, photo pixels), kept as JSON; and
                `reference`, what the verdict was judged against (`Reference.record()`: a dict, or None for the
                photo alone), kept as JSON; leave it out where nothing is known of it.
        """
        if fields.get("source") not in SOURCES:
            raise StationError(f"source {fields.get('source')!r} is not one of {', '.join(SOURCES)}")
        photo = self.store_photo(data, image)
        fields["file_name"] = (fields.get("file_name") or "photo")[-255:]
        fields["line"] = (fields.get("line") or fields["source"])[:80]
        defects = fields.pop("defects", None)
        fields["defects_json"] = json.dumps(defects, ensure_ascii=False) if defects is not None else None
        if "reference" in fields:
            fields["reference_json"] = json.dumps(fields.pop("reference"), ensure_ascii=False)
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
            inspection = session.get(Inspection, inspection_id) if 0 < inspection_id <= MAX_RECORD_ID else None
            if inspection is None:
                raise StationError(f"{self.where}: no inspection with id {inspection_id}")
            photo = session.get(Photo, inspection.photo_sha256)
            problems = review_problems(verdict, operator, defect_type, boxes, photo, description)
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
    verdict: str,
    operator: str,
    defect_type: str | None,
    boxes: list[Any],
    photo: Photo | None,
    description: str | None = None,
) -> list[str]:
    """Every problem with a review: verdict, operator, defect type, description, and boxes inside the photo,
    no more of them than `export` can hand to `prepare` (MAX_REVIEW_BOXES)."""
    problems = []
    if verdict not in ("OK", "NG"):
        problems.append(f"verdict {verdict!r} is not OK or NG")
    if not operator or not operator.strip():
        problems.append("operator: give the reviewer's name")
    elif len(operator.strip()) > MAX_OPERATOR_CHARS:
        problems.append(f"operator: {len(operator.strip())} characters, more than {MAX_OPERATOR_CHARS}")
    if description is not None and len(description.strip()) > MAX_DESCRIPTION_CHARS:
        problems.append(f"description: {len(description.strip()):,} characters, more than {MAX_DESCRIPTION_CHARS:,}")
    if defect_type and (len(defect_type) > 80 or "/" in defect_type or "\\" in defect_type):
        problems.append(f"defect type {defect_type!r} must be under 80 characters without slashes")
    if verdict == "OK" and (boxes or defect_type):
        problems.append("an OK verdict takes no defect type or boxes")
    if not isinstance(boxes, list):
        return [*problems, "boxes must be a list of [x0, y0, x1, y1]"]
    if len(boxes) > MAX_REVIEW_BOXES:
        return [*problems, f"boxes: {len(boxes):,} boxes, more than the {MAX_REVIEW_BOXES:,} a review may hold"]
    for i, box in enumerate(boxes):
        problems += [f"boxes[{i}]: {p}" for p in box_problems(box)]
        if photo is not None and not box_problems(box) and (box[2] > photo.width or box[3] > photo.height):
            problems.append(f"boxes[{i}]: {box} reaches outside the {photo.width}x{photo.height} photo")
    return problems


# ---------------------------------------------------------------- opening


def open_store(
    station: str | Path | None, db: str | None = None, create: bool = True, write: bool = True
) -> StationStore:
    """Open the station in folder `station`, its database there or at URL `db`.

    Args:
        station: The station folder (photos, and the SQLite database unless `db` is given).
        db: A database URL instead of `station/station.db`.
        create: Make the folder and database when there is none; off for the verbs that expect one (a typo
            then says no station is there instead of starting an empty one).
        write: Off for the verbs that only read: a read-only SQLite station is then opened read-only.

    Raises:
        StationError: no station there (`create` off), the folder cannot be made or written, the station is
            read-only and `write` is on, the URL is malformed, the database cannot be reached, or its schema
            is newer than this version (both revisions named) or cannot be migrated.
    """
    if not station:
        raise StationError("a station folder is needed for the photos (--station DIR), also with --db")
    folder = Path(station).expanduser()
    url = db or f"sqlite:///{(folder / DB_NAME).resolve()}"
    where = _shown(url, folder)
    if not create and not (folder / PHOTOS).is_dir():
        raise StationError(f"{show_path(folder)}: no station there (no {PHOTOS}/ folder); check --station")
    if not create and db is None and not (folder / DB_NAME).is_file():
        raise StationError(f"{where}: no station database there; check --station")
    read_only = db is None and folder.is_dir() and not _writable(folder)
    if read_only and write:
        raise StationError(f"{show_path(folder)}: the station is read-only here, and this verb writes to it")
    if create:
        try:
            (folder / PHOTOS).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StationError(f"{folder}: cannot create the station folder ({err.strerror or err})") from None
    engine = _read_only_engine(folder / DB_NAME) if read_only else _engine(url, where)
    try:
        migrate(engine, where, create=create, read_only=read_only)
    except SQLAlchemyError as err:
        engine.dispose()
        raise StationError(f"{where}: cannot open the station database ({_short(err)})") from None
    except StationError:
        engine.dispose()
        raise
    return StationStore(engine, folder, where)


def _writable(folder: Path) -> bool:
    """Whether this process may write the SQLite station (the database file, and its folder for the WAL files);
    False on a read-only mount too, even for root."""
    database = folder / DB_NAME
    return os.access(folder, os.W_OK) and (not database.exists() or os.access(database, os.W_OK))


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


def _read_only_engine(database: Path) -> Engine:
    """A read-only SQLite connection. A WAL database needs its `-shm` file, which a read-only folder cannot get;
    with no `-wal` file beside it every committed write is in the main file, so it is opened as immutable."""
    wal = database.with_name(database.name + "-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    url = f"sqlite:///file:{quote(str(database.resolve()))}?{mode}&uri=true"
    engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    _configure_sqlite(engine, read_only=True)
    return engine


def _configure_sqlite(engine: Engine, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # Take the write lock up front: a reader that later writes cannot deadlock with another writer.
        # Read-only: a plain BEGIN, one snapshot for the whole read.
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def migrate(engine: Engine, where: str = "the station", create: bool = True, read_only: bool = False) -> None:
    """Bring the schema to the newest revision; concurrent openers wait for each other.

    Raises:
        StationError: the store's revision is one this version does not know (a newer vlm-inspect migrated it),
            it has no schema yet and `create` is off, or it is behind and `read_only` is on.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(config)
    head = script.get_current_head()
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql" and not read_only:
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        current = MigrationContext.configure(connection).get_current_revision()
        if current == head:
            return
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise StationError(
                f"{where}: its schema is at revision {current!r}, which this version of vlm-inspect does not know "
                f"(it knows up to {head!r}): a newer vlm-inspect migrated it; upgrade vlm-inspect to use this station"
            )
        if current is None and not create:
            raise StationError(f"{where}: holds no station (no schema); check --station and --db")
        if read_only:
            raise StationError(
                f"{where}: its schema is at revision {current!r}, older than this version's {head!r}, and the "
                "station is read-only here, so it cannot be upgraded; open it once where it can be written"
            )
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
