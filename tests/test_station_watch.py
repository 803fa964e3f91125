"""`vlm-inspect watch`: each photo once, files still being written left alone, restarts and two watchers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from station_helpers import DarknessModel, photo
from vlm_inspect.cli import app as cli
from vlm_inspect.config import WatchConfig
from vlm_inspect.errors import ConfigError
from vlm_inspect.station.history import HistoryFilter, all_records
from vlm_inspect.station.store import open_store
from vlm_inspect.watch import Watcher, check_watch_config


def make_folder(root: Path, shades=(230, 220, 20)) -> Path:
    folder = root / "hot"
    folder.mkdir()
    for i, shade in enumerate(shades):
        (folder / f"cam-{i}.png").write_bytes(photo(shade))
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".cam-9.png.part").write_bytes(b"half")
    return folder


def watcher(folder: Path, station: Path, model=None, **settings) -> Watcher:
    cfg = WatchConfig(folder=str(folder), model="unused", station=str(station), poll_s=0.01, **settings)
    return Watcher(open_store(station), model or DarknessModel(), cfg, "hash0")


def test_once_inspects_each_photo_once_and_moves_it(tmp_path: Path):
    folder, station = make_folder(tmp_path), tmp_path / "station"
    first = watcher(folder, station, sort="move", once=True)
    first.run()
    assert first.predictor.scored == 3
    assert sorted(p.name for p in (folder / "ok").iterdir()) == ["cam-0.png", "cam-1.png"]
    assert [p.name for p in (folder / "ng").iterdir()] == ["cam-2.png"]
    rows = all_records(first.store, HistoryFilter())
    assert [(r["file"], r["verdict"], r["source"], r["model_hash"]) for r in rows] == [
        ("cam-0.png", "OK", "watch", "hash0"),
        ("cam-1.png", "OK", "watch", "hash0"),
        ("cam-2.png", "NG", "watch", "hash0"),
    ]
    (folder / "cam-3.png").write_bytes(photo(30))
    again = watcher(folder, station, sort="move", once=True)  # a restart: only the new photo
    again.run()
    assert again.predictor.scored == 1 and len(all_records(again.store, HistoryFilter())) == 4
    assert (folder / "notes.txt").exists() and (folder / ".cam-9.png.part").exists()


def test_a_file_still_being_written_is_not_read(tmp_path: Path):
    folder, station = tmp_path / "hot", tmp_path / "station"
    folder.mkdir()
    growing = folder / "cam.jpg"
    data = photo(40, fmt="JPEG")
    growing.write_bytes(data[:100])
    w = watcher(folder, station)
    assert w.poll() == 0  # first sight: not stable yet
    with growing.open("ab") as f:
        f.write(data[100:])
    assert w.poll() == 0  # it grew since the last poll
    assert w.poll() == 1  # same size twice: read now, whole
    assert w.poll() == 0 and w.predictor.scored == 1
    assert all_records(w.store, HistoryFilter())[0]["verdict"] == "NG"


def test_restart_after_recording_finishes_the_move_without_inspecting_again(tmp_path: Path):
    folder, station = make_folder(tmp_path, shades=(20,)), tmp_path / "station"
    watcher(folder, station, once=True).run()  # recorded, then "killed" before sorting (sort none)
    assert (folder / "cam-0.png").exists()
    restarted = watcher(folder, station, sort="move", once=True)
    restarted.run()
    assert restarted.predictor.scored == 0 and (folder / "ng" / "cam-0.png").exists()
    assert len(all_records(restarted.store, HistoryFilter())) == 1


def test_result_file_beside_each_photo(tmp_path: Path):
    folder, station = make_folder(tmp_path, shades=(20, 230)), tmp_path / "station"
    w = watcher(folder, station, sort="result-file", once=True)
    w.run()
    answer = json.loads((folder / "cam-0.png.result.json").read_text())
    assert answer["verdict"] == "NG" and answer["model"] == "darkness" and answer["record_id"] == 1
    assert json.loads((folder / "cam-1.png.result.json").read_text())["verdict"] == "OK"
    w.run()
    assert w.predictor.scored == 2  # still there, never inspected again


def _watch_process(folder: str, station: str) -> None:
    cfg = WatchConfig(folder=folder, model="unused", station=station, poll_s=0.05, max_polls=4, sort="result-file")
    Watcher(open_store(station), DarknessModel(), cfg, "hash0").run()


def test_two_watchers_on_one_folder_record_each_photo_once(tmp_path: Path):
    folder, station = make_folder(tmp_path, shades=tuple(range(20, 240, 20))), tmp_path / "station"
    open_store(station).close()  # migrated once up front; concurrent opening is covered in the store tests
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_watch_process, args=(str(folder), str(station))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    rows = all_records(open_store(station), HistoryFilter())
    assert sorted(r["file"] for r in rows) == sorted(f"cam-{i}.png" for i in range(11))
    assert len(list(folder.glob("*.result.json"))) == 11


def test_bad_settings_are_listed_together(tmp_path: Path):
    cfg = WatchConfig(folder=str(tmp_path / "nope"), poll_s=0, threshold=2, batch_size=0)
    with pytest.raises(ConfigError) as err:
        check_watch_config(cfg)
    for words in ("model: required", "station: required", "is not a folder", "threshold", "poll_s", "batch_size"):
        assert words in str(err.value)


def test_watch_command_once_with_the_tiny_model(tmp_path: Path, tiny_model_dir: Path):
    folder, station = make_folder(tmp_path, shades=(20, 230)), tmp_path / "station"
    args = ["watch", str(folder), "--model", str(tiny_model_dir), "--station", str(station), "--once"]
    result = CliRunner().invoke(cli, [*args, "--poll-s", "0.05", "--sort", "result-file", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = all_records(open_store(station), HistoryFilter())
    assert len(rows) == 2 and {r["model"] for r in rows} == {"tiny-llava"} and all(r["model_hash"] for r in rows)
    assert all(0.0 <= r["p_ng"] <= 1.0 for r in rows) and len(list(folder.glob("*.result.json"))) == 2


def test_locate_records_the_models_boxes_and_answers_them_in_the_result_file(tmp_path: Path):
    folder, station = make_folder(tmp_path), tmp_path / "station"
    watched = watcher(folder, station, sort="result-file", locate=True, once=True)
    watched.run()
    rows = {r["file"]: r for r in all_records(watched.store, HistoryFilter())}
    box = {"type": "dark", "box": [0.0, 0.0, 48.0, 36.0]}  # DarknessModel boxes the top-left quarter of a 96 × 72 photo
    assert rows["cam-2.png"]["defects"] == [box] and rows["cam-2.png"]["boxes_dropped"] == 1
    assert rows["cam-0.png"]["defects"] is None  # an OK photo is not asked for boxes
    answered = json.loads((folder / "cam-2.png.result.json").read_text())
    assert answered["verdict"] == "NG" and answered["defects"] == [box]
    (folder / "cam-2.png.result.json").unlink()
    again = watcher(folder, station, sort="result-file", locate=True, once=True)  # a restart re-answers from the record
    again.run()
    assert again.predictor.scored == 0 and json.loads((folder / "cam-2.png.result.json").read_text())["defects"] == [
        box
    ]
