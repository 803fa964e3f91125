"""A product's golden sample in the station (#26): chosen from records an operator confirmed OK, used by `serve` and
`watch` for every photo of the product unless `--reference` says otherwise, and recorded with every verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from station_helpers import DarknessModel, photo
from vlm_inspect.config import ServeConfig
from vlm_inspect.data.reference import NO_REFERENCE, Reference
from vlm_inspect.errors import StationError
from vlm_inspect.station.history import HistoryFilter, all_records, csv_text, get_record
from vlm_inspect.station.references import GoldenSource, golden_set, set_golden
from vlm_inspect.station.store import open_store

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from test_serve import FakePredictor  # noqa: E402
from test_station_watch import make_folder, watcher  # noqa: E402
from vlm_inspect.service.app import create_app  # noqa: E402

LOOPBACK = "http://127.0.0.1:8000"


def recorded(store, shade: int, review: str | None = None) -> int:
    record_id = store.record(photo(shade), file_name=f"part-{shade}.png", source="api", verdict="OK", p_ng=0.1)
    if review:
        store.review(record_id, review, "Ann", defect_type=None)
    return record_id


def test_only_photos_an_operator_confirmed_ok_become_golden_and_every_problem_is_named(tmp_path: Path):
    store = open_store(tmp_path / "st")
    ok, unreviewed, ng = recorded(store, 230, "OK"), recorded(store, 220), recorded(store, 40, "NG")
    with pytest.raises(StationError) as err:
        set_golden(store, "box", [ok, unreviewed, ng, 999, ok], " ")
    text = str(err.value)
    for said in (
        "operator: give a name",
        "a record is named twice",
        f"record {unreviewed}: only photos an operator confirmed OK can be golden samples (not reviewed)",
        f"record {ng}: only photos an operator confirmed OK can be golden samples (its latest review says NG)",
        "record 999: no such record",
        "at most 4 photos",
    ):
        assert said in text, text
    assert golden_set(store, "box") is None  # nothing was put in force
    first = set_golden(store, "box", [ok], "Ann")
    assert [p.record_id for p in first.photos] == [ok] and first.operator == "Ann"
    store.review(unreviewed, "OK", "Bo")
    second = set_golden(store, "box", [unreviewed, ok], "Bo")
    assert second.id > first.id and [p.record_id for p in golden_set(store, "box").photos] == [unreviewed, ok]
    assert golden_set(store, "other product") is None  # one set per product
    assert set_golden(store, "box", [], "Bo") is None and golden_set(store, "box") is None  # cleared
    store.close()


def test_the_golden_source_reads_the_set_once_and_refuses_a_changed_photo(tmp_path: Path):
    store = open_store(tmp_path / "st")
    ok = recorded(store, 230, "OK")
    source = GoldenSource(store, "box")
    assert source.current() is None
    set_golden(store, "box", [ok], "Ann")
    reference = source.current()
    assert reference.name == "station" and reference.files == ("part-230.png",) and source.current() is reference
    assert not GoldenSource(store, "box", enabled=False).current()  # --reference named: the station's set is not used
    record = get_record(store, ok)
    store.photo_path(record["photo_sha256"], record["photo_suffix"]).write_bytes(photo(40))  # replaced on disk
    with pytest.raises(StationError, match="changed since it was recorded"):
        GoldenSource(store, "box").current()
    store.close()


def test_watch_judges_against_the_golden_set_and_records_which(tmp_path: Path, capsys: pytest.CaptureFixture):
    station = tmp_path / "st"
    store = open_store(station)
    golden = recorded(store, 235, "OK")
    set_golden(store, "box", [golden], "Ann")
    store.close()
    folder = make_folder(tmp_path, shades=(230, 20))
    model = DarknessModel(reference=Reference("run", files=("ref_01.png",), sha256=("r" * 64,)))
    w = watcher(folder, station, model, sort="result-file", once=True)
    w.run()
    judged = [r for r in model.judged if r is not None]
    assert judged and all(r.name == "station" and r.files == ("part-235.png",) for r in judged)
    records = {r["file"]: r for r in all_records(w.store, HistoryFilter()) if r["source"] == "watch"}
    sha = get_record(w.store, golden)["photo_sha256"]
    expected = {"name": "station", "photos": [{"file": "part-235.png", "sha256": sha}]}
    assert {f: r["reference"] for f, r in records.items()} == {"cam-0.png": expected, "cam-1.png": expected}
    assert json.loads((folder / "cam-1.png.result.json").read_text())["reference"] == expected
    assert "judging against station: part-235.png" in capsys.readouterr().out
    assert "station: part-235.png" in csv_text(list(records.values()))

    (tmp_path / "b").mkdir()
    none = make_folder(tmp_path / "b", shades=(230,))
    plain = DarknessModel()
    watcher(none, tmp_path / "st", plain, reference="none", sort="result-file", once=True).run()
    assert plain.judged == [None]  # --reference none: the predictor's own setting (the photo alone), not the station's
    assert json.loads((none / "cam-0.png.result.json").read_text())["reference"] is None


def test_serve_uses_the_golden_set_chosen_on_the_station_routes(tmp_path: Path):
    predictor = FakePredictor()
    cfg = ServeConfig(model="unused", station=str(tmp_path / "st"))
    with TestClient(create_app(predictor, cfg), raise_server_exceptions=False, base_url=LOOPBACK) as client:
        first = client.post("/v1/inspect", files={"file": ("good.png", photo(232))}).json()
        assert first["reference"] is None and client.get("/v1/station/golden").json() == {
            "product": "product",
            "golden": None,
        }
        bad = client.put("/v1/station/golden", json={"record_ids": [first["record_id"]], "operator": "Ann"})
        assert bad.status_code == 422 and "confirmed OK" in bad.json()["error"]["message"]
        review = {"verdict": "OK", "operator": "Ann"}
        assert client.post(f"/v1/station/records/{first['record_id']}/reviews", json=review).status_code == 200
        chosen = client.put("/v1/station/golden", json={"record_ids": [first["record_id"]], "operator": "Ann"})
        assert chosen.status_code == 200 and chosen.json()["golden"]["photos"][0]["file"] == "good.png"
        assert client.get("/v1/reference").json()["reference"]["name"] == "station"
        second = client.post("/v1/inspect", files={"file": ("next.png", photo(60))}).json()
        assert second["reference"]["name"] == "station" and predictor.judged[-1].name == "station"
        alone = client.post("/v1/inspect", files={"file": ("x.png", photo(60))}, data={"reference": "none"}).json()
        assert alone["reference"] is None and predictor.judged[-1] is NO_REFERENCE  # a request's own word wins
        records = client.get("/v1/station/records").json()["records"]
        by_file = {r["file"]: r["reference"] for r in records}
        assert by_file["next.png"]["name"] == "station" and by_file["x.png"] is None and by_file["good.png"] is None
        assert all(r["reference_known"] for r in records)
        unknown = client.put("/v1/station/golden", json={"record_ids": [1], "operator": "Ann", "extra": 1})
        assert unknown.status_code == 422


@pytest.mark.integration
def test_an_operator_chooses_the_golden_sample_on_the_history_page(tmp_path: Path):
    from conftest import CHROMIUM, CHROMIUM_FLAGS
    from test_station_serve import running, screenshot

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
    expect = sync_api.expect
    station = tmp_path / "st"
    store = open_store(station)
    good = recorded(store, 232, "OK")
    unsure = recorded(store, 225)
    store.close()
    predictor = FakePredictor()

    def make_app(port: int):
        return create_app(predictor, ServeConfig(model="unused", station=str(station), port=port))

    with running(make_app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 800})
            page.goto(f"{url}/history#{unsure}")
            expect(page.locator("#golden-state")).to_contain_text("none chosen")
            expect(page.locator("#d-file")).to_contain_text(f"#{unsure}")
            expect(page.locator("#golden-add")).to_be_hidden()  # not confirmed OK: it cannot be a golden sample
            page.locator("#records tr.rec", has_text="part-232.png").click()
            expect(page.locator("#golden-add")).to_be_visible()
            page.fill("#operator", "Ann Operator")
            page.click("#golden-add")
            expect(page.locator("#golden-photos img")).to_have_count(1)
            expect(page.locator("#golden-state")).to_contain_text("chosen by Ann Operator")
            expect(page.locator("#golden-add")).to_be_hidden()
            screenshot(page, tmp_path, "history-golden-sample.png")
            with TestClient(make_app(8000), base_url=LOOPBACK) as client:  # the same station, another process
                answer = client.post("/v1/inspect", files={"file": ("new.png", photo(200))}).json()
            assert answer["reference"]["photos"][0]["file"] == "part-232.png"
            page.click("#golden-clear")
            expect(page.locator("#golden-photos img")).to_have_count(0)
        finally:
            browser.close()
    store = open_store(station)
    assert golden_set(store, "product") is None and get_record(store, good)["review"] == "confirmed"
    store.close()
