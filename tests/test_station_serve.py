"""`serve --station`: every inspection recorded; history, review, CSV and label routes; export → prepare.

Over the fake model of test_serve.py (p(NG) is darkness), so verdicts are known. The browser test
drives the real page in headless Chromium: upload, reload the history, correct a verdict and draw a
box, export, and `prepare` reads the box back as location words.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from station_helpers import photo  # noqa: E402
from test_serve import KEY, FakePredictor, chat_body  # noqa: E402
from vlm_inspect.cli import app as cli  # noqa: E402
from vlm_inspect.config import ExportConfig, ServeConfig  # noqa: E402
from vlm_inspect.errors import OutputExistsError, StationError  # noqa: E402
from vlm_inspect.export import export  # noqa: E402
from vlm_inspect.label import queue_photos  # noqa: E402
from vlm_inspect.service.app import create_app  # noqa: E402
from vlm_inspect.service.station_routes import label_app  # noqa: E402
from vlm_inspect.station.history import HistoryFilter, all_records  # noqa: E402
from vlm_inspect.station.store import open_store  # noqa: E402

LOOPBACK = "http://127.0.0.1:8000"  # serve answers only loopback Host names on a loopback bind

SCREENS_ENV = "VLM_INSPECT_SCREENS"
"""A folder to copy the browser test's screenshots into (for the README and notes)."""


def station_client(station: Path, **settings) -> TestClient:
    cfg = ServeConfig(model="unused", station=str(station), **settings)
    return TestClient(create_app(FakePredictor(), cfg), raise_server_exceptions=False, base_url=LOOPBACK)


def inspect(client: TestClient, shade: int, headers: dict | None = None, name: str = "p.png") -> dict:
    r = client.post("/v1/inspect", files={"file": (name, photo(shade))}, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_route_records_and_history_filters(tmp_path: Path):
    with station_client(tmp_path / "st") as client:
        dark = inspect(client, 20, {"X-Inspect-Source": "page"})
        light = inspect(client, 230)
        assert (
            dark["verdict"] == "NG" and isinstance(dark["record_id"], int) and light["record_id"] != dark["record_id"]
        )
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        streamed = client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert "[DONE]" in streamed.text
        listing = client.get("/v1/station/records").json()
        assert listing["total"] == 4 and listing["models"] == ["fake-model"]
        by_source = {r["source"]: r for r in listing["records"]}
        assert set(by_source) == {"page", "api", "chat"}
        assert by_source["page"]["p_ng"] == pytest.approx(dark["p_ng"]) and by_source["page"]["threshold"] == 0.5
        chats = [r for r in listing["records"] if r["source"] == "chat"]
        assert len(chats) == 2 and all(r["verdict"] == "NG" and r["description"].startswith("NG") for r in chats)
        assert [r["id"] for r in client.get("/v1/station/records?verdict=OK").json()["records"]] == [light["record_id"]]
        assert client.get("/v1/station/records?p_min=0.97&p_max=1").json()["total"] == 0
        bad = client.get("/v1/station/records?p_min=x&review=maybe&since=yesterday")
        assert bad.status_code == 422 and all(w in bad.json()["error"]["message"] for w in ("p_min", "since"))
        photo_bytes = client.get(f"/v1/station/records/{dark['record_id']}/photo")
        assert photo_bytes.content == photo(20) and photo_bytes.headers["content-type"] == "image/png"
        assert client.get("/v1/station/records/999").status_code == 404


def test_review_route_csv_and_queue(tmp_path: Path):
    with station_client(tmp_path / "st") as client:
        rid = inspect(client, 20)["record_id"]
        other = inspect(client, 230)["record_id"]
        body = {"verdict": "NG", "operator": "ann", "defect_type": "spot", "boxes": [[6, 6, 24, 20]]}
        saved = client.post(f"/v1/station/records/{rid}/reviews", json=body)
        assert saved.status_code == 200, saved.text
        record = saved.json()["record"]
        assert record["review"] == "confirmed" and record["latest_review"]["boxes"] == [[6, 6, 24, 20]]
        outside = client.post(f"/v1/station/records/{rid}/reviews", json={**body, "boxes": [[0, 0, 500, 9]]})
        assert outside.status_code == 422 and "outside the 96x72 photo" in outside.json()["error"]["message"]
        assert client.post(f"/v1/station/records/{rid}/reviews", json={"verdict": "OK"}).status_code == 422
        assert client.post("/v1/station/records/999/reviews", json=body).status_code == 404
        assert client.get("/v1/station/queue").json() == {"ids": [other], "left": 1}
        csv_text = client.get("/v1/station/records.csv?review=reviewed").text
        assert csv_text.count("\r\n") == 2 and "ann" in csv_text and "[[6.0, 6.0, 24.0, 20.0]]" in csv_text


def test_station_routes_need_the_api_key_and_need_a_station(tmp_path: Path):
    auth = {"Authorization": f"Bearer {KEY}"}
    with station_client(tmp_path / "st", api_key=KEY) as client:
        rid = inspect(client, 20, auth)["record_id"]
        for path in ("/v1/station/records", "/v1/station/records.csv", f"/v1/station/records/{rid}/photo"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=auth).status_code == 200, path
        review = {"verdict": "OK", "operator": "ann"}
        assert client.post(f"/v1/station/records/{rid}/reviews", json=review).status_code == 401
        assert client.get("/history").status_code == 200  # the page itself holds no data
    plain = TestClient(create_app(FakePredictor(), ServeConfig(model="unused")), base_url=LOOPBACK)
    with plain:
        missing = plain.get("/v1/station/records")
        assert missing.status_code == 404 and "--station" in missing.json()["error"]["message"]
        assert "record_id" not in plain.post("/v1/inspect", files={"file": ("p.png", photo(20))}).json()


def test_a_full_disk_answers_507_naming_the_station(tmp_path: Path, monkeypatch):
    with station_client(tmp_path / "st") as client:

        def full(fd):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        r = client.post("/v1/inspect", files={"file": ("p.png", photo(20))})
        assert r.status_code == 507 and str(tmp_path / "st") in r.json()["error"]["message"]


def test_label_app_queues_a_folder_once(tmp_path: Path):
    photos = tmp_path / "fresh"
    (photos / "line1").mkdir(parents=True)
    for i in range(3):
        (photos / "line1" / f"{i}.png").write_bytes(photo(40 + 80 * i))
    store = open_store(tmp_path / "st")
    assert queue_photos(store, photos) == (3, 3)
    assert queue_photos(store, photos) == (0, 3)  # a second start adds nothing
    with TestClient(label_app(store, None), base_url=LOOPBACK) as client:
        assert client.get("/", follow_redirects=False).headers["location"] == "/history?label=1"
        queue = client.get("/v1/station/queue").json()
        assert queue["left"] == 3
        first = client.get(f"/v1/station/records/{queue['ids'][0]}").json()
        assert first["file"] == "line1/0.png" and first["verdict"] is None and first["source"] == "label"
        label = {"verdict": "NG", "operator": "ann", "boxes": [[1, 1, 9, 9]], "description": "a dark box"}
        assert client.post(f"/v1/station/records/{first['id']}/reviews", json=label).json()["record"]["review"] == (
            "labelled"
        )
        assert client.get("/v1/station/queue").json()["left"] == 2
    store.close()


def test_export_writes_class_folders_that_prepare_reads(tmp_path: Path):
    store = open_store(tmp_path / "st")
    ids = [
        store.record(photo(s, spot=s < 100), file_name=f"cam {s}.png", source="api", verdict="OK")
        for s in (20, 30, 200, 210, 220)
    ]
    store.review(ids[0], "NG", "ann", "black spot", [[6, 6, 24, 20]], "a round black spot")
    store.review(ids[1], "NG", "ann")
    for rid in ids[2:]:
        store.review(rid, "OK", "bob")
    store.record(photo(90), file_name="unreviewed.png", source="api", verdict="OK")
    store.close()
    out = tmp_path / "photos"
    export(ExportConfig(station=str(tmp_path / "st"), out=str(out)))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "config.yaml",  # the export's own settings: `export --overwrite` may replace what it wrote
        "export.json",  # how many went out, and each record skipped with its reason (none here)
        "ng/black_spot/cam_20-1.json",
        "ng/black_spot/cam_20-1.png",
        "ng/cam_30-2.png",
        "ok/cam_200-3.png",
        "ok/cam_210-4.png",
        "ok/cam_220-5.png",
    ]
    sidecar = json.loads((out / "ng/black_spot/cam_20-1.json").read_text())
    assert sidecar == {
        "description": "a round black spot",
        "defects": [{"type": "black spot", "box": [6.0, 6.0, 24.0, 20.0]}],
    }
    with pytest.raises(OutputExistsError):
        export(ExportConfig(station=str(tmp_path / "st"), out=str(out)))
    assert_prepare_reads_top_left(out, tmp_path / "dataset")
    assert json.loads((out / "export.json").read_text()) == {"exported": 5, "skipped": []}
    open_store(tmp_path / "empty").close()
    with pytest.raises(StationError, match="no reviewed record"):
        export(ExportConfig(station=str(tmp_path / "empty"), out=str(tmp_path / "none")))


def assert_prepare_reads_top_left(photos: Path, dataset: Path) -> None:
    """Run the real `prepare` verb and find the exported box as location words in a conversation."""
    result = CliRunner().invoke(cli, ["prepare", str(photos), "--out", str(dataset), "--val-fraction", "0"])
    assert result.exit_code == 0, result.output
    samples = json.loads((dataset / "train.json").read_text()) + json.loads((dataset / "val.json").read_text())
    said = [turn["value"] for s in samples for turn in s["conversations"] if turn["from"] == "gpt"]
    assert any("black spot" in text and "top left" in text for text in said), said


# ---------------------------------------------------------------- the page in a real browser


@contextmanager
def running(make_app) -> Iterator[str]:
    """A real server on a free loopback port; `make_app(port)` builds the app (its Host check names the port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get(SCREENS_ENV):
        Path(os.environ[SCREENS_ENV]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ[SCREENS_ENV]) / name)


def drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    box = page.locator(selector).bounding_box()
    page.mouse.move(box["x"] + start[0] * box["width"], box["y"] + start[1] * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + end[0] * box["width"], box["y"] + end[1] * box["height"], steps=5)
    page.mouse.up()


@pytest.mark.integration
def test_station_page_in_headless_chromium(tmp_path: Path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    expect = sync_api.expect
    uploads = []
    for i, (shade, spot) in enumerate(((230, True), (225, False), (40, False))):
        path = tmp_path / f"part-{i}.png"
        path.write_bytes(photo(shade, size=(480, 360), spot=spot))
        uploads.append(str(path))
    station = tmp_path / "station"

    def make_app(port: int):
        return create_app(FakePredictor(), ServeConfig(model="unused", station=str(station), api_key=KEY, port=port))

    with running(make_app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.set_input_files("#files", uploads)
            expect(page.locator(".card.ok, .card.ng")).to_have_count(3, timeout=30_000)

            page.goto(url + "/history")  # a new page load: the records come from the store
            expect(page.locator("#records tr.rec")).to_have_count(3, timeout=10_000)
            page.select_option("select[name=verdict]", "OK")
            page.click("#apply")
            expect(page.locator("#records tr.rec")).to_have_count(2)
            page.fill("#operator", "Ann Operator")
            page.dispatch_event("#operator", "change")
            page.locator("#records tr.rec", has_text="part-0.png").click()  # the light part with a spot: model said OK
            expect(page.locator("#d-file")).to_contain_text("part-0.png")
            expect(page.locator("#d-verdict")).to_have_text("OK")
            page.locator("#photo").wait_for(state="visible")
            page.click("button.choose.ng")
            page.fill("#defect-type", "black spot")
            page.fill("#description", "round black spot near the corner")
            # The spot lies at pixels (30..120, 30..100) of 480x360: drag over it on the shown photo.
            drag(page, "#boxes", (0.05, 0.07), (0.26, 0.29))
            expect(page.locator("#box-count")).to_have_text("1 box")
            screenshot(page, tmp_path, "station-review.png")
            page.click("#save")
            expect(page.locator("#saved")).to_contain_text("saved")
            page.select_option("select[name=verdict]", "")
            page.click("#apply")
            expect(page.locator("#records tr.rec")).to_have_count(3)
            expect(page.locator("#records tr.rec", has_text="part-0.png")).to_contain_text("OK → NG")
            screenshot(page, tmp_path, "station-history.png")
            label_with_touch(browser, tmp_path)
        finally:
            browser.close()

    out = tmp_path / "photos"
    store = open_store(station)
    for record in all_records(store, HistoryFilter(review="unreviewed")):  # the operator confirms the other two
        store.review(record["id"], record["verdict"], "Ann Operator")
    store.close()
    export(ExportConfig(station=str(station), out=str(out)))
    sidecar = json.loads(next(out.glob("ng/black_spot/part-0-*.json")).read_text())
    (x0, y0, x1, y1) = sidecar["defects"][0]["box"]
    assert 10 <= x0 <= 40 and 15 <= y0 <= 40 and 110 <= x1 <= 140 and 90 <= y1 <= 115, sidecar
    assert_prepare_reads_top_left(out, tmp_path / "dataset")


def touch_drag(page, selector: str, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A finger drag through Chromium's own touch input (the page sees pointer events of type touch)."""
    box = page.locator(selector).bounding_box()
    at = lambda f: {"x": box["x"] + f[0] * box["width"], "y": box["y"] + f[1] * box["height"]}  # noqa: E731
    cdp = page.context.new_cdp_session(page)
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [at(start)]})
    for i in range(1, 6):
        point = (start[0] + (end[0] - start[0]) * i / 5, start[1] + (end[1] - start[1]) * i / 5)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [at(point)]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})


def label_with_touch(browser, tmp_path: Path) -> None:
    """The labeller on a fresh folder, on a touch screen: box the first photo with a finger, then the next."""
    from playwright.sync_api import expect

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for i, spot in enumerate((True, False, True)):
        (fresh / f"new-{i}.png").write_bytes(photo(225, size=(480, 360), spot=spot))
    store = open_store(tmp_path / "label-station")
    queue_photos(store, fresh)
    with running(lambda port: label_app(store, None, port=port)) as url:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, has_touch=True)
        page = context.new_page()
        page.goto(url + "/")
        expect(page.locator("#d-file")).to_contain_text("new-0.png", timeout=10_000)
        expect(page.locator("#summary")).to_have_text("3 photo(s) left to label")
        page.fill("#operator", "Bo Labeller")
        page.dispatch_event("#operator", "change")
        page.locator("#photo").wait_for(state="visible")
        touch_drag(page, "#boxes", (0.05, 0.07), (0.26, 0.29))
        expect(page.locator("#box-count")).to_have_text("1 box")
        expect(page.locator("button.choose.ng")).to_have_class("choose ng chosen")  # a box means NG
        page.fill("#defect-type", "black spot")
        screenshot(page, tmp_path, "station-labeller.png")
        page.click("#save-next")
        expect(page.locator("#d-file")).to_contain_text("new-1.png")
        expect(page.locator("#summary")).to_have_text("2 photo(s) left to label")
        context.close()
    labelled = all_records(store, HistoryFilter(review="labelled"))
    assert [(r["file"], r["final_verdict"], r["latest_review"]["operator"]) for r in labelled] == [
        ("new-0.png", "NG", "Bo Labeller")
    ]
    (x0, y0, x1, y1) = labelled[0]["latest_review"]["boxes"][0]
    assert 10 <= x0 <= 40 and 15 <= y0 <= 40 and 110 <= x1 <= 140 and 90 <= y1 <= 115
    store.close()


@pytest.mark.integration
def test_a_review_starts_from_the_models_boxes_in_headless_chromium(tmp_path: Path):
    """The model boxed two defects, one well and one wrong: the operator keeps the first, moves it a little,
    deletes the second with a tap and saves; the review holds the operator's boxes, the record the model's."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    expect = sync_api.expect
    station = tmp_path / "station"
    store = open_store(station)
    model_boxes = [
        {"type": "black spot", "box": [30.0, 30.0, 120.0, 100.0]},
        {"type": "scratch", "box": [300.0, 200.0, 420.0, 320.0]},
    ]
    record_id = store.record(
        photo(230, size=(480, 360), spot=True), file_name="part-7.png", source="api", verdict="NG", p_ng=0.93,
        threshold=0.5, description="NG. A black spot.", defects=model_boxes, boxes_dropped=1,
    )  # fmt: skip
    store.close()

    def make_app(port: int):
        return create_app(FakePredictor(), ServeConfig(model="unused", station=str(station), port=port))

    with running(make_app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/history")
            page.fill("#operator", "Ann Operator")
            page.dispatch_event("#operator", "change")
            page.locator("#records tr.rec", has_text="part-7.png").click()
            page.locator("#photo").wait_for(state="visible")
            expect(page.locator("#box-count")).to_have_text("2 boxes")  # the review starts from the model's boxes
            expect(page.locator("#d-model-boxes")).to_contain_text("black spot, scratch")
            expect(page.locator("#defect-type")).to_have_value("black spot")
            drag(page, "#boxes", (75 / 480, 65 / 360), (85 / 480, 75 / 360))  # move the first by ~10 px
            drag(page, "#boxes", (360 / 480, 260 / 360), (360 / 480, 260 / 360))  # a tap on the second deletes it
            expect(page.locator("#box-count")).to_have_text("1 box")
            screenshot(page, tmp_path, "station-model-boxes.png")
            page.click("#save")
            expect(page.locator("#saved")).to_contain_text("saved")
        finally:
            browser.close()
    store = open_store(station)
    record = all_records(store, HistoryFilter(review="reviewed"))[0]
    store.close()
    assert record["id"] == record_id and record["defects"] == model_boxes and record["boxes_dropped"] == 1
    ((x0, y0, x1, y1),) = record["latest_review"]["boxes"]
    assert 36 <= x0 <= 44 and 36 <= y0 <= 44 and 126 <= x1 <= 134 and 106 <= y1 <= 114  # moved by ~10 px each way
