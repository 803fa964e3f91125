"""`vlm-inspect label PHOTOS --station DIR`: the history page as a labeller for a fresh photo folder, no model.

Every photo in PHOTOS is put in the station (once: keyed by path, size and modification time, so a
second start adds only new photos) as a record with no verdict; the page at `/` then shows them one
at a time to sort into OK / NG, type and box the defects. `vlm-inspect export` turns the labels into
class folders with sidecars for `prepare`.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from vlm_inspect.config import LabelConfig, require
from vlm_inspect.data.images import find_images, load_image
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.station.store import StationStore, open_store

console = Console()


def label(cfg: LabelConfig) -> Path:
    """Queue the folder's photos for labelling and serve the labeller page until interrupted; the station folder.

    Raises:
        ConfigError: a setting is unusable, or the address cannot be bound.
        StationError: the station cannot be opened or written.
    """
    check_label_config(cfg)
    from vlm_inspect.serve import app as serving  # raises an install hint without the serve extra

    sock = serving._bind(cfg.host, cfg.port)
    store = open_store(cfg.station, cfg.db)
    try:
        added, total = queue_photos(store, Path(cfg.photos))
        console.print(f"{added} new photo(s) queued for labelling ({total} in {cfg.photos})")
        app = label_app(store, cfg.api_key, cfg.host, cfg.port)
        console.print(
            f"labeller at http://{cfg.host}:{cfg.port}/  (export: vlm-inspect export --station {cfg.station})"
        )
        server = serving.uvicorn.Server(serving.uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
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
    photos = find_images([folder])
    added = 0
    for path in photos:
        stat = path.stat()
        key = f"label:{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if store.find_key(key) is not None:
            continue
        data = path.read_bytes()
        try:
            image = load_image(data, name=str(path))
        except DataError as err:
            console.print(f"[yellow]skipped[/] {err}")
            continue
        name = path.relative_to(folder).as_posix()
        if store.record(data, image, file_name=name, source="label", source_key=key) is not None:
            added += 1
    return added, len(photos)


def label_app(store: StationStore, api_key: str | None, host: str = "127.0.0.1", port: int = 8000):  # -> FastAPI
    """The labeller: the station routes and the page, without a model."""
    from fastapi import Depends, FastAPI
    from fastapi.responses import RedirectResponse

    from vlm_inspect.serve import app as serving
    from vlm_inspect.serve.line_routes import line_router
    from vlm_inspect.serve.station_routes import station_router
    from vlm_inspect.station.line_settings import LineSettings
    from vlm_inspect.station.monitor import LineMonitor

    app = FastAPI(title="vlm-inspect label", docs_url=None, redoc_url=None, openapi_url=None)
    serving.guard(app, host, port)
    auth, monitor = [Depends(serving._key_checker(api_key))], LineMonitor(store, LineSettings())
    app.include_router(station_router(store, auth, serving._page_file, monitor.settings.sample))
    app.include_router(line_router(monitor, auth, serving._page_file))

    @app.get("/", include_in_schema=False)
    async def start() -> RedirectResponse:
        return RedirectResponse("/history?label=1")

    @app.get("/static/app.css", include_in_schema=False)
    async def style():  # noqa: ANN202
        return serving._page_file("app.css")

    return app
