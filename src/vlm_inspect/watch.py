"""`vlm-inspect watch FOLDER`: inspect each photo a line camera writes into a hot folder, once.

A file is read only when its size and modification time are the same on two polls in a row, so a
photo still being written is left for later. The station store is the ledger: every photo is
recorded under its key `path|size|mtime_ns` (plus its content hash), so after a restart a photo
already recorded is not inspected again, and one recorded but not yet moved or answered is moved or
answered without a second inspection. Two watchers on one folder record each photo once (the key is
unique in the database), and run the model once per photo: a watcher claims a photo in the store before
inspecting it (station/claims.py). After inspection a photo is left as it is, moved into `ok/` or `ng/`, or
answered with `<photo>.result.json` beside it.

One photo never stops the line: a photo that cannot be read (too large, not an image, a FIFO, a link out of the
folder), named (a name that is not UTF-8, one too long for its result file) or answered (the model fails on it)
is logged as skipped with its reason, and the photos after it are inspected, after a restart too. A file's size
is checked before it is read. Names are printed as they are (markup and control characters shown, not obeyed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from vlm_inspect.config import WatchConfig, require
from vlm_inspect.data.images import IMAGE_SUFFIXES, load_image, read_file_bytes
from vlm_inspect.data.safe_read import MAX_NAME_BYTES, fit_file_name, outside_reason, printable, show_path
from vlm_inspect.errors import ConfigError, DataError, StationError
from vlm_inspect.inference import Answer, Predictor
from vlm_inspect.station.baselines import keep_report, read_report
from vlm_inspect.station.claims import claim, new_owner, release
from vlm_inspect.station.identity import model_identity
from vlm_inspect.station.line_settings import LineSettings, line_problems
from vlm_inspect.station.metrics import serve_metrics
from vlm_inspect.station.monitor import LineMonitor
from vlm_inspect.station.references import GoldenSource
from vlm_inspect.station.store import StationStore, open_store

RESULT_SUFFIX = ".result.json"
SORT_FOLDERS = ("ok", "ng")
console = Console()


@dataclass
class _Ready:
    path: Path
    key: str

    @property
    def name(self) -> str:
        """The file name as stored in the record: bytes that are not UTF-8 shown as `\\xNN`."""
        return show_path(self.path.name)


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
        shown = f"watching {printable(cfg.folder)} as line {printable(watcher.line)} with {printable(predictor.name)}"
        console.print(f"{escape(shown)}; recording to {escape(printable(store.where))}", highlight=False)
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
        self.told: set[str] = set()  # skipped entries already logged with their reason, so each is logged once
        self.owner = new_owner()  # names this watcher's claims
        self.inspected = 0
        self.golden = GoldenSource(store, predictor.product, enabled=cfg.reference == "run")
        self.against_said: str | None = None

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
            _Ready(path, f"{show_path(path)}|{size}|{mtime}")  # a name that is not UTF-8 still makes a key
            for path, (size, mtime) in sorted(current.items(), key=lambda item: (item[1][1], item[0]))
            if self.previous.get(path) == (size, mtime) and f"{show_path(path)}|{size}|{mtime}" not in self.done
        ]
        self.previous = current
        count = 0
        for start in range(0, len(ready), self.cfg.batch_size):
            count += self._handle(ready[start : start + self.cfg.batch_size])
        self.inspected += count
        return count

    def _scan(self) -> dict[Path, tuple[int, int]]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError as err:  # a network share gone for a moment: the next poll looks again
            self._tell(self.folder, f"the hot folder cannot be listed ({err.strerror or err}); trying again")
            return {}
        found = {}
        for entry in entries:
            name = entry.name
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(entry.path)
            try:
                reason = outside_reason(path, self.folder) if entry.is_symlink() else None
                if reason is None and entry.is_file():
                    stat = entry.stat()
                    found[path] = (stat.st_size, stat.st_mtime_ns)
                elif reason is None:
                    reason = "not a regular file (a folder, FIFO, socket or device), so it is not read"
            except FileNotFoundError:  # moved away by another watcher meanwhile
                continue
            except OSError as err:
                reason = f"cannot be looked at ({err.strerror or err})"
            if reason:
                self._tell(path, reason)
        return found

    def _handle(self, batch: list[_Ready]) -> int:
        todo, images, blobs = [], [], []
        for item in batch:
            if self._finish_recorded(item):  # inspected before a restart, or by another watcher
                continue
            if not claim(self.store, item.key, self.owner):
                continue  # another watcher is inspecting it now; its record is looked up next poll
            if self._finish_recorded(item):  # recorded between the look above and the claim
                release(self.store, item.key, self.owner)
                continue
            loaded = self._load(item)
            if loaded is None:
                release(self.store, item.key, self.owner)
                continue
            todo.append(item)
            blobs.append(loaded[0])
            images.append(loaded[1])
        if not todo:
            return 0
        started = time.perf_counter()
        against = self._against()
        todo, blobs, images, scores = self._score(todo, blobs, images, against)
        answers = self._describe(todo, images, scores, against)
        latency = (time.perf_counter() - started) * 1000 / max(len(todo), 1)
        used = self.predictor.reference_for(against).record()
        for item, data, image, p_ng, answer in zip(todo, blobs, images, scores, answers, strict=True):
            verdict = "NG" if p_ng >= self.cfg.threshold else "OK"
            record_id = self.store.record(
                data,
                image,
                file_name=item.name,
                source="watch",
                source_key=item.key,
                verdict=verdict,
                p_ng=p_ng,
                threshold=self.cfg.threshold,
                description=answer.text if answer else None,
                defects=answer.defects if answer else None,
                boxes_dropped=answer.boxes_dropped if answer else None,
                reference=used,
                model_name=self.predictor.name,
                model_hash=self.model_hash,
                latency_ms=round(latency, 1),
                line=self.line,
            )
            release(self.store, item.key, self.owner)
            self.monitor.answered(self.line, self.predictor.name, verdict, latency)
            said = {"defects": answer.defects if answer else None, "reference": used}
            if record_id is None:  # another watcher recorded it first: its verdict stands
                recorded = self.store.find_key(item.key)
                verdict, p_ng, record_id, said = recorded.verdict, recorded.p_ng, recorded.id, _said(recorded)
            self._finish(item, verdict, p_ng, record_id, said)
        self.monitor.maybe_check()
        return len(todo)

    def _against(self) -> Any:
        """The station's golden set for the product when one is in force (None: the predictor's own references);
        a set whose stored photos cannot be read is logged and the predictor's own are used, as each record says."""
        try:
            against = self.golden.current()
        except (StationError, DataError) as err:
            self._tell(self.folder, f"the station's golden set cannot be used ({err})", "judging without")
            against = None
        said = self.predictor.reference_for(against).label()
        if said != self.against_said:
            self.against_said = said
            console.print(f"judging against {escape(printable(said))}", highlight=False)
        return against

    def _finish_recorded(self, item: _Ready) -> bool:
        recorded = self.store.find_key(item.key)
        if recorded is not None:
            self._finish(item, recorded.verdict, recorded.p_ng, recorded.id, _said(recorded))
        return recorded is not None

    def _load(self, item: _Ready) -> tuple[bytes, Any] | None:
        name = printable(item.path)
        try:
            data = read_file_bytes(item.path, name)  # the size limit applies before a byte is read
            return data, load_image(data, name=name)
        except DataError as err:
            if os.path.lexists(item.path):  # else moved away by another watcher: nothing to say
                self._skip(item, str(err).removeprefix(f"{name}: "))
            return None

    def _score(
        self, todo: list[_Ready], blobs: list[bytes], images: list[Any], against: Any = None
    ) -> tuple[list, list, list, list]:
        """(photos, bytes, images, p(NG)) of the photos the model answered. When it fails on a batch, each photo is
        scored alone, so the one it cannot answer is skipped with the reason and the others are inspected."""
        try:
            scores = self.predictor.score(images, batch_size=self.cfg.batch_size, reference=against)
            return todo, blobs, images, scores
        except Exception as err:  # whatever the model raises on one photo must not stop the line
            failure = err
        if len(todo) == 1:
            self._skip(todo[0], f"the model could not answer it ({type(failure).__name__}: {failure})")
            release(self.store, todo[0].key, self.owner)
            return [], [], [], []
        rows = [
            self._score([item], [data], [image], against) for item, data, image in zip(todo, blobs, images, strict=True)
        ]
        return tuple([value for row in rows for value in row[k]] for k in range(4))  # type: ignore[return-value]

    def _skip(self, item: _Ready, reason: str) -> None:
        """Log a photo as skipped with its reason; not tried again until the file changes or the watcher restarts."""
        self.done.add(item.key)
        self._tell(item.path, reason)

    def _tell(self, path: Path, reason: str, what: str = "skipped") -> None:
        said = f"{printable(path.name)}: {printable(reason)}"
        if said not in self.told:
            self.told.add(said)
            console.print(f"[yellow]{what}[/] {escape(said)}", highlight=False)

    def _describe(
        self, todo: list[_Ready], images: list[Any], scores: list[float], against: Any = None
    ) -> list[Answer | None]:
        """The NG photos' answers, when asked: the description and the defects it boxes (`describe`), or the
        boxes alone (`locate`, which keeps the description when both are asked). A photo the model cannot answer
        keeps its verdict, without them, and the reason is logged."""
        answers: list[Answer | None] = [None] * len(images)
        ng = [i for i, p in enumerate(scores) if p >= self.cfg.threshold]
        if not ng or not (self.cfg.describe or self.cfg.locate):
            return answers
        try:
            found = self._answers([images[i] for i in ng], against)
        except Exception:  # whatever the model raises on one photo must not stop the line: each alone
            found = [self._answer_one(todo[i], images[i], against) for i in ng]
        for i, answer in zip(ng, found, strict=True):
            answers[i] = answer
        return answers

    def _answers(self, photos: list[Any], against: Any = None) -> list[Answer]:
        described = self.predictor.answers(photos, reference=against) if self.cfg.describe else [None] * len(photos)
        located = self.predictor.locate(photos, reference=against) if self.cfg.locate else described
        return [
            Answer(text.text if text else None, boxes.defects, boxes.boxes_dropped)
            for text, boxes in zip(described, located, strict=True)
        ]

    def _answer_one(self, item: _Ready, image: Any, against: Any = None) -> Answer | None:
        try:
            return self._answers([image], against)[0]
        except Exception as err:
            self._tell(item.path, f"the model could not describe it ({err})", "recorded without a description")
            return None

    def _finish(self, item: _Ready, verdict: str, p_ng: float | None, record_id: int, said: dict) -> None:
        """Move or answer the photo as asked; safe to repeat after a crash. One that cannot be moved or answered
        (a name too long for its result file, a read-only folder) is logged; its record stays."""
        self.done.add(item.key)
        where = ""
        try:
            if self.cfg.sort == "move":
                where = self._move(item.path, verdict)
            elif self.cfg.sort == "result-file":
                where = self._answer(item.path, verdict, p_ng, record_id, said)
        except OSError as err:
            done = "moved" if self.cfg.sort == "move" else "answered"
            where = f"  (recorded as {record_id}, but not {done}: {err.strerror or err})"
        line = f"{verdict} {p_ng if p_ng is not None else 0:.3f}  {printable(item.path.name)}{where}"
        console.print(line, highlight=False, markup=False)

    def _move(self, path: Path, verdict: str) -> str:
        target_dir = self.folder / verdict.lower()
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        n = 1
        while target.exists():  # never overwrite a photo already sorted under that name
            target = target_dir / fit_file_name(path.stem, f"-{n}{path.suffix}")  # a long name still fits
            n += 1
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return "  (already moved)"
        return f"  -> {printable(target.relative_to(self.folder))}"

    def _answer(self, path: Path, verdict: str, p_ng: float | None, record_id: int, said: dict) -> str:
        """The result file: verdict, p(NG), model, record id, the reference judged against (when known) and the
        boxes (when asked)."""
        result = path.with_name(path.name + RESULT_SUFFIX)
        if len(os.fsencode(result.name)) > MAX_NAME_BYTES:
            return f"  (recorded as {record_id}; no {RESULT_SUFFIX}: its name would be over {MAX_NAME_BYTES} bytes)"
        if result.exists():
            return f"  ({printable(result.name)} already written)"
        body = {"file": show_path(path.name), "verdict": verdict, "p_ng": p_ng, "threshold": self.cfg.threshold}
        body |= {"model": self.predictor.name, "record_id": record_id}
        if "reference" in said:
            body["reference"] = said["reference"]
        if said.get("defects") is not None:
            body["defects"] = said["defects"]
        tmp = result.with_name(fit_file_name(f".{result.name}", ".tmp"))
        tmp.write_text(json.dumps(body, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, result)
        return f"  -> {printable(result.name)}"


def _said(recorded: Any) -> dict:
    """What an earlier inspection recorded besides its verdict: its boxes (the photo's pixels, or None) and, when
    known, the reference it was judged against."""
    said = {"defects": json.loads(recorded.defects_json) if recorded.defects_json else None}
    if recorded.reference_json is not None:
        said["reference"] = json.loads(recorded.reference_json)
    return said
