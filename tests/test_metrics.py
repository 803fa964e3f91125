"""Metrics against hand-computed cases: escape/overkill, Wilson intervals, ROC with ties, thresholds."""

from __future__ import annotations

import json

import pytest

from vlm_inspect.errors import DataError
from vlm_inspect.evaluation import metrics as m

# Hand-worked set: 3 NG, 2 OK. At threshold 0.5 the NG at 0.2 escapes and the OK at 0.7 is overkill.
LABELS = ["NG", "NG", "NG", "OK", "OK"]
P_NG = [0.9, 0.6, 0.2, 0.7, 0.1]


def test_confusion_and_rates_on_hand_worked_set():
    c = m.confusion(LABELS, m.verdicts(P_NG, 0.5))
    assert c == m.Confusion(tp=2, fn=1, fp=1, tn=1)
    assert (c.n, c.n_ng, c.n_ok) == (5, 3, 2)
    assert m.accuracy(c).value == pytest.approx(3 / 5)
    assert m.escape_rate(c).value == pytest.approx(1 / 3)
    assert (m.escape_rate(c).k, m.escape_rate(c).n) == (1, 3)
    assert m.overkill_rate(c).value == pytest.approx(1 / 2)
    assert m.balanced_accuracy(c).value == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_threshold_is_inclusive():
    assert m.verdicts([0.5, 0.49999], 0.5) == ["NG", "OK"]


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (0, 10, 0.0, 0.2775),  # "0 errors in 10" still allows up to ~28%
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
        (1, 10, 0.0179, 0.4042),
        (0, 4, 0.0, 0.4899),
        (0, 300, 0.0, 0.0126),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    got = m.wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError):
        m.wilson_interval(0, 0)
    with pytest.raises(ValueError):
        m.wilson_interval(4, 3)


def test_balanced_accuracy_interval_contains_value_and_is_wider_than_95_wilson_parts():
    c = m.Confusion(tp=5, fn=1, fp=1, tn=3)
    ba = m.balanced_accuracy(c)
    assert ba.low < ba.value < ba.high
    hit_low, hit_high = m.wilson_interval(5, 6)
    pass_low, pass_high = m.wilson_interval(3, 4)
    assert ba.low < (hit_low + pass_low) / 2
    assert ba.high > (hit_high + pass_high) / 2


def test_all_ok_set_leaves_escape_balanced_and_auc_undefined_with_reasons():
    out = m.score_metrics([0.1, 0.6, 0.2], ["OK", "OK", "OK"], threshold=0.5, max_escape=0.0)
    assert out["confusion"] == {"tp": 0, "fn": 0, "fp": 1, "tn": 2}
    assert out["escape_rate"]["value"] is None and "no NG" in out["escape_rate"]["reason"]
    assert out["balanced_accuracy"]["value"] is None and out["balanced_accuracy"]["reason"]
    assert out["overkill_rate"]["value"] == pytest.approx(1 / 3)
    assert out["accuracy"]["value"] == pytest.approx(2 / 3)
    assert out["auc"]["value"] is None and "both classes" in out["auc"]["reason"]
    choice = out["max_escape_threshold"]
    assert choice["threshold"] is None and "no NG" in choice["reason"]
    json.dumps(out, allow_nan=False)  # no NaN anywhere


def test_all_ng_set_leaves_overkill_undefined_but_still_picks_a_threshold():
    out = m.score_metrics([0.7, 0.3], ["NG", "NG"], threshold=0.5, max_escape=0.0)
    assert out["escape_rate"]["value"] == pytest.approx(1 / 2)
    assert out["overkill_rate"]["value"] is None and "no OK" in out["overkill_rate"]["reason"]
    assert out["auc"]["value"] is None
    choice = out["max_escape_threshold"]
    assert choice["threshold"] == pytest.approx(0.3)
    assert choice["escape_rate"]["value"] == 0.0
    assert choice["overkill_rate"]["value"] is None
    json.dumps(out, allow_nan=False)


def test_empty_set_is_a_clear_data_error():
    with pytest.raises(DataError, match="empty"):
        m.score_metrics([], [], threshold=0.5, max_escape=0.0)
    with pytest.raises(DataError, match="empty"):
        m.confusion([], [])


def test_bad_labels_and_length_mismatch_are_data_errors():
    with pytest.raises(DataError, match="'good'"):
        m.is_ng(["OK", "good"])
    with pytest.raises(DataError, match="3 scores for 2 labels"):
        m.roc_auc([0.1, 0.2, 0.3], ["OK", "NG"])
    with pytest.raises(DataError, match="finite"):
        m.roc_auc([float("nan"), 0.2], ["OK", "NG"])


def test_auc_on_hand_worked_set():
    # NG x OK pairs ranked right: 0.9>0.7, 0.9>0.1, 0.6>0.1, 0.2>0.1 -> 4 of 6.
    auc, reason = m.roc_auc(P_NG, LABELS)
    assert auc == pytest.approx(4 / 6)
    assert reason is None


def test_roc_with_tied_scores_moves_diagonally_and_counts_ties_half():
    labels = ["NG", "OK", "NG", "OK"]
    p = [0.8, 0.8, 0.3, 0.1]
    curve = m.roc_curve(p, labels)
    assert curve.fpr == pytest.approx([0.0, 0.5, 0.5, 1.0])
    assert curve.tpr == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert curve.thresholds == [None, 0.8, 0.3, 0.1]
    auc, _ = m.roc_auc(p, labels)
    assert auc == pytest.approx(2.5 / 4)  # the 0.8/0.8 tie counts half


def test_roc_auc_extremes():
    assert m.roc_auc([0.5, 0.5, 0.5], ["NG", "OK", "NG"])[0] == pytest.approx(0.5)
    assert m.roc_auc([0.9, 0.1], ["NG", "OK"])[0] == pytest.approx(1.0)
    assert m.roc_auc([0.1, 0.9], ["NG", "OK"])[0] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("max_escape", "threshold", "escapes", "overkills"),
    [
        (0.0, 0.2, 0, 1),  # keep every NG: reject down to the lowest NG score; the OK at 0.7 goes too
        (0.34, 0.6, 1, 1),  # one NG of three may pass
        (1 / 3, 0.6, 1, 1),  # exactly one third: float rounding must not drop the allowance
        (0.67, 0.9, 2, 0),
    ],
)
def test_threshold_for_max_escape(max_escape, threshold, escapes, overkills):
    choice = m.threshold_for_max_escape(P_NG, LABELS, max_escape)
    assert choice.threshold == pytest.approx(threshold)
    assert choice.escape_rate.k == escapes
    assert choice.escape_rate.value <= max_escape + 1e-12
    assert choice.overkill_rate.k == overkills
    # It is the highest such threshold: one step above lets another NG through.
    above = m.confusion(LABELS, m.verdicts(P_NG, threshold + 1e-9))
    assert above.fn > escapes


def test_threshold_when_every_ng_may_escape_passes_everything():
    choice = m.threshold_for_max_escape(P_NG, LABELS, 1.0)
    assert choice.threshold > max(P_NG)
    assert choice.escape_rate.value == 1.0
    assert choice.overkill_rate.value == 0.0


def test_threshold_with_tied_ng_scores():
    # Both NG at 0.4: a threshold above 0.4 loses both at once, so even 50% allowed means 0.4.
    choice = m.threshold_for_max_escape([0.4, 0.4, 0.5], ["NG", "NG", "OK"], 0.5)
    assert choice.threshold == pytest.approx(0.4)
    assert choice.escape_rate.k == 0
    assert choice.overkill_rate.k == 1


def test_threshold_rejects_a_limit_outside_0_1():
    with pytest.raises(ValueError):
        m.threshold_for_max_escape(P_NG, LABELS, 1.5)


def test_score_metrics_block_is_complete_json():
    out = m.score_metrics(P_NG, LABELS, threshold=0.5, max_escape=0.0)
    text = json.dumps(out, allow_nan=False)
    back = json.loads(text)
    assert back["n"] == 5 and back["n_ng"] == 3 and back["n_ok"] == 2
    for key in ("accuracy", "balanced_accuracy", "escape_rate", "overkill_rate"):
        est = back[key]
        assert est["low"] <= est["value"] <= est["high"]
    assert back["auc"]["value"] == pytest.approx(4 / 6)
    assert back["roc"]["thresholds"][0] is None
