"""Localization measures against values worked out by hand: IoU of covered regions, ACC@IoU, pointing, stray
boxes, false alarms, per defect type, and the inputs that must not crash them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlm_inspect.data.sources import Item
from vlm_inspect.evaluation import localization as loc
from vlm_inspect.evaluation.metrics import wilson_interval

TRUTH = [0.0, 0.0, 10.0, 10.0]


# ---------------------------------------------------------------- one photo


def test_perfect_box():
    s = loc.score_photo([TRUTH], [TRUTH])
    assert (s.iou, s.pointed, s.n_true, s.n_predicted, s.stray) == (1.0, 1, 1, 1, 0)


def test_shifted_box_overlaps_by_hand():
    # 6 × 10 overlap; union 100 + 100 − 60 = 140; its centre (9, 5) lies in the true box
    s = loc.score_photo([[4, 0, 14, 10]], [TRUTH])
    assert s.iou == pytest.approx(60 / 140)
    assert s.pointed == 1 and s.stray == 0


def test_missed_box_and_no_box():
    missed = loc.score_photo([[50, 50, 60, 60]], [TRUTH])
    assert (missed.iou, missed.pointed, missed.stray) == (0.0, 0, 1)
    nothing = loc.score_photo([], [TRUTH])
    assert (nothing.iou, nothing.pointed, nothing.n_predicted, nothing.stray) == (0.0, 0, 0, 0)


def test_an_extra_box_halves_the_iou_and_is_stray():
    s = loc.score_photo([TRUTH, [50, 50, 60, 60]], [TRUTH])
    assert s.iou == pytest.approx(0.5)  # 100 both cover / 200 either covers
    assert s.pointed == 1 and s.stray == 1
    assert loc.ng_measures([s])["acc_iou"]["0.5"]["k"] == 1  # an IoU of exactly t counts at t


def test_several_true_boxes():
    truth = [TRUTH, [20, 0, 30, 10]]
    both = loc.score_photo([TRUTH, [20, 0, 30, 10]], truth)
    assert (both.iou, both.pointed, both.n_true) == (1.0, 2, 2)
    one = loc.score_photo([TRUTH], truth)
    assert one.iou == pytest.approx(0.5) and one.pointed == 1
    # One box around both: covers the 200 true px and the 100 px gap; its centre (15, 5) is in neither.
    around = loc.score_photo([[0, 0, 30, 10]], truth)
    assert around.iou == pytest.approx(200 / 300)
    assert around.pointed == 0 and around.stray == 1


def test_overlapping_boxes_are_counted_once():
    assert loc.region_iou([TRUTH, TRUTH], [TRUTH]) == 1.0
    # True boxes overlapping by 5 × 5 cover 175 px; the box around them covers 225.
    assert loc.region_iou([[0, 0, 15, 15]], [TRUTH, [5, 5, 15, 15]]) == pytest.approx(175 / 225)


def test_a_model_that_sprays_boxes_points_but_scores_low_elsewhere():
    grid = [[x, y, x + 10, y + 10] for x in range(0, 40, 10) for y in range(0, 40, 10)]
    s = loc.score_photo(grid, [TRUTH])
    assert s.pointed == 1  # pointing alone would call this perfect
    assert s.stray == 15 and s.iou == pytest.approx(100 / 1600)


def test_centre_on_an_edge_counts_as_inside():
    assert loc.score_photo([[10, 0, 20, 10]], [[0, 0, 20, 10]]).pointed == 1  # centre (15, 5)
    assert loc.holds(TRUTH, (10.0, 10.0)) and not loc.holds(TRUTH, (10.01, 5.0))


def test_fractional_pixels_are_exact():
    assert loc.region_iou([[0.5, 0.5, 2.5, 1.5]], [[1.5, 0.5, 3.5, 1.5]]) == pytest.approx(1 / 3)


def test_degenerate_inputs():
    with pytest.raises(ValueError, match="true box"):
        loc.region_iou([TRUTH], [])
    for bad in ([1, 2, 3], [5, 0, 5, 10], [5, 0, 2, 10], [0, 0, math.nan, 1], [0, 0, True, 1], "0,0,1,1", None):
        assert not loc.is_box(bad), bad
    defects = [{"type": "spot"}, {"type": "spot", "box": [3, 3, 3, 9]}, {"type": "spot", "box": [1, 2, 3, 4]}]
    assert loc.true_boxes(defects) == [[1.0, 2.0, 3.0, 4.0]]
    assert loc.covered_areas([], []) == (0.0, 0.0)


def test_mean_estimate_by_hand():
    est = loc.mean_estimate([0.2, 0.4, 0.6], "none")
    half = 1.959963984540054 * 0.2 / math.sqrt(3)  # sample sd 0.2
    assert est["value"] == pytest.approx(0.4) and est["n"] == 3
    assert est["low"] == pytest.approx(0.4 - half) and est["high"] == pytest.approx(0.4 + half)
    clamped = loc.mean_estimate([0.0, 1.0], "none")
    assert (clamped["low"], clamped["high"]) == (0.0, 1.0)
    assert loc.mean_estimate([0.3], "none") == {"value": 0.3, "low": None, "high": None, "n": 1, "reason": None}
    assert loc.mean_estimate([], "why")["reason"] == "why"


# ---------------------------------------------------------------- a set of photos


def item(n: int, label: str, kind: str | None = None, boxes: list | None = None) -> Item:
    defects = [{"type": kind, "box": b} for b in boxes or []]
    return Item(f"p{n}", Path(f"p{n}.png"), f"p{n}.png", label, kind, defects)


ITEMS = [
    item(0, "NG", "spot", [TRUTH]),  # perfect
    item(1, "NG", "spot", [TRUTH]),  # shifted: IoU 3/7
    item(2, "NG", "scratch", [TRUTH, [20, 0, 30, 10]]),  # one of two found, plus a stray box
    item(3, "NG", "scratch", [TRUTH]),  # no box
    item(4, "NG", "stain"),  # no true box: not asked
    item(5, "OK"),
    item(6, "OK"),
    item(7, "OK"),
]
PREDICTED = {
    "p0": [TRUTH],
    "p1": [[4, 0, 14, 10]],
    "p2": [TRUTH, [50, 50, 60, 60]],
    "p3": [],
    "p5": [],
    "p6": [[1, 1, 5, 5], [6, 6, 9, 9]],
    "p7": [[1, 1, 5, 5]],
}


def located() -> dict[str, dict]:
    by_id = {i.id: i for i in ITEMS}
    return {
        pid: loc.located_photo(by_id[pid], [{"type": "spot", "box": b} for b in boxes], dropped=1 if pid == "p3" else 0)
        for pid, boxes in PREDICTED.items()
    }


def wilson(k: int, n: int) -> dict:
    low, high = wilson_interval(k, n)
    return {"value": k / n, "low": low, "high": high, "k": k, "n": n, "reason": None}


def test_which_photos_are_asked():
    asked, reason = loc.photos_to_locate(ITEMS)
    assert [i.id for i in asked] == ["p0", "p1", "p2", "p3", "p5", "p6", "p7"] and reason is None
    assert loc.photos_to_locate(ITEMS, enabled=False) == ([], loc.SWITCHED_OFF)
    assert loc.photos_to_locate([ITEMS[4], *ITEMS[5:]]) == ([], loc.NO_BOXED_NG)


def test_model_measures_by_hand():
    m = loc.model_measures(ITEMS, located())
    # IoU per NG photo: 1, 3/7, 100/300 (the true 200 px, the 100 px stray box), 0
    ious = [1.0, 3 / 7, 100 / 300, 0.0]
    assert (m["n_ng"], m["n_true_boxes"], m["n_ok"]) == (4, 5, 3)
    assert m["acc_iou"]["0.5"] == wilson(1, 4)
    assert m["acc_iou"]["0.3"] == wilson(3, 4)
    assert m["mean_iou"]["value"] == pytest.approx(sum(ious) / 4) and m["mean_iou"]["n"] == 4
    assert m["pointing"] == wilson(3, 5)  # p0, p1 and the first box of p2 are pointed at
    assert m["ng_photos_with_boxes"] == wilson(3, 4)
    assert m["stray_boxes_per_ng_photo"] == {"value": 0.25, "boxes": 1, "photos": 4, "reason": None}
    assert m["false_alarms_per_ok_photo"] == {"value": 1.0, "boxes": 3, "photos": 3, "reason": None}
    assert m["ok_photos_with_boxes"] == wilson(2, 3)
    assert m["boxes_dropped"] == 1
    types = {t["type"]: t for t in m["per_type"]}
    assert list(types) == ["scratch", "spot"]  # stain has no true box, so no row
    assert types["spot"]["acc_iou"]["0.5"] == wilson(1, 2) and types["spot"]["pointing"] == wilson(2, 2)
    assert types["scratch"]["acc_iou"]["0.3"] == wilson(1, 2) and types["scratch"]["pointing"] == wilson(1, 3)
    assert types["scratch"]["mean_iou"]["value"] == pytest.approx((100 / 300) / 2)


def test_measures_without_ok_photos_or_without_ng_photos_say_why():
    ng_only = loc.model_measures(ITEMS[:4], located())
    assert ng_only["false_alarms_per_ok_photo"]["value"] is None and ng_only["ok_photos_with_boxes"]["reason"]
    ok_only = loc.model_measures(ITEMS[5:], located())
    assert ok_only["acc_iou"]["0.5"]["value"] is None and ok_only["acc_iou"]["0.5"]["reason"] == loc.NO_BOXED_NG
    assert ok_only["mean_iou"]["value"] is None and ok_only["per_type"] == []


def test_results_block_and_summary_rows():
    photos = located()
    block = loc.localization_results(
        ITEMS, {"tuned": {"question": "Where?", "photos": photos}}, {"tuned": "tiny + run"}, None
    )
    assert (block["n_ng"], block["n_true_boxes"], block["n_ok"]) == (4, 5, 3)
    assert block["questions"] == {"tuned": "Where?"} and block["models"]["tuned"]["name"] == "tiny + run"
    one_model = {"tuned": {"question": "", "photos": photos}}
    assert loc.photo_rows("p4", one_model) is None  # not asked: no true box
    assert loc.photo_rows("p6", one_model)["tuned"]["defects"][1]["box"] == [6, 6, 9, 9]
    rows = dict(loc.summary_rows({"localization": block}, models=("tuned",)))
    assert rows["ACC@IoU 0.5 (boxes)"][0].startswith("25.0% [")
    assert rows["pointing (boxes)"][0].startswith("60.0% [")
    assert rows["false boxes / OK photo"] == ["1.00 (3/3)"]
    skipped = loc.localization_results(ITEMS[4:], {}, {}, loc.NO_BOXED_NG)
    assert skipped["models"] == {} and skipped["n_ng"] == 0
    assert loc.summary_rows({"localization": skipped}) == [("boxes", [f"not measured: {loc.NO_BOXED_NG}", ""])]
