"""`vlm-inspect watch FOLDER`: inspect each photo a line camera writes into a hot folder, once.

A file is read only when its size and modification time are the same on two polls in a row, so a
photo still being written is left for later. The station store is the ledger: every photo is
recorded under its key `path|size|mtime_ns` (plus its content hash), so after a restart a photo
already recorded is not inspected again, and one recorded but not yet moved or answered is moved or
answered without a second inspection. Two watchers on one folder record each photo once (the key is
unique in the database). After inspection a photo is left as it is, moved into `ok/` or `ng/`, or
answered with `<photo>.result.json` beside it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from vlm_inspect.config import WatchConfig, require
from vlm_inspect.data.images import IMAGE_SUFFIXES, load_image
from vlm_inspect.errors import ConfigError, DataError
from vlm_inspect.inference import Answer, Predictor
from vlm_inspect.station.baselines import keep_report, read_report
from vlm_inspect.station.identity import model_identity
from vlm_inspect.station.line_settings import LineSettings, line_problems
from vlm_inspect.station.metrics import serve_metrics
from vlm_inspect.station.monitor import LineMonitor
from vlm_inspect.station.store import StationStore, open_store

RESULT_SUFFIX = ".result.json"
SORT_FOLDERS = ("ok", "ng")
console = Console()


@dataclass
class _Ready:
    path: Path
    key: str


def watch(cfg: WatchConfig) -> Path:
    """Inspect the hot folder until interrupted (or for `once` / `max_polls`); the folder.

    Raises:
        ConfigError: a setting is unusable (every problem listed).
        ModelFolderError: the model or adapter cannot be loaded.
        StationError: the station cannot be opened or written (a full disk names the folder).
    """
    check_watch_config(cfg)
    store = open_store(cfg.station, cfg.db)
    metrics = None
    try:
        predictor = Predictor.load(cfg)
        watcher = Watcher(store, predictor, cfg, model_identity(cfg.model, cfg.adapter)[1])
        if cfg.baseline:
            keep_report(store, watcher.model_hash, predictor.name, read_report(cfg.baseline))
        if cfg.metrics_port is not None:
            metrics = serve_metrics(watcher.monitor.metrics, cfg.metrics_host, cfg.metrics_port)
        console.print(f"watching {cfg.folder} as line {watcher.line} with {predictor.name}; recording to {store.where}")
        watcher.run()
    finally:
        if metrics is not None:
            metrics.shutdown()
        store.close()
    return Path(cfg.folder)


def check_watch_config(cfg: WatchConfig) -> None:
    problems = cfg.model_problems() + require(cfg, "folder", "station")
    if cfg.folder and not Path(cfg.folder).is_dir():
        problems.append(f"folder: {cfg.folder} is not a folder")
    if not 0.0 <= cfg.threshold <= 1.0:
        problems.append(f"threshold: {cfg.threshold} is not between 0 and 1")
    if cfg.poll_s <= 0:
        problems.append(f"poll_s: {cfg.poll_s} must be more than 0")
    if cfg.batch_size < 1:
        problems.append(f"batch_size: {cfg.batch_size} must be at least 1")
    if cfg.max_polls is not None and cfg.max_polls < 1:
        problems.append(f"max_polls: {cfg.max_polls} must be at least 1")
    if cfg.metrics_port is not None and not 1 <= cfg.metrics_port <= 65535:
        problems.append(f"metrics_port: {cfg.metrics_port} is not between 1 and 65535")
    problems += line_problems(cfg)
    if problems:
        raise ConfigError(problems)


class Watcher:
    """Polls one folder; `poll()` inspects every photo that has stopped changing since the last poll."""

    def __init__(self, store: StationStore, predictor: Any, cfg: WatchConfig, model_hash: str):
        self.store, self.predictor, self.cfg, self.model_hash = store, predictor, cfg, model_hash
        self.folder = Path(cfg.folder).resolve()
        self.line = (cfg.line or self.folder.name)[:80]  # the camera's folder names the line unless --line does
        self.monitor = LineMonitor(store, LineSettings.of(cfg))
        self.previous: dict[Path, tuple[int, int]] = {}
        self.done: set[str] = set()  # keys finished in this run: no database look-up each poll
        self.inspected = 0

    def run(self) -> None:
        limit = 2 if self.cfg.once and self.cfg.max_polls is None else self.cfg.max_polls
        polls = 0
        while True:
            self.poll()
            polls += 1
            if limit is not None and polls >= limit:
                return
            time.sleep(self.cfg.poll_s)

    def poll(self) -> int:
        """One look at the folder; how many photos were inspected."""
        current = self._scan()
        ready = [
            _Ready(path, f"{path}|{size}|{mtime}")
            for path, (size, mtime) in sorted(current.items(), key=lambda item: (item[1][1], item[0]))
            if self.previous.get(path) == (size, mtime) and f"{path}|{size}|{mtime}" not in self.done
        ]
        self.previous = current
        count = 0
        for start in range(0, len(ready), self.cfg.batch_size):
            count += self._handle(ready[start : start + self.cfg.batch_size])
        self.inspected += count
        return count

    def _scan(self) -> dict[Path, tuple[int, int]]:
        found = {}
        for entry in os.scandir(self.folder):
            name = entry.name
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if entry.is_file():
                    stat = entry.stat()
                    found[Path(entry.path)] = (stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:  # moved away by another watcher meanwhile
                continue
        return found

    def _handle(self, batch: list[_Ready]) -> int:
        todo, images, blobs = [], [], []
        for item in batch:
            recorded = self.store.find_key(item.key)
            if recorded is not None:  # inspected before a restart, or by another watcher
                self._finish(item, recorded.verdict, recorded.p_ng, recorded.id, _defects(recorded))
                continue
            loaded = self._load(item)
            if loaded is not None:
                todo.append(item)
                blobs.append(loaded[0])
                images.append(loaded[1])
        if not todo:
            return 0
        started = time.perf_counter()
        scores = self.predictor.score(images, batch_size=self.cfg.batch_size)
        answers = self._describe(images, scores)
        latency = (time.perf_counter() - started) * 1000 / len(todo)
        for item, data, image, p_ng, answer in zip(todo, blobs, images, scores, answers, strict=True):
            verdict = "NG" if p_ng >= self.cfg.threshold else "OK"
            record_id = self.store.record(
                data,
                image,
                file_name=item.path.name,
                source="watch",
                source_key=item.key,
                verdict=verdict,
                p_ng=p_ng,
                threshold=self.cfg.threshold,
                description=answer.text if answer else None,
                defects=answer.defects if answer else None,
                boxes_dropped=answer.boxes_dropped if answer else None,
                model_name=self.predictor.name,
                model_hash=self.model_hash,
                latency_ms=round(latency, 1),
                line=self.line,
            )
            self.monitor.answered(self.line, self.predictor.name, verdict, latency)
            defects = answer.defects if answer else None
            if record_id is None:  # another watcher recorded it first: its verdict stands
                recorded = self.store.find_key(item.key)
                verdict, p_ng, record_id, defects = recorded.verdict, recorded.p_ng, recorded.id, _defects(recorded)
            self._finish(item, verdict, p_ng, record_id, defects)
        self.monitor.maybe_check()
        return len(todo)

    def _load(self, item: _Ready) -> tuple[bytes, Any] | None:
        try:
            data = item.path.read_bytes()
            return data, load_image(data, name=str(item.path))
        except FileNotFoundError:
            return None  # moved away by another watcher
        except DataError as err:
            console.print(f"[yellow]skipped[/] {err}")
            self.done.add(item.key)  # not retried until the file changes
            return None

    def _describe(self, images: list[Any], scores: list[float]) -> list[Answer | None]:
        """The NG photos' answers, when asked: the description and the defects it boxes (`describe`), or the
        boxes alone (`locate`, which also keeps the description when both are asked)."""
        answers: list[Answer | None] = [None] * len(images)
        ng = [i for i, p in enumerate(scores) if p >= self.cfg.threshold]
        if not ng or not (self.cfg.describe or self.cfg.locate):
            return answers
        photos = [images[i] for i in ng]
        described = self.predictor.answers(photos) if self.cfg.describe else [None] * len(ng)
        located = self.predictor.locate(photos) if self.cfg.locate else described
        for i, text, boxes in zip(ng, described, located, strict=True):
            answers[i] = Answer(text.text if text else None, boxes.defects, boxes.boxes_dropped)
        return answers

    def _finish(
        self, item: _Ready, verdict: str, p_ng: float | None, record_id: int, defects: list[dict] | None = None
    ) -> None:
        """Move or answer the photo as asked; safe to repeat after a crash."""
        self.done.add(item.key)
        where = ""
        if self.cfg.sort == "move":
            where = self._move(item.path, verdict)
        elif self.cfg.sort == "result-file":
            where = self._answer(item.path, verdict, p_ng, record_id, defects)
        console.print(f"{verdict} {p_ng if p_ng is not None else 0:.3f}  {item.path.name}{where}", highlight=False)

    def _move(self, path: Path, verdict: str) -> str:
        target_dir = self.folder / verdict.lower()
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        n = 1
        while target.exists():  # never overwrite a photo already sorted under that name
            target = target_dir / f"{path.stem}-{n}{path.suffix}"
            n += 1
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return "  (already moved)"
        return f"  -> {target.relative_to(self.folder)}"

    def _answer(self, path: Path, verdict: str, p_ng: float | None, record_id: int, defects: list[dict] | None) -> str:
        result = path.with_name(path.name + RESULT_SUFFIX)
        if result.exists():
            return f"  ({result.name} already written)"
        body = {"file": path.name, "verdict": verdict, "p_ng": p_ng, "threshold": self.cfg.threshold}
        body |= {"model": self.predictor.name, "record_id": record_id}
        if defects is not None:
            body["defects"] = defects
        tmp = result.with_name(f".{result.name}.tmp")
        tmp.write_text(json.dumps(body, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, result)
        return f"  -> {result.name}"


def _defects(recorded: Any) -> list[dict] | None:
    """The boxes an earlier inspection recorded (the photo's pixels), or None."""
    return json.loads(recorded.defects_json) if recorded.defects_json else None
