"""`vlm-inspect label PHOTOS --station DIR`: the history page as a labeller for a fresh photo folder, no model.

Every photo in PHOTOS is put in the station (once: keyed by path, size and modification time, so a
second start adds only new photos) as a record with no verdict; the page at `/` then shows them one
at a time to sort into OK / NG, type and box the defects. `vlm-inspect export` turns the labels into
class folders with sidecars for `prepare`.

Like `prepare`, it reads nothing outside PHOTOS (a link out of it, or to nowhere, is skipped with the reason, as
are FIFOs and unreadable files), checks a file's size before reading it, and keeps a name that is not UTF-8 with
its bytes shown as `\\xNN`; a photo it cannot use is logged and the others are queued.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from vlm_inspect.config import LabelConfig, require
from vlm_inspect.data.images import IMAGE_SUFFIXES, load_image, read_file_bytes
from vlm_inspect.data.safe_read import printable, show_path, walk_files
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.service.http import bind, run_server
from vlm_inspect.service.station_routes import label_app
from vlm_inspect.station.store import StationStore, open_store

console = Console()


def label(cfg: LabelConfig) -> Path:
    """Queue the folder's photos for labelling and serve the labeller page until interrupted; the station folder.

    Raises:
        ConfigError: a setting is unusable, or the address cannot be bound.
        StationError: the station cannot be opened or written.
    """
    check_label_config(cfg)
    sock = bind(cfg.host, cfg.port)
    store = open_store(cfg.station, cfg.db)
    try:
        added, total = queue_photos(store, Path(cfg.photos))
        console.print(f"{added} new photo(s) queued for labelling ({total} in {escape(printable(cfg.photos))})")
        app = label_app(store, cfg.api_key, cfg.host, cfg.port)
        console.print(
            f"labeller at http://{cfg.host}:{cfg.port}/  (export: vlm-inspect export --station {cfg.station})"
        )
        run_server(app, sock, "warning")
    finally:
        sock.close()
        store.close()
    return Path(cfg.station)


def check_label_config(cfg: LabelConfig) -> None:
    problems = require(cfg, "photos", "station")
    if cfg.photos and not Path(cfg.photos).is_dir():
        problems.append(f"photos: {cfg.photos} is not a folder")
    elif cfg.photos and cfg.station and Path(cfg.photos).resolve() in Path(cfg.station).resolve().parents:
        problems.append(f"station: {cfg.station} lies inside the photo folder; its stored photos would be labelled too")
    if not 1 <= cfg.port <= 65535:
        problems.append(f"port: {cfg.port} is not between 1 and 65535")
    if cfg.api_key is not None and not cfg.api_key.strip():
        problems.append("api_key: empty; leave it unset or give a key")
    if problems:
        raise ConfigError(problems)


def queue_photos(store: StationStore, folder: Path) -> tuple[int, int]:
    """Record every photo under `folder` not yet in the station; (added, photos found)."""
    files, refused = walk_files(folder, folder, recursive=True)
    for path, reason in refused:
        _skipped(path, reason)
    photos = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    added = 0
    for path in photos:
        try:
            stat = path.stat()
        except OSError as err:
            _skipped(path, f"cannot be looked at ({err.strerror or err})")
            continue
        key = f"label:{show_path(path.resolve())}|{stat.st_size}|{stat.st_mtime_ns}"
        if store.find_key(key) is not None:
            continue
        try:
            data = read_file_bytes(path, printable(path))  # the size limit applies before a byte is read
            image = load_image(data, name=printable(path))
        except DataError as err:
            _skipped(path, str(err).removeprefix(f"{printable(path)}: "))
            continue
        name = show_path(path.relative_to(folder).as_posix())
        if store.record(data, image, file_name=name, source="label", source_key=key) is not None:
            added += 1
    return added, len(photos)


def _skipped(path: Path, reason: str) -> None:
    console.print(f"[yellow]skipped[/] {escape(printable(path))}: {escape(printable(reason))}", highlight=False)
