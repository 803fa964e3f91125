"""A corpus of bad inputs for the station's surfaces (issue #28): the hot folder, `label`, `export`, `prune`, the
station routes, stored photos, reviews, schema versions, model folders and settings, built in code.

For every case: no traceback (on the console, in the CLI's output, or as an HTTP 500), a message naming the file
or the field, nothing lost or duplicated in the store, the photos after a bad one still inspected (after a
restart too), and nothing opened outside the inputs (the audit hook of test_bad_inputs.py records every open).
Test names start with the class of the issue they belong to (poison, memory, store, review, output, versions,
numbers, model_folder, settings, paths, watchers).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from station_helpers import DarknessModel, photo
from test_bad_inputs import GBK_NAME, OPENED, header_only_png, no_traceback, png_bytes, sparse, tree_digest
from vlm_inspect.cli import app
from vlm_inspect.config import ExportConfig, ServeConfig, WatchConfig
from vlm_inspect.errors import StationError
from vlm_inspect.export import export
from vlm_inspect.station.history import HistoryFilter, all_records
from vlm_inspect.station.store import open_store
from vlm_inspect.watch import Watcher

runner = CliRunner()
LOOPBACK = "http://127.0.0.1:8000"
LONG_NAME = "n" * 251 + ".png"  # 255 bytes: the longest name a file system takes
MARKUP_NAME = "[bold]x[red]\ry[blink].png"


@pytest.fixture()
def opened() -> Iterator[list[str]]:
    OPENED.paths.clear()
    OPENED.active = True
    try:
        yield OPENED.paths
    finally:
        OPENED.active = False


def squashed(text: str) -> str:
    """Console text without whitespace: rich wraps long lines wherever it likes."""
    return "".join(text.split())


def stored_name(name: str) -> str:
    """A file name as the store keeps it: bytes that are not UTF-8 as `\\xNN`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def shown_name(name: str) -> str:
    """A file name as the console shows it: stored_name, with CR and tab escaped."""
    return stored_name(name).replace("\r", "\\r").replace("\t", "\\t")


def cli(*args: str) -> Any:
    result = runner.invoke(app, list(args), env={"COLUMNS": "400"})
    no_traceback(result.output)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


# ---------------------------------------------------------------- the hot folder: one photo never stops the line


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _link(target: Path) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


def _canary(path: Path) -> None:
    path.parent.parent.joinpath("outside").mkdir(exist_ok=True)
    (path.parent.parent / "outside" / "canary.jpg").write_bytes(photo(10, fmt="JPEG"))
    path.symlink_to(path.parent.parent / "outside" / "canary.jpg")


@dataclass(frozen=True)
class HotKind:
    """A bad photo in the hot folder: its name, how to write it, and "recorded" (an odd name on a good photo) or
    the reason it is skipped with."""

    name: str
    write: Callable[[Path], None]
    outcome: str


HOT_KINDS = [
    HotKind(GBK_NAME, lambda p: p.write_bytes(photo(20)), "recorded"),
    HotKind(LONG_NAME, lambda p: p.write_bytes(photo(20)), "recorded"),
    HotKind(MARKUP_NAME, lambda p: p.write_bytes(photo(20)), "recorded"),
    HotKind("empty.png", lambda p: p.write_bytes(b""), "empty file"),
    HotKind("truncated.png", lambda p: p.write_bytes(photo(20)[:60]), "cannot be decoded"),
    HotKind("note.jpg", lambda p: p.write_bytes(b"not a photo\n"), "not an image"),
    HotKind("strip.png", lambda p: p.write_bytes(png_bytes(1, 2000)), "strip, not a photo"),
    HotKind("bomb.png", lambda p: p.write_bytes(header_only_png(12000, 12000)), "pixels is more than the limit"),
    HotKind("huge.jpg", lambda p: sparse(p, 300 * 1024**2), "bytes is more than the limit"),
    HotKind("pipe.jpg", _fifo, "not a regular file"),
    HotKind("folder.jpg", lambda p: p.mkdir(), "not a regular file"),
    HotKind("dangling.jpg", _link(Path("/nonexistent/gone.jpg")), "dangling link"),
    HotKind("outside.jpg", _canary, "links outside"),
    HotKind(GBK_NAME.replace(".png", ".jpg"), lambda p: p.write_bytes(b"GBK-named garbage"), "not an image"),
    HotKind("answerless.png", lambda p: p.write_bytes(photo(20, size=(50, 50))), "the model could not answer"),
    HotKind("wordless.png", lambda p: p.write_bytes(photo(20, size=(60, 60))), "recorded: could not describe"),
]


class PickyModel(DarknessModel):
    """The fake model, failing on 50 x 50 photos (60 x 60 when describing) the way a real one fails on a photo."""

    def score(self, images, question=None, batch_size=8, reference=None):
        if any(image.size == (50, 50) for image in images):
            raise RuntimeError("shape mismatch in the vision tower")
        return super().score(images, question, batch_size, reference)

    def describe(self, images, question=None, max_new_tokens=64, batch_size=8, reference=None):
        if any(image.size == (60, 60) for image in images):
            raise RuntimeError("CUDA error: an illegal memory access")
        return super().describe(images, question, max_new_tokens, batch_size, reference)


def hot_watcher(folder: Path, station: Path, model: Any, **settings: Any) -> Watcher:
    cfg = WatchConfig(folder=str(folder), model="unused", station=str(station), poll_s=0.01, once=True, **settings)
    return Watcher(open_store(station), model, cfg, "hash0")


def _write_aged(path: Path, write: Callable[[Path], None], age_s: float) -> None:
    write(path)
    moment = time.time_ns() - int(age_s * 1e9)
    os.utime(path, ns=(moment, moment), follow_symlinks=False)


@pytest.mark.parametrize("sort", ["none", "move", "result-file"])
@pytest.mark.parametrize("kind", HOT_KINDS, ids=lambda k: repr(k.name)[:24])
def test_poison_photo_never_blocks_the_hot_folder(
    kind: HotKind, sort: str, tmp_path: Path, capsys: pytest.CaptureFixture, opened: list[str]
) -> None:
    folder, station = tmp_path / "hot", tmp_path / "station"
    folder.mkdir()
    if sort == "move" and kind.outcome.startswith("recorded"):
        for sub in ("ok", "ng"):  # a photo sorted earlier under the same name: kept, the new one renamed
            (folder / sub).mkdir()
            (folder / sub / kind.name).write_bytes(b"sorted before")
    _write_aged(folder / kind.name, kind.write, 100)  # the oldest: the first the watcher meets
    for i, shade in enumerate((230, 20)):
        _write_aged(folder / f"after-{i}.png", lambda p, s=shade: p.write_bytes(photo(s)), 50 - i)
    opened.clear()  # what the test itself wrote
    hot_watcher(folder, station, PickyModel(), sort=sort, describe=True).run()
    (folder / "after-restart.png").write_bytes(photo(200))
    restarted = hot_watcher(folder, station, PickyModel(), sort=sort, describe=True)
    restarted.run()  # the same bad photo again: still no stop
    out = capsys.readouterr().out
    no_traceback(out)
    files = sorted(r["file"] for r in all_records(restarted.store, HistoryFilter()))
    expected = ["after-0.png", "after-1.png", "after-restart.png"]
    if kind.outcome.startswith("recorded"):
        expected = sorted([*expected, stored_name(kind.name)])
        assert squashed(shown_name(kind.name))[:40] in squashed(out) and "\r" not in out, out
        assert squashed(kind.outcome.partition(": ")[2]) in squashed(out), out
        if sort == "move":
            assert (
                (folder / "ok" / kind.name).read_bytes() == (folder / "ng" / kind.name).read_bytes() == b"sorted before"
            )
    else:
        assert squashed(kind.outcome) in squashed(out), out
    assert files == expected  # each photo once, the bad one never
    assert not [p for p in opened if "canary" in p], "read outside the hot folder"


def test_poison_watch_command_with_the_tiny_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The whole corpus in one hot folder through the real command and model: exit 0, every good photo answered."""
    folder, station = tmp_path / "hot", tmp_path / "station"
    folder.mkdir()
    for kind in HOT_KINDS:
        _write_aged(folder / kind.name, kind.write, 100)
    (folder / "good.png").write_bytes(photo(230))
    args = ["watch", str(folder), "--model", str(tiny_model_dir), "--station", str(station), "--once"]
    result = cli(*args, "--poll-s", "0.05", "--sort", "result-file", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (folder / "good.png.result.json").is_file()
    assert "not a regular file" in result.output and "bytes is more than the limit" in result.output


@pytest.mark.parametrize("kind", HOT_KINDS, ids=lambda k: repr(k.name)[:24])
def test_poison_photo_never_blocks_label(
    kind: HotKind, tmp_path: Path, capsys: pytest.CaptureFixture, opened: list[str]
) -> None:
    from vlm_inspect.label import queue_photos

    folder = tmp_path / "hot"
    folder.mkdir()
    kind.write(folder / kind.name)
    (folder / "good.png").write_bytes(photo(230))
    before = tree_digest(folder)
    opened.clear()
    store = open_store(tmp_path / "station")
    added, _ = queue_photos(store, folder)
    queue_photos(store, folder)  # a second start: nothing twice
    out = capsys.readouterr().out
    no_traceback(out)
    files = sorted(r["file"] for r in all_records(store, HistoryFilter()))
    recorded = kind.outcome.startswith("recorded") or "the model" in kind.outcome  # no model in the labeller
    assert files == sorted(["good.png", *([stored_name(kind.name)] * recorded)])
    if not recorded and kind.name != "folder.jpg":  # label searches folders, whatever their name
        assert squashed(kind.outcome.replace("dangling link", "dangling")) in squashed(out), out
    assert tree_digest(folder) == before and not [p for p in opened if "canary" in p]


# ---------------------------------------------------------------- memory: the size limit applies before reading


_MEMORY_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from station_helpers import DarknessModel
from vlm_inspect.config import WatchConfig
from vlm_inspect.label import queue_photos
from vlm_inspect.station.store import open_store
from vlm_inspect.watch import Watcher

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024

folder, station, verb = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[4]
store = open_store(station)
cfg = WatchConfig(folder=str(folder), model="x", station=str(station), poll_s=0.01, once=True)
watcher = Watcher(store, DarknessModel(), cfg, "h")
base = hwm()
watcher.run() if verb == "watch" else queue_photos(store, folder)
print("RISE", hwm() - base, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
@pytest.mark.parametrize("verb", ["watch", "label"])
@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_memory_an_oversized_photo_is_refused_before_it_is_read(verb: str, tmp_path: Path) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    sparse(folder / "fake.jpg", 300 * 1024**2)  # no disk space, 300 MiB if read
    (folder / "good.png").write_bytes(photo(230))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [str(folder), str(tmp_path / "station"), str(Path(__file__).parent), verb]
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *args], capture_output=True, text=True, env=env)
    no_traceback(done.stdout + done.stderr)
    rise = int(done.stdout.split("RISE")[-1])
    assert rise < 64, f"{rise} MiB for a refused file"
    assert squashed("bytes is more than the limit") in squashed(done.stdout)
    assert [r["file"] for r in all_records(open_store(tmp_path / "station"), HistoryFilter())] == ["good.png"]


# ---------------------------------------------------------------- the store checked where it is trusted


def _reviewed_station(folder: Path) -> tuple[Any, list[int]]:
    store = open_store(folder)
    ids = [
        store.record(photo(shade, spot=shade < 100), file_name=f"cam-{shade}.png", source="api", verdict="OK")
        for shade in (20, 200, 210)
    ]
    store.review(ids[0], "NG", "ann", "spot", [[6, 6, 24, 20]])
    for rid in ids[1:]:
        store.review(rid, "OK", "bob")
    return store, ids


def _damage(kind: str, path: Path, outside: Path) -> None:
    path.unlink()
    if kind == "replaced":  # another photo put in its place: it would go out under this record's label
        path.write_bytes(photo(230, spot=False))
    elif kind == "garbage":
        path.write_bytes(b"\x00" * 100)
    elif kind == "link":
        outside.mkdir(exist_ok=True)
        (outside / "canary.txt").write_text("root:x:0:0:secret\n")
        path.symlink_to(outside / "canary.txt")
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)


DAMAGES = {
    "replaced": "changed since it was recorded",
    "garbage": "changed since it was recorded",
    "link": "links outside",
    "folder": "is a folder",
    "fifo": "not a regular file",
    "missing": "missing",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_store_export_checks_each_photo_against_its_hash(
    damage: str, tmp_path: Path, capsys: pytest.CaptureFixture, opened: list[str]
) -> None:
    store, ids = _reviewed_station(tmp_path / "st")
    bad = store.photo_path(*_photo_of(store, ids[0]))
    _damage(damage, bad, tmp_path / "outside")
    store.close()
    opened.clear()
    out = tmp_path / "photos"
    export(ExportConfig(station=str(tmp_path / "st"), out=str(out)))
    printed = capsys.readouterr().out
    no_traceback(printed)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert files == ["ok/cam-200-2.png", "ok/cam-210-3.png"]  # the damaged NG photo is not exported as NG
    skipped = json.loads((out / "export.json").read_text())["skipped"]
    assert [row["record_id"] for row in skipped] == [ids[0]] and DAMAGES[damage] in skipped[0]["reason"]
    assert bad.name in skipped[0]["reason"] and "skipped" in printed
    assert not [p for p in opened if "canary" in p], "read outside the station"


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_store_photo_route_checks_the_hash(damage: str, tmp_path: Path, opened: list[str]) -> None:
    from fastapi.testclient import TestClient

    from test_serve import FakePredictor
    from vlm_inspect.service.app import create_app

    store, ids = _reviewed_station(tmp_path / "st")
    bad = store.photo_path(*_photo_of(store, ids[0]))
    _damage(damage, bad, tmp_path / "outside")
    store.close()
    opened.clear()
    cfg = ServeConfig(model="unused", station=str(tmp_path / "st"))
    with TestClient(create_app(FakePredictor(), cfg), raise_server_exceptions=False, base_url=LOOPBACK) as client:
        answer = client.get(f"/v1/station/records/{ids[0]}/photo")
        assert answer.status_code == 410, answer.text
        assert DAMAGES[damage] in answer.json()["error"]["message"] and bad.name in answer.json()["error"]["message"]
        assert client.get(f"/v1/station/records/{ids[1]}/photo").content == photo(200)
        assert client.get(f"/v1/station/records/{ids[0]}").status_code == 200  # the record itself stays readable
    assert not [p for p in opened if "canary" in p], "read outside the station"


def _photo_of(store: Any, record_id: int) -> tuple[str, str]:
    from vlm_inspect.station.history import get_record

    record = get_record(store, record_id)
    return record["photo_sha256"], record["photo_suffix"]


# ---------------------------------------------------------------- reviews: nothing the operator did lost quietly


def _client(station: Path) -> Any:
    from fastapi.testclient import TestClient

    from test_serve import FakePredictor
    from vlm_inspect.service.app import create_app

    cfg = ServeConfig(model="unused", station=str(station))
    return TestClient(create_app(FakePredictor(), cfg), raise_server_exceptions=False, base_url=LOOPBACK)


REVIEW_BODIES = {
    "100,000 boxes": ({"verdict": "NG", "operator": "ann", "boxes": [[1, 1, 2, 2]] * 100_000}, "boxes"),
    "1,001 boxes": ({"verdict": "NG", "operator": "ann", "boxes": [[1, 1, 2, 2]] * 1001}, "boxes"),  # one past
    "a 5-number box": ({"verdict": "NG", "operator": "ann", "boxes": [[1, 1, 2, 2, 3]]}, "boxes[0]"),
    "a box out of the photo": ({"verdict": "NG", "operator": "ann", "boxes": [[1, 1, 200, 2]]}, "boxes[0]"),
    "a 4,001-character description": ({"verdict": "OK", "operator": "ann", "description": "x" * 4001}, "description"),
    "an 81-character operator": ({"verdict": "OK", "operator": "a" * 81}, "operator"),
    "no operator": ({"verdict": "OK", "operator": " "}, "operator"),
}


@pytest.mark.parametrize("case", sorted(REVIEW_BODIES))
def test_review_over_what_prepare_reads_is_refused(case: str, tmp_path: Path) -> None:
    body, field = REVIEW_BODIES[case]
    with _client(tmp_path / "st") as client:
        record = client.post("/v1/inspect", files={"file": ("p.png", photo(20))}).json()["record_id"]
        answer = client.post(f"/v1/station/records/{record}/reviews", json=body)
        assert answer.status_code == 422, answer.text[:300]
        assert field in answer.json()["error"]["message"]
        assert client.get(f"/v1/station/records/{record}").json()["reviews"] == []  # nothing half-stored
    store = open_store(tmp_path / "st")
    with pytest.raises(StationError, match=field.replace("[", r"\[")):
        store.review(record, **{"defect_type": None, "boxes": None, "description": None, **body})


def test_review_with_the_most_boxes_reaches_the_next_dataset(tmp_path: Path) -> None:
    """A review at the limit goes through export into prepare's dataset (its sidecar under prepare's 1 MiB)."""
    store = open_store(tmp_path / "st")
    ids = [store.record(photo(s), file_name=f"p{s}.png", source="api", verdict="OK") for s in (20, 200)]
    kind = "裂纹\u0001" * 15  # 60 characters that JSON writes long
    boxes = [[float(i % 90), 1.0, float(i % 90) + 5.5, 70.25] for i in range(1000)]  # store.MAX_REVIEW_BOXES
    store.review(ids[0], "NG", "ann", kind, boxes, "描述\u0002" * 1000)
    store.review(ids[1], "OK", "ann")
    store.close()
    export(ExportConfig(station=str(tmp_path / "st"), out=str(tmp_path / "photos")))
    result = cli("prepare", str(tmp_path / "photos"), "--out", str(tmp_path / "data"), "--val-fraction", "0")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["skipped"] == [] and len(json.loads((tmp_path / "data" / "train.json").read_text())) == 2


def test_review_stored_before_the_limit_is_a_skipped_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A store holding a 100,000-box review from an older version: export names it instead of writing a sidecar
    that prepare would skip for its size."""
    store, ids = _reviewed_station(tmp_path / "st")
    with store.writing() as session:
        boxes = json.dumps([[1.0, 1.0, 2.0, 2.0]] * 100_000)
        session.execute(text("UPDATE reviews SET boxes_json = :b WHERE inspection_id = :i"), {"b": boxes, "i": ids[0]})
    store.close()
    export(ExportConfig(station=str(tmp_path / "st"), out=str(tmp_path / "photos")))
    no_traceback(capsys.readouterr().out)
    assert all(p.stat().st_size < 1024**2 for p in (tmp_path / "photos").rglob("*.json")), "a sidecar prepare skips"
    skipped = json.loads((tmp_path / "photos" / "export.json").read_text())["skipped"]
    assert [row["record_id"] for row in skipped] == [ids[0]] and "prepare" in skipped[0]["reason"]


# ---------------------------------------------------------------- export's own output


def test_output_export_overwrite_replaces_an_earlier_export(tmp_path: Path) -> None:
    store, ids = _reviewed_station(tmp_path / "st")
    store.close()
    args = ["export", "--station", str(tmp_path / "st"), "--out", str(tmp_path / "photos")]
    assert cli(*args).exit_code == 0
    store = open_store(tmp_path / "st")
    store.review(ids[1], "NG", "cy", "dent")  # a correction since the first export
    store.close()
    result = cli(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "photos" / "ng" / "dent" / "cam-200-2.png").is_file()
    assert not (tmp_path / "photos" / "ok" / "cam-200-2.png").exists()


def test_output_export_overwrite_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    store, _ = _reviewed_station(tmp_path / "st")
    store.close()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "mine.txt").write_text("the user's")
    result = cli("export", "--station", str(tmp_path / "st"), "--out", str(tmp_path / "photos"), "--overwrite")
    assert result.exit_code == 1 and "photos" in result.output
    assert (tmp_path / "photos" / "mine.txt").read_text() == "the user's"


# ---------------------------------------------------------------- versions


def _newer_station(folder: Path) -> None:
    store, _ = _reviewed_station(folder)
    with store.writing() as session:
        session.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    store.close()


VERSION_VERBS: dict[str, Callable[[Path, Path], Any]] = {
    "export": lambda st, tmp: cli("export", "--station", str(st), "--out", str(tmp / "photos")),
    "prune": lambda st, tmp: cli("prune", "--station", str(st), "--max-age-days", "30"),
    "watch": lambda st, tmp: cli("watch", str(tmp / "hot"), "--model", "unused", "--station", str(st), "--once"),
    "label": lambda st, tmp: cli("label", str(tmp / "hot"), "--station", str(st), "--port", str(_free_port())),
}


@pytest.mark.parametrize("verb", sorted(VERSION_VERBS))
def test_versions_a_newer_schema_is_refused_naming_both(verb: str, tmp_path: Path) -> None:
    (tmp_path / "hot").mkdir()
    _newer_station(tmp_path / "st")
    result = VERSION_VERBS[verb](tmp_path / "st", tmp_path)
    assert result.exit_code == 1, result.output
    assert "0099_from_the_future" in result.output and "knows up to" in result.output, result.output


def test_versions_serve_refuses_a_newer_schema(tmp_path: Path) -> None:
    from test_serve import FakePredictor
    from vlm_inspect.service.app import create_app

    _newer_station(tmp_path / "st")
    with pytest.raises(StationError, match="0099_from_the_future"):
        create_app(FakePredictor(), ServeConfig(model="unused", station=str(tmp_path / "st")))


# ---------------------------------------------------------------- numbers and dates: 4xx in the documented shape


PRUNE_NUMBERS = [
    ("--max-age-days", "nan"),
    ("--max-age-days", "inf"),
    ("--max-age-days", "-inf"),
    ("--max-age-days", "1e308"),
    ("--max-age-days", "-1"),
    ("--max-gb", "nan"),
    ("--max-gb", "inf"),
    ("--max-gb", "1e308"),
]


@pytest.mark.parametrize(("option", "value"), PRUNE_NUMBERS)
def test_numbers_prune_refuses_what_is_not_a_number_of_days(option: str, value: str, tmp_path: Path) -> None:
    store, _ = _reviewed_station(tmp_path / "st")
    store.close()
    result = cli("prune", "--station", str(tmp_path / "st"), option, value)
    assert result.exit_code == 1 and option[2:].replace("-", "_") in result.output, result.output
    assert len(all_records(open_store(tmp_path / "st"), HistoryFilter())) == 3  # nothing pruned


BIG = str(2**63)
ROUTES = [
    ("get", f"/v1/station/records/{BIG}", 404, BIG),
    ("get", f"/v1/station/records/{BIG}/photo", 404, BIG),
    ("get", f"/v1/station/records/{10**30}", 404, "no record"),
    ("post", f"/v1/station/records/{BIG}/reviews", 404, BIG),
    ("get", "/v1/station/records/abc", 422, "record_id"),
    ("get", f"/v1/station/records?offset={BIG}", 422, "offset"),
    ("get", "/v1/station/records?offset=-1", 422, "offset"),
    ("get", "/v1/station/records?limit=0", 422, "limit"),
    ("get", "/v1/station/records?limit=1001", 422, "limit"),
    ("get", "/v1/station/records?limit=1e3", 422, "limit"),
    ("get", "/v1/station/records?until=9999-12-31", 422, "until"),
    ("get", "/v1/station/records?since=0001-01-01", 422, "since"),
    ("get", "/v1/station/records?p_min=nan", 422, "p_min"),
    ("get", "/v1/station/records?p_max=inf", 422, "p_max"),
    ("get", "/v1/station/records.csv?until=9999-12-31", 422, "until"),
    ("get", "/v1/station/queue?limit=0", 422, "limit"),
    ("get", "/v1/station/queue?limit=abc", 422, "limit"),
    ("get", "/v1/station/line?until=9999-12-31", 422, "until"),
    ("get", "/v1/station/line?since=0001-01-01&until=0001-01-03", 422, "since"),
    ("get", "/v1/station/line?until=someday", 422, "until"),
]


@pytest.mark.parametrize(("method", "url", "status", "named"), ROUTES, ids=[f"{m} {u}"[:60] for m, u, *_ in ROUTES])
def test_numbers_routes_answer_4xx_in_the_error_shape(
    method: str, url: str, status: int, named: str, tmp_path: Path
) -> None:
    with _client(tmp_path / "st") as client:
        client.post("/v1/inspect", files={"file": ("p.png", photo(20))})
        body = {"verdict": "OK", "operator": "ann"} if method == "post" else None
        answer = client.request(method.upper(), url, json=body)
    assert answer.status_code == status, answer.text[:300]
    assert set(answer.json()) == {"error"}, f"not the documented error shape: {answer.text[:300]}"
    error = answer.json()["error"]
    assert set(error) == {"message", "type"} and named in error["message"], error


# ---------------------------------------------------------------- model folders checked at load


def _broken_model(source: Path, folder: Path, what: str) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "processor_config.json").read_text())
    if what == "template":  # renders the question, never the image
        (folder / "chat_template.jinja").write_text(
            "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
        )
    elif what == "processor_class":
        config["processor_class"] = "NoSuchProcessor"
    elif what == "image_processor":
        config["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
    (folder / "processor_config.json").write_text(json.dumps(config))
    return folder


BROKEN = {"template": "chat_template.jinja", "processor_class": "processor_config.json"}
BROKEN |= {"image_processor": "processor_config.json"}


@pytest.fixture(scope="module")
def broken_models(tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    return {what: _broken_model(tiny_model("qwen2_5_vl"), root / what, what) for what in BROKEN}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_model_folder_predict_names_the_folder_and_file(what: str, broken_models: dict, tmp_path: Path) -> None:
    (tmp_path / "p.png").write_bytes(photo(20))
    model = broken_models[what]
    result = cli("predict", str(tmp_path / "p.png"), "--model", str(model), "--out", str(tmp_path / "p.jsonl"))
    assert result.exit_code == 1, result.output
    assert BROKEN[what] in result.output and model.name in result.output
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_model_folder_serve_refuses_to_start(what: str, broken_models: dict, monkeypatch) -> None:
    from vlm_inspect import serve as serve_module
    from vlm_inspect.errors import ModelFolderError

    started = []
    monkeypatch.setattr(serve_module, "run_server", lambda *a, **k: started.append(a))
    cfg = ServeConfig(model=str(broken_models[what]), port=_free_port(), device="cpu")
    with pytest.raises(ModelFolderError, match=BROKEN[what].replace(".", r"\.")):
        serve_module.serve(cfg)
    assert not started


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_model_folder_train_leaves_out_untouched(what: str, broken_models: dict, spot_dataset: Path, tmp_path) -> None:
    out = tmp_path / "run"
    result = cli("train", "--model", str(broken_models[what]), "--data", str(spot_dataset), "--out", str(out))
    assert result.exit_code == 1 and BROKEN[what] in result.output, result.output
    assert not out.exists()  # so the re-run with a good folder is not refused as "an unfinished run"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- settings checked once, everywhere


def _verb_args(verb: str, tmp: Path) -> list[str]:
    return {
        "predict": ["predict", str(tmp), "--model", str(tmp / "m"), "--out", str(tmp / "p.jsonl")],
        "evaluate": ["evaluate", "--model", str(tmp / "m"), "--data", str(tmp / "d"), "--out", str(tmp / "r")],
        "serve": ["serve", "--model", str(tmp / "m"), "--port", str(_free_port())],
        "watch": ["watch", str(tmp), "--model", str(tmp / "m"), "--station", str(tmp / "st")],
        "train": ["train", "--model", str(tmp / "m"), "--data", str(tmp / "d"), "--out", str(tmp / "run")],
    }[verb]


@pytest.mark.parametrize("verb", ["predict", "evaluate", "serve", "watch", "train"])
@pytest.mark.parametrize("value", ["-1", "0", "1"])
def test_settings_image_budget_refused_alike_by_every_verb(verb: str, value: str, tmp_path: Path) -> None:
    result = cli(*_verb_args(verb, tmp_path), "--image-max-tokens", value)
    assert result.exit_code == 1
    assert f"image_max_tokens: {value} is not between 16 and 65,536" in result.output, result.output
    assert not (tmp_path / "st").exists() and not (tmp_path / "run").exists()


NON_FINITE = [
    ("watch", "--poll-s", "nan"),
    ("watch", "--threshold", "inf"),
    ("serve", "--max-upload-mb", "inf"),
    ("serve", "--request-timeout-s", "nan"),
    ("serve", "--body-timeout-s", "inf"),
]


@pytest.mark.parametrize(("verb", "option", "value"), NON_FINITE)
def test_settings_non_finite_numbers_refused(verb: str, option: str, value: str, tmp_path: Path) -> None:
    result = cli(*_verb_args(verb, tmp_path), option, value)
    assert result.exit_code == 1 and option[2:].replace("-", "_") in result.output, result.output


def test_settings_a_runs_saved_budget_is_checked(tiny_model_dir: Path, spot_dataset: Path, tmp_path: Path) -> None:
    from helpers import make_run

    run = make_run(tmp_path / "run", tiny_model_dir, spot_dataset, image_max_tokens=1)  # a hand-edited config.yaml
    (tmp_path / "p.png").write_bytes(photo(20))
    args = ["predict", str(tmp_path / "p.png"), "--model", str(tiny_model_dir), "--adapter", str(run)]
    result = cli(*args, "--out", str(tmp_path / "p.jsonl"), "--device", "cpu")
    assert result.exit_code == 1 and "image_max_tokens: 1 is not between" in result.output, result.output


# ---------------------------------------------------------------- paths and messages


@pytest.mark.parametrize("verb", ["export", "prune"])
def test_paths_a_mistyped_station_is_not_created(verb: str, tmp_path: Path) -> None:
    typo = tmp_path / "statoin"
    args = {"export": ["--out", str(tmp_path / "photos")], "prune": ["--max-age-days", "30"]}[verb]
    result = cli(verb, "--station", str(typo), *args)
    assert result.exit_code == 1 and "statoin" in result.output and "no station" in result.output, result.output
    assert not typo.exists() and not (tmp_path / "photos").exists()


@pytest.fixture()
def read_only(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Makes a folder read-only for this process: modes for a user; for root (who ignores modes) a read-only bind
    mount where it may mount, else `os.access` saying so (the store asks it before opening)."""
    mounted: list[Path] = []
    patch = pytest.MonkeyPatch()

    def make(folder: Path) -> None:
        for path in sorted(folder.rglob("*"), reverse=True):
            path.chmod(0o555 if path.is_dir() else 0o444)
        folder.chmod(0o555)
        if os.geteuid() != 0:
            return
        bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
        if bind.returncode == 0:
            mounted.append(folder)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True, capture_output=True)
            return
        real = os.access
        inside = str(folder.resolve())
        writes = lambda p, mode, **k: not (mode & os.W_OK and os.path.abspath(p).startswith(inside))  # noqa: E731
        patch.setattr(os, "access", lambda p, mode, **k: real(p, mode, **k) and writes(p, mode))

    yield make
    patch.undo()
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False, capture_output=True)
    for path in [tmp_path, *tmp_path.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)  # so the test's folder can be removed


def test_paths_a_read_only_station_can_be_exported(tmp_path: Path, read_only: Callable) -> None:
    _reviewed_station(tmp_path / "st")[0].close()
    read_only(tmp_path / "st")
    before = tree_digest(tmp_path / "st")
    result = cli("export", "--station", str(tmp_path / "st"), "--out", str(tmp_path / "photos"))
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "photos").rglob("*.png"))) == 3
    assert tree_digest(tmp_path / "st") == before


def test_paths_a_read_only_station_says_so_to_a_writer(tmp_path: Path, read_only: Callable) -> None:
    _reviewed_station(tmp_path / "st")[0].close()
    read_only(tmp_path / "st")
    result = cli("prune", "--station", str(tmp_path / "st"), "--max-age-days", "0")
    assert result.exit_code == 1 and ("read-only" in result.output or "readonly" in result.output), result.output


@pytest.mark.parametrize("name", [MARKUP_NAME, "[red]cam[blink] 1.png", "tab\there.png", GBK_NAME])
def test_paths_watch_prints_names_as_they_are(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    (folder / name).write_bytes(photo(20))
    hot_watcher(folder, tmp_path / "st", DarknessModel(), sort="move").run()
    out = capsys.readouterr().out
    assert squashed(shown_name(name)) in squashed(out) and "\r" not in out and "\t" not in out, out
    assert (folder / "ng" / name).is_file()


# ---------------------------------------------------------------- two watchers on one folder


def _watch_counting(folder: str, station: str, counts: Any, slot: int) -> None:
    class SlowModel(DarknessModel):
        def score(self, images, question=None, batch_size=8, reference=None):
            time.sleep(0.02 * len(images))  # a model takes time: the window two watchers race in
            return super().score(images, question, batch_size, reference)

    model = SlowModel()
    cfg = WatchConfig(folder=folder, model="x", station=station, poll_s=0.05, max_polls=6, sort="result-file")
    try:
        Watcher(open_store(station), model, cfg, "hash0").run()
    finally:
        counts[slot] = model.scored


def two_watchers(folder: Path, station: Path, photos: int = 20) -> tuple[int, int]:
    """(model calls, records) of two watcher processes on one folder of `photos` photos."""
    folder.mkdir()
    for i in range(photos):
        (folder / f"cam-{i:02d}.png").write_bytes(photo(20 + i * 10))
    open_store(station).close()
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Array("i", 2)
    workers = [ctx.Process(target=_watch_counting, args=(str(folder), str(station), counts, i)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    return sum(counts), len(all_records(open_store(station), HistoryFilter()))


def test_watchers_two_on_one_folder_run_the_model_once_per_photo(tmp_path: Path) -> None:
    calls, records = two_watchers(tmp_path / "hot", tmp_path / "st")
    assert records == 20 and len(list((tmp_path / "hot").glob("*.result.json"))) == 20
    assert calls == 20, f"the model ran {calls} times for 20 photos"
