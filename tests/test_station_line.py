"""The line view on SQLite and PostgreSQL: the 0002 migration of an old store, review orders, p-charts and audit
estimates from the store, drift raised by a brighter camera through `serve`, Prometheus metrics, the page in Chromium.

The store tests run on both backends (the `station` fixture of test_station_store.py); the serve tests use the
fake model of test_serve.py, whose p(NG) is the photo's darkness, so a brighter camera moves every score.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, select, text

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from line_helpers import fill_line, parts  # noqa: E402
from station_helpers import DarknessModel, photo  # noqa: E402
from test_serve import KEY, FakePredictor  # noqa: E402
from test_station_serve import LOOPBACK, SCREENS_ENV, running  # noqa: E402
from test_station_store import pg_url, station  # noqa: E402, F401  (the same two backends)
from vlm_inspect.config import ServeConfig, WatchConfig  # noqa: E402
from vlm_inspect.errors import ConfigError  # noqa: E402
from vlm_inspect.serve import check_serve_config
from vlm_inspect.service.app import create_app  # noqa: E402
from vlm_inspect.station.audit import AuditSample, audit_u  # noqa: E402
from vlm_inspect.station.history import HistoryFilter, list_records  # noqa: E402
from vlm_inspect.station.line_settings import LineSettings  # noqa: E402
from vlm_inspect.station.lineview import LineQuery, line_view  # noqa: E402
from vlm_inspect.station.metrics import StationMetrics, serve_metrics  # noqa: E402
from vlm_inspect.station.monitor import LineMonitor  # noqa: E402
from vlm_inspect.station.schema import Baseline, Inspection  # noqa: E402
from vlm_inspect.station.store import DB_NAME, MIGRATIONS, open_store  # noqa: E402
from vlm_inspect.watch import Watcher, check_watch_config  # noqa: E402

BERLIN = "Europe/Berlin"


# ---------------------------------------------------------------- the migration


def _store_at_0001(folder: Path, db: str | None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    url = db or f"sqlite:///{(folder / DB_NAME).resolve()}"
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        now = datetime.now(timezone.utc)
        connection.execute(text("INSERT INTO photos VALUES ('ab', '.png', 10, 96, 72, :t)"), {"t": now})
        for i, (source, p, verdict) in enumerate((("watch", 0.75, "NG"), ("api", 0.25, "OK"), ("label", None, None))):
            connection.execute(
                text(
                    "INSERT INTO inspections (photo_sha256, file_name, verdict, p_ng, threshold, source, created_at) "
                    "VALUES ('ab', :f, :v, :p, :th, :s, :t)"
                ),
                {"f": f"{i}.png", "v": verdict, "p": p, "th": None if p is None else 0.5, "s": source, "t": now},
            )
    engine.dispose()
    return url


def test_an_old_store_is_migrated_to_the_line_view(station):
    folder, db = station
    url = _store_at_0001(folder, db)
    store = open_store(folder, db)  # upgrades 0001 → 0002_line_view → the newest
    with store.reading() as session:
        rows = session.scalars(select(Inspection).order_by(Inspection.id)).all()
        version = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert version == ScriptDirectory.from_config(config).get_current_head()
    assert [(r.line, r.margin) for r in rows] == [("watch", 0.25), ("api", 0.25), ("label", None)]
    assert [r.audit_u for r in rows] == [audit_u(r.id) for r in rows]  # the hash new records get
    engine = create_engine(url)
    names = {ix["name"] for ix in inspect(engine).get_indexes("inspections")}
    assert {"ix_inspections_model_hash_line_id", "ix_inspections_margin", "ix_inspections_audit_u"} <= names
    assert "baselines" in inspect(engine).get_table_names()
    engine.dispose()
    new = store.record(photo(50), file_name="n.png", source="api", verdict="NG", p_ng=0.8, threshold=0.5)
    with store.reading() as session:
        row = session.get(Inspection, new)
    assert (row.line, row.margin, row.audit_u) == ("api", pytest.approx(0.3), audit_u(new))
    store.close()


# ---------------------------------------------------------------- review orders


def _scored(store, p_values):
    return [
        store.record(photo(40 + 20 * i), file_name=f"{i}.png", source="api", verdict="NG" if p >= 0.5 else "OK",
                     p_ng=p, threshold=0.5, model_name="m", model_hash="h")
        for i, p in enumerate(p_values)
    ]  # fmt: skip


def test_review_orders_in_the_history_and_the_queue(station):
    store = open_store(*station)
    a, b, c, d, e = _scored(store, [0.25, 0.375, 0.75, 0.625, 0.5625])  # margins 0.25 .125 .25 .125 .0625
    store.review(b, "NG", "ann")  # model said OK: a disagreement
    store.review(c, "NG", "ann")  # agrees
    store.review(d, "OK", "ann")  # model said NG: a disagreement ...
    store.review(d, "OK", "bob")  # ... that a second operator confirmed

    def ids(order, queue=False, rate=1.0, seed=0):
        flt = HistoryFilter(order=order, queue=queue, sample=AuditSample(rate, seed))
        return [r["id"] for r in list_records(store, flt)[0]]

    assert ids("least-sure") == [e, d, b, c, a]  # nearest the threshold first; ties newest first
    assert ids("least-sure", queue=True) == [e, a]  # the labeller's queue: unreviewed only
    assert ids("disagreements") == [d, b] and ids("disagreements", queue=True) == [b]  # one opinion only
    assert ids("oldest") == [a, b, c, d, e] and ids("newest") == [e, d, c, b, a]
    assert ids("audit") == sorted([a, b, c, d, e], key=audit_u)  # the whole sample at rate 1: random order
    half = AuditSample(0.5, 3)
    assert ids("audit", rate=0.5, seed=3) == sorted(
        [i for i in (a, b, c, d, e) if half.contains(audit_u(i))], key=lambda i: (audit_u(i) - half.offset) % 1
    )
    with pytest.raises(Exception, match="order: 'random'"):
        ids("random")
    store.close()


def test_the_queue_route_takes_an_order(tmp_path: Path):
    store = open_store(tmp_path / "st")
    a, b, c = _scored(store, [0.25, 0.4375, 0.875])
    store.close()
    cfg = ServeConfig(model="unused", station=str(tmp_path / "st"))
    with TestClient(create_app(FakePredictor(), cfg), base_url=LOOPBACK) as client:
        assert client.get("/v1/station/queue").json() == {"ids": [a, b, c], "left": 3}
        assert client.get("/v1/station/queue?order=least-sure").json()["ids"] == [b, a, c]
        listed = client.get("/v1/station/records?order=least-sure&limit=2").json()
        assert [r["id"] for r in listed["records"]] == [b, a] and listed["total"] == 3
        bad = client.get("/v1/station/queue?order=sideways")
        assert bad.status_code == 422 and "order: 'sideways'" in bad.json()["error"]["message"]


# ---------------------------------------------------------------- the line view from the store


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    """A Berlin wall-clock time in December 2026 (UTC+1), as UTC."""
    return datetime(2026, 12, day, hour - 1, minute, tzinfo=timezone.utc)


def test_line_view_counts_shifts_days_and_audit_estimates(station):
    store = open_store(*station)
    plan = [(_at(1, 7), 10, 1), (_at(1, 15), 10, 2), (_at(2, 9), 20, 10)]  # (shift time, n, NG)
    ids = []
    for moment, n, bad in plan:
        for i in range(n):
            p = 0.75 if i < bad else 0.25
            ids.append(
                store.record(
                    photo(30 + len(ids)), file_name=f"{len(ids)}.png", source="watch", line="cam1", verdict="NG" if p >= 0.5 else "OK",
                    p_ng=p, threshold=0.5, model_name="m", model_hash="h", latency_ms=100.0 + i, created_at=moment + timedelta(minutes=i),
                )
            )  # fmt: skip
    store.review(ids[0], "NG", "ann")  # first shift: NG caught
    store.review(ids[1], "NG", "ann")  # OK part the model passed ... truly NG: an escape
    store.review(ids[2], "OK", "ann")  # OK passed, truly OK
    store.review(ids[20], "OK", "ann")  # day 2: NG called on a good part: an overkill
    settings = LineSettings(timezone=BERLIN, audit_rate=1.0, baseline_n=10, drift_window=10)
    view = line_view(store, LineQuery(date(2026, 12, 1), date(2026, 12, 2), "shift"), settings)
    (group,) = view["groups"]
    points = [(p["label"], p["n"], p["ng"]) for p in group["points"]]
    assert points == [("2026-12-01 A 06–14", 10, 1), ("2026-12-01 B 14–22", 10, 2), ("2026-12-02 A 06–14", 20, 10)]
    assert group["center"] == pytest.approx(13 / 40) and group["charts"]["p_chart"].startswith("<svg")
    assert group["latency"]["mean_ms"] == [104.5, 104.5, 109.5] and group["latency"]["n"] == 40
    days = line_view(store, LineQuery(date(2026, 12, 1), date(2026, 12, 2), "day"), settings)["groups"][0]["points"]
    assert [(p["label"], p["n"], p["ng"]) for p in days] == [("2026-12-01", 20, 3), ("2026-12-02", 20, 10)]
    (model,) = view["audit"]["models"]
    first, *periods = model["periods"]
    assert first["period"] == "all" and (first["inspected"], first["passed"], first["sampled"]) == (40, 27, 40)
    assert first["confusion"] == {"tp": 1, "fn": 1, "fp": 1, "tn": 1} and first["reviewed"] == 4
    assert first["escape"]["value"] == 0.5 and first["outgoing"]["value"] == 0.5  # 1 of 2 passed parts was NG
    assert first["escaped"][0] == pytest.approx(13.5)  # half of the 27 passed
    assert [(p["period"], p["reviewed"]) for p in periods] == [
        ("2026-12-01 A 06–14", 3), ("2026-12-01 B 14–22", 0), ("2026-12-02 A 06–14", 1),
    ]  # fmt: skip
    assert line_view(store, LineQuery(date(2026, 12, 1), date(2026, 12, 2), line="cam2"), settings)["groups"] == []
    with pytest.raises(Exception, match="period: 'week'") as err:
        line_view(store, LineQuery(date(2026, 12, 2), date(2026, 12, 1), "week"), settings)
    assert "before since" in str(err.value)
    store.close()


# ---------------------------------------------------------------- drift through serve


def _line_client(station_dir: Path, db: str | None, **settings) -> TestClient:
    cfg = ServeConfig(model="unused", station=str(station_dir), db=db, line="cam1", **settings)
    return TestClient(create_app(FakePredictor(), cfg), raise_server_exceptions=False, base_url=LOOPBACK)


def _post_line(client: TestClient, n: int, drift_after: int | None, seed: int) -> list[str]:
    verdicts = []
    for i, part in enumerate(parts(n, seed)):
        brighter = drift_after is not None and i >= drift_after
        r = client.post("/v1/inspect", files={"file": (f"{i}.png", part.photo(brighter))})
        assert r.status_code == 200, r.text
        verdicts.append(r.json()["verdict"])
    return verdicts


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_a_brighter_camera_raises_the_drift_alarm(station, caplog):
    folder, db = station
    caplog.set_level(logging.WARNING, logger="vlm_inspect.station")
    with _line_client(folder, db, baseline_n=100, drift_window=100) as client:
        _post_line(client, 200, drift_after=100, seed=1)
        health = client.get("/v1/station/health").json()
    assert health["status"] == "alarm" and health["window"] == 100
    (row,) = health["lines"]
    assert (row["line"], row["model"], row["status"], row["n"]) == ("cam1", "fake-model", "alarm", 100)
    assert row["psi"] > 1.0 and row["reference"]["kind"] == "station" and row["reference"]["n"] == 100
    assert "PSI" in row["reasons"][0] and "the p(NG) distribution moved" in row["reasons"][0]
    assert any("drift ALARM on line cam1, model fake-model" in m for m in caplog.messages)


@pytest.mark.integration  # seconds: CI runs it, the unit loop leaves it out
def test_the_same_camera_raises_no_alarm(station, caplog):
    folder, db = station
    caplog.set_level(logging.WARNING, logger="vlm_inspect.station")
    with _line_client(folder, db, baseline_n=100, drift_window=100) as client:
        _post_line(client, 200, drift_after=None, seed=1)
        health = client.get("/v1/station/health").json()
    (row,) = health["lines"]
    assert health["status"] == "ok" and row["status"] == "ok" and row["psi"] < 0.1, row
    assert row["ng_limits"][0] <= row["ng_rate"] <= row["ng_limits"][1]
    assert not [m for m in caplog.messages if "drift" in m]


def test_health_collects_until_the_baseline_and_window_are_full(tmp_path: Path):
    with _line_client(tmp_path / "st", None, baseline_n=50, drift_window=50) as client:
        _post_line(client, 20, None, seed=2)
        (row,) = client.get("/v1/station/health").json()["lines"]
    assert row["status"] == "collecting" and row["reasons"] == ["20 of 50 inspections"] and row["reference"] is None


def test_the_monitor_logs_an_alarm_and_when_it_clears(tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING, logger="vlm_inspect.station")
    store = open_store(tmp_path / "st")
    monitor = LineMonitor(store, LineSettings(baseline_n=300, drift_window=300))
    start = datetime.now(timezone.utc) - timedelta(hours=6)
    fill_line(store, 600, start, timedelta(seconds=20), drift_after=300)  # the camera turns brighter
    assert monitor.check()["status"] == "alarm"
    assert monitor.check()["status"] == "alarm"  # still raised: logged once
    fill_line(store, 300, start + timedelta(hours=4), timedelta(seconds=20), seed=7)  # the camera is put right
    assert monitor.check()["status"] == "ok"
    drift_lines = [m for m in caplog.messages if "drift" in m]
    assert len(drift_lines) == 2 and "drift ALARM on line cam1, model boxes-v1" in drift_lines[0]
    assert drift_lines[1].startswith("drift alarm cleared on line cam1") and drift_lines[1].endswith("(now ok)")
    store.close()


def _report(path: Path, n_ok: int = 80, n_ng: int = 20) -> Path:
    images = [{"label": "OK", "p_ng": {"tuned": {"q0": 0.2 + 0.001 * i}}} for i in range(n_ok)]
    images += [{"label": "NG", "p_ng": {"tuned": {"q0": 0.7}}} for _ in range(n_ng)]
    results = {
        "questions": [{"id": "q0", "default": True}],
        "images": images,
        "models": {"tuned": {"name": "boxes + run"}},
        "config": {"threshold": 0.5},
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_serve_baseline_keeps_the_evaluation_distribution(tmp_path: Path):
    report = _report(tmp_path / "report")
    with _line_client(tmp_path / "st", None, baseline=str(report), baseline_n=50, drift_window=50) as client:
        _post_line(client, 60, None, seed=3)
        (row,) = client.get("/v1/station/health").json()["lines"]
    assert row["reference"]["kind"] == "evaluate" and row["reference"]["n"] == 100
    assert row["reference"]["source"].endswith("results.json") and row["mixed_ng_share"] is not None
    store = open_store(tmp_path / "st")
    with store.reading() as session:
        kinds = sorted(b.kind for b in session.scalars(select(Baseline)))
    assert kinds == ["evaluate", "station"]  # the station baseline is kept too, for the NG-rate check
    store.close()


def test_bad_line_settings_are_listed_together(tmp_path: Path):
    cfg = ServeConfig(
        model="m", baseline=str(_report(tmp_path / "small", 5, 5)), timezone="Mars/Base", shift_hours=[6, 25],
        audit_rate=0, drift_psi_warn=0.3, drift_psi_alarm=0.2, line="x" * 81, drift_window=5,
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check_serve_config(cfg)
    for words in ("baseline: needs a station", "too few", "timezone: 'Mars/Base'", "shift_hours: 25", "audit_rate: 0", "drift_psi_warn",
                  "line: ", "drift_window: 5"):  # fmt: skip
        assert words in str(err.value), words
    with pytest.raises(ConfigError, match="not a results.json"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "results.json").write_text("{}")
        check_serve_config(ServeConfig(model="m", baseline=str(tmp_path / "bad")))


# ---------------------------------------------------------------- routes and metrics


def test_line_routes_answer_errors_keys_and_pages(tmp_path: Path):
    auth = {"Authorization": f"Bearer {KEY}"}
    with _line_client(tmp_path / "st", None, api_key=KEY) as client:
        r = client.post("/v1/inspect", files={"file": ("a.png", photo(60))}, headers=auth)
        assert r.status_code == 200
        for path in ("/v1/station/line", "/v1/station/health", "/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=auth).status_code == 200, path
        view = client.get("/v1/station/line", headers=auth).json()
        assert view["period"] == "shift" and view["groups"][0]["line"] == "cam1"
        bad = client.get("/v1/station/line?period=week&since=monday", headers=auth)
        assert bad.status_code == 422 and all(w in bad.json()["error"]["message"] for w in ("period: 'week'", "since"))
        page = client.get("/line")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert client.get("/static/line.js").status_code == 200 and client.get("/static/line.css").status_code == 200
    plain = TestClient(create_app(FakePredictor(), ServeConfig(model="unused")), base_url=LOOPBACK)
    with plain:
        assert plain.get("/v1/station/health").status_code == 404
        assert plain.post("/v1/inspect", files={"file": ("a.png", photo(20))}).status_code == 200
        metrics = plain.get("/metrics").text  # counted without a station too
        assert 'vlm_inspect_inspections_total{line="api",model="fake-model",verdict="NG"} 1.0' in metrics


def test_metrics_count_verdicts_latency_queue_audit_and_drift(tmp_path: Path):
    with _line_client(tmp_path / "st", None, baseline_n=50, drift_window=50, audit_rate=0.25) as client:
        verdicts = _post_line(client, 60, drift_after=30, seed=4)
        client.get("/v1/station/health")
        body = client.get("/metrics")
    assert body.headers["content-type"].startswith("text/plain")
    text_ = body.text
    for verdict in ("OK", "NG"):
        line = f'vlm_inspect_inspections_total{{line="cam1",model="fake-model",verdict="{verdict}"}} {float(verdicts.count(verdict))}'
        assert line in text_, line
    assert 'vlm_inspect_inspection_latency_seconds_count{line="cam1",model="fake-model"} 60.0' in text_
    assert "vlm_inspect_queue_depth 0.0" in text_
    in_sample = sum(AuditSample(0.25).contains(audit_u(i)) for i in range(1, 61))
    assert f"vlm_inspect_audit_unreviewed {float(in_sample)}" in text_
    assert 'vlm_inspect_drift_status{line="cam1",model="fake-model",model_hash=' in text_
    assert "vlm_inspect_drift_psi{" in text_


def test_watch_names_its_line_after_the_folder_and_serves_metrics(tmp_path: Path):
    folder = tmp_path / "cam-left"
    folder.mkdir()
    for i, shade in enumerate((230, 20)):
        (folder / f"{i}.png").write_bytes(photo(shade))
    cfg = WatchConfig(folder=str(folder), model="unused", station=str(tmp_path / "st"), poll_s=0.01, once=True)
    w = Watcher(open_store(tmp_path / "st"), DarknessModel(), cfg, "hash0")
    w.run()
    assert {r["line"] for r in list_records(w.store, HistoryFilter())[0]} == {"cam-left"}
    server = serve_metrics(w.monitor.metrics, "127.0.0.1", 0)
    try:
        port = server.server_address[1]
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    assert 'vlm_inspect_inspections_total{line="cam-left",model="darkness",verdict="NG"} 1.0' in scraped
    w.store.close()
    with pytest.raises(ConfigError) as err:
        check_watch_config(
            WatchConfig(folder=str(folder), model="m", station="s", metrics_port=70000, drift_ng_sigma=0)
        )
    assert "metrics_port: 70000" in str(err.value) and "drift_ng_sigma" in str(err.value)
    assert isinstance(StationMetrics().exposition(), bytes)


# ---------------------------------------------------------------- the page in a real browser


@pytest.mark.integration
def test_line_view_in_headless_chromium(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    expect = sync_api.expect
    folder = tmp_path / "station"
    build_drifted_station(folder)
    settings = dict(baseline_n=200, drift_window=200, audit_rate=0.2, timezone="UTC", line="cam1")

    def make_app(port: int):
        cfg = ServeConfig(model="unused", station=str(folder), api_key=KEY, port=port, **settings)
        return create_app(FakePredictor(), cfg)

    with running(make_app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors = []  # script errors, and anything the page's CSP refused (inline SVG must not be)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("console", lambda msg: errors.append(msg.text) if "Refused" in msg.text else None)
            page.goto(url + "/line")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#alarm")).to_contain_text("Drift alarm — line cam1, model boxes-v1", timeout=20_000)
            expect(page.locator("article.group .status")).to_have_text("alarm")
            expect(page.locator(".pchart svg circle.point")).to_have_count(15)  # 5 days × 3 shifts
            expect(page.locator("table.rules td").first).to_contain_text("4 of 5 in a row beyond 1σ")  # the dark shifts
            expect(page.locator(".hist svg rect.bar-recent")).to_have_count(10)
            expect(page.locator("table.estimates tbody tr")).to_have_count(16)  # all days + 15 shifts
            expect(page.locator("table.estimates tr.all")).to_contain_text("28.6% [13.8%–50.0%] (6/21)")  # escapes seen
            shot(page, tmp_path, "line-view-drift-alarm.png", full_page=True)
            shot(page.locator("#audit"), tmp_path, "line-audit-escape.png")
            page.set_viewport_size({"width": 1600, "height": 1000})
            page.goto(url + "/history?order=least-sure")
            expect(page.locator("#records tr.rec")).to_have_count(50, timeout=10_000)
            shown = [float(t) for t in page.locator("#records tr.rec td.num").all_inner_texts()[:5]]
            assert all(abs(p - 0.5) <= 0.04 for p in shown), shown  # nearest the threshold first
            page.locator("#records tr.rec").first.click()
            expect(page.locator("#d-meta")).to_contain_text("line cam1")
            page.locator("#photo").wait_for(state="visible")
            shot(page, tmp_path, "history-least-sure.png")
            page.select_option("#order", "disagreements")
            expect(page.locator("#records tr.rec").first).to_contain_text("→")
            rows = page.locator("#records tr.rec td.state").all_inner_texts()
            assert rows and all("→" in r for r in rows), rows  # operator ≠ model on every row
            page.locator("#records tr.rec").first.click()
            expect(page.locator("#d-reviews li")).to_have_count(1)
            shot(page, tmp_path, "history-disagreements.png")
            assert not errors, errors  # no script error, no refused inline SVG (CSP)
        finally:
            browser.close()


def shot(target, tmp_path: Path, name: str, full_page: bool = False) -> None:
    """A screenshot of a page or an element; with $VLM_INSPECT_SCREENS set, a 256-colour copy there (small PNGs)."""
    from PIL import Image

    path = tmp_path / name
    target.screenshot(path=str(path), **({"full_page": True} if full_page else {}))
    if os.environ.get(SCREENS_ENV):
        out = Path(os.environ[SCREENS_ENV])
        out.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("RGB").quantize(256).save(out / name, optimize=True)


def build_drifted_station(folder: Path) -> None:
    """Five days of line cam1 (1,500 boxes, three shifts a day) whose camera turns brighter after record 1,000."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    start = datetime(now.year, now.month, now.day, 6, tzinfo=timezone.utc) - timedelta(days=4)
    if start + timedelta(days=5) > now + timedelta(hours=1):
        start -= timedelta(days=1)  # the last shift should end before now
    store = open_store(folder)
    fill_line(store, 1500, start, timedelta(minutes=4.8), drift_after=1000, audit=AuditSample(0.2, 0))
    store.close()
