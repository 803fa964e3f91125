"""The station store on SQLite and on a real PostgreSQL server: records, reviews, history, retention, crashes.

The same tests run on both backends; PostgreSQL is a throwaway cluster started for the session (or
the server named by $VLM_INSPECT_TEST_PG_URL), skipped with the reason only where none can be started.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text, update

from station_helpers import photo, postgres_server, reset_postgres
from vlm_inspect.errors import StationError
from vlm_inspect.prune import photo_bytes, prune_store
from vlm_inspect.station.history import HistoryFilter, all_records, csv_text, get_record, list_records
from vlm_inspect.station.identity import model_identity
from vlm_inspect.station.schema import Inspection
from vlm_inspect.station.store import DB_NAME, open_store


@pytest.fixture(scope="session")
def pg_url(pytestconfig, tmp_path_factory):
    with postgres_server() as url:
        if url is not None:  # a line in the CI log showing that the PostgreSQL store tests really run
            store = open_store(tmp_path_factory.mktemp("pg-probe"), url)
            with store.reading() as session:
                version = session.execute(text("SELECT version()")).scalar().split(",")[0]
            store.close()
            reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
            with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
                reporter.write_line(f"\nstation store tests on {version} ({url.split('?')[0]})")
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def station(request, tmp_path: Path):
    """(station folder, database URL or None) on each backend; the database starts empty."""
    if request.param == "sqlite":
        return tmp_path / "station", None
    url = request.getfixturevalue("pg_url")
    if url is None:
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql), so its store tests cannot run")
    reset_postgres(url)
    return tmp_path / "station", url


def record(store, shade=230, verdict="OK", p_ng=0.1, **fields):
    fields = {"file_name": f"p{shade}.png", "source": "api", "threshold": 0.5, "model_name": "m1", **fields}
    return store.record(photo(shade), verdict=verdict, p_ng=p_ng, **fields)


def test_record_stores_each_photo_once_and_reopens(station):
    folder, db = station
    store = open_store(folder, db)
    first = record(store, 40, "NG", 0.9, description="dark")
    second = record(store, 40, "NG", 0.91, source="page")
    third = record(store, 200)
    store.close()
    store = open_store(folder, db)  # migrations run again, schema untouched
    rows, total = list_records(store, HistoryFilter())
    assert total == 3 and [r["id"] for r in rows] == [third, second, first]
    files = [p for p in (folder / "photos").rglob("*") if p.is_file()]
    assert len(files) == 2 and photo_bytes(store) == sum(p.stat().st_size for p in files)
    one = get_record(store, first)
    assert one["description"] == "dark" and one["review"] == "unreviewed" and one["width"] == 96
    assert store.photo_path(one["photo_sha256"], one["photo_suffix"]).read_bytes() == photo(40)
    assert (folder / DB_NAME).exists() == (db is None)
    store.close()


def test_review_adds_rows_and_keeps_the_model_verdict(station):
    store = open_store(*station)
    rid = record(store, 40, "NG", 0.8)
    store.review(rid, "NG", "ann", "scratch", [[1, 2, 30, 20]], "a long scratch")
    store.review(rid, "OK", "bob")
    one = get_record(store, rid)
    assert one["verdict"] == "NG" and one["p_ng"] == 0.8  # the original answer is never overwritten
    assert one["final_verdict"] == "OK" and one["review"] == "corrected"
    assert [(r["operator"], r["verdict"], r["boxes"]) for r in one["reviews"]] == [
        ("ann", "NG", [[1, 2, 30, 20]]),
        ("bob", "OK", []),
    ]
    store.close()


def test_review_problems_are_listed_together(station):
    store = open_store(*station)
    rid = record(store)
    with pytest.raises(StationError) as err:
        store.review(rid, "MAYBE", " ", "a/b", [[0, 0, 500, 10], [5, 5, 1, 1]])
    text = str(err.value)
    for words in ("not OK or NG", "operator", "slashes", "outside the 96x72 photo", "x0 < x1"):
        assert words in text
    with pytest.raises(StationError, match="no inspection with id 999"):
        store.review(999, "OK", "ann")
    with pytest.raises(StationError, match="OK verdict takes no defect"):
        store.review(rid, "OK", "ann", "dent", [[1, 1, 5, 5]])
    store.close()


def test_history_filters_and_csv(station):
    store = open_store(*station)
    ok = record(store, 220, "OK", 0.1)
    ng = record(store, 30, "NG", 0.95, model_name="m2")
    mid = record(store, 120, "NG", 0.6, description="=cmd()")
    store.review(ng, "NG", "ann", "spot")
    store.review(mid, "OK", "ann")
    ids = lambda **kw: sorted(r["id"] for r in list_records(store, HistoryFilter(**kw))[0])  # noqa: E731
    assert ids(verdict="NG") == [ng, mid]
    assert ids(review="unreviewed") == [ok] and ids(review="reviewed") == [ng, mid]
    assert ids(review="confirmed") == [ng] and ids(review="corrected") == [mid]
    assert ids(p_min=0.5, p_max=0.9) == [mid] and ids(model="m2") == [ng]
    today = datetime.now(timezone.utc).date()
    assert ids(since=today, until=today) == [ok, ng, mid] and ids(until=today - timedelta(days=1)) == []
    with pytest.raises(StationError, match="review: 'maybe'"):
        list_records(store, HistoryFilter(review="maybe"))
    text = csv_text(all_records(store, HistoryFilter(verdict="NG")))
    lines = text.lstrip("\ufeff").splitlines()
    assert lines[0].startswith("id,time,file,source,verdict,p_ng") and len(lines) == 3
    assert "'=cmd()" in text and ",corrected,OK," in text  # a formula is quoted; the review is in the row
    store.close()


def test_source_key_records_a_file_once(station):
    store = open_store(*station)
    assert record(store, source="watch", source_key="/x/a.png|10|5") is not None
    assert record(store, source="watch", source_key="/x/a.png|10|5") is None
    assert store.find_key("/x/a.png|10|5").source == "watch"
    store.close()


def test_retention_by_age_and_size_never_drops_reviewed(station):
    store = open_store(*station)
    old = [record(store, 10 + i) for i in range(4)]
    new = [record(store, 100 + i) for i in range(3)]
    store.review(old[0], "OK", "ann")
    with store.writing() as session:
        past = datetime.now(timezone.utc) - timedelta(days=40)
        session.execute(update(Inspection).where(Inspection.id.in_(old)).values(created_at=past))
    removed, files = prune_store(store, datetime.now(timezone.utc) - timedelta(days=30), None)
    assert (removed, files) == (3, 3)
    assert sorted(r["id"] for r in all_records(store, HistoryFilter())) == sorted([old[0], *new])
    removed, _ = prune_store(store, None, 0)  # "no room at all" still keeps the reviewed record
    assert removed == 3 and [r["id"] for r in all_records(store, HistoryFilter())] == [old[0]]
    assert len([p for p in (station[0] / "photos").rglob("*") if p.is_file()]) == 1
    store.close()


def test_full_disk_is_a_clear_error_naming_the_folder(station, monkeypatch):
    store = open_store(*station)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StationError) as err:
        record(store, 77)
    assert str(station[0]) in str(err.value) and "No space left on device" in str(err.value)
    monkeypatch.undo()
    assert list_records(store, HistoryFilter())[1] == 0  # no row for a photo that was not stored
    assert not [p for p in (station[0] / "photos").rglob("*") if p.is_file()]  # nor a half-written file
    store.close()


def test_bad_station_and_url_are_clear_errors(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StationError, match="cannot create the station folder"):
        open_store(blocker / "station")
    with pytest.raises(StationError, match="not a database URL"):
        open_store(tmp_path / "s", "not a url")
    with pytest.raises(StationError, match="only sqlite and postgresql"):
        open_store(tmp_path / "s", "mysql://u@h/db")
    with pytest.raises(StationError, match="station folder is needed"):
        open_store(None, "sqlite://")


def test_model_identity_changes_with_the_weights(tmp_path: Path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"1234")
    name, first = model_identity(model)
    assert name == "m" and len(first) == 16 and model_identity(model)[1] == first
    (model / "model.safetensors").write_bytes(b"12345")
    assert model_identity(model)[1] != first
    assert model_identity(model, tmp_path / "run")[0] == "m + run"


def _writer(folder: str, db: str | None, start: int, n: int) -> None:
    store = open_store(folder, db)
    for i in range(n):
        store.record(photo(start + i), verdict="OK", p_ng=0.1, file_name=f"{start + i}.png", source="watch")
    store.close()


def test_concurrent_writer_processes_do_not_corrupt_the_store(station):
    folder, db = station
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(str(folder), db, start, 20)) for start in (0, 100)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    store = open_store(folder, db)
    rows = all_records(store, HistoryFilter())
    assert len(rows) == 40 and len({r["photo_sha256"] for r in rows}) == 40
    store.close()
    if db is None:
        with sqlite3.connect(folder / DB_NAME) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


KILLED_WRITER = """
import sys
from station_helpers import photo
from vlm_inspect.station.store import open_store
store = open_store(sys.argv[1])
i = 0
while True:
    store.record(photo(i % 250, size=(64 + i, 48)), verdict="OK", p_ng=0.1, file_name=f"{i}.png", source="watch")
    i += 1
    if i == 5:
        print("writing", flush=True)
"""


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_kill_9_mid_writing_loses_nothing_committed(tmp_path: Path):
    folder = tmp_path / "station"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder)], stdout=subprocess.PIPE, env=env)
    assert writer.stdout.readline().strip() == b"writing"
    time.sleep(0.3)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    with sqlite3.connect(folder / DB_NAME) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    store = open_store(folder)
    rows = all_records(store, HistoryFilter())
    assert len(rows) >= 5
    for row in rows:  # every committed row has its whole photo
        data = store.photo_path(row["photo_sha256"], row["photo_suffix"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["photo_sha256"]
    assert json.dumps(rows)  # and reads back cleanly
    store.close()
