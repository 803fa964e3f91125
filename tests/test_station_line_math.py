"""The line view's arithmetic against hand-computed values: periods, p-chart limits and run rules,
the audit sample and its estimates, PSI and the drift judgement. No store, no server.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from vlm_inspect.station import audit, drift, periods, spc
from vlm_inspect.station.metrics import latency_percentiles

BERLIN = periods.plant_zone("Europe/Berlin")
SHIFTS = [6, 14, 22]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


# ---------------------------------------------------------------- periods


@pytest.mark.parametrize(
    ("moment", "period", "label"),
    [
        (utc(2026, 12, 3, 4, 30), "shift", "2026-12-02 C 22–06"),  # 05:30 CET: still last night's shift
        (utc(2026, 12, 3, 13, 0), "shift", "2026-12-03 B 14–22"),  # 14:00 CET
        (utc(2026, 12, 3, 21, 15), "shift", "2026-12-03 C 22–06"),  # 22:15 CET
        (utc(2026, 7, 1, 4, 30), "shift", "2026-07-01 A 06–14"),  # 06:30 CEST (summer time)
        (utc(2026, 12, 3, 13, 59), "hour", "2026-12-03 14:00"),
        (utc(2026, 12, 3, 23, 30), "day", "2026-12-04"),  # 00:30 CET next day
    ],
)
def test_periods_are_local_hours_shifts_and_days(moment, period, label):
    assert periods.period_of(moment, period, BERLIN, SHIFTS).label == label


def test_a_quarter_hour_zone_and_a_single_shift():
    kathmandu = periods.plant_zone("Asia/Kathmandu")  # UTC+5:45
    assert periods.period_of(utc(2026, 12, 3, 0, 15), "shift", kathmandu, SHIFTS).label == "2026-12-03 A 06–14"
    assert periods.period_of(utc(2026, 12, 3, 0, 0), "shift", kathmandu, SHIFTS).label == "2026-12-02 C 22–06"
    one = periods.period_of(utc(2026, 12, 3, 3, 0), "shift", timezone.utc, [7])
    assert one.label == "2026-12-02 day 07–07" and one.start == utc(2026, 12, 2, 7)


def test_period_settings_problems():
    assert periods.shift_problems([6, 14, 22]) == []
    assert "at least one" in periods.shift_problems([])[0]
    assert periods.shift_problems([6, 25, 6]) == [
        "shift_hours: 25 is not an hour from 0 to 23",
        "shift_hours: [6, 25, 6] names an hour twice",
    ]
    assert "Mars/Base" in periods.zone_problems("Mars/Base")[0] and periods.zone_problems(None) == []


# ---------------------------------------------------------------- p-chart


def test_p_chart_limits_and_rule_1_by_hand():
    labels = [f"s{i}" for i in range(10)]
    chart = spc.p_chart(labels, [100] * 10, [5, 4, 6, 5, 5, 4, 6, 5, 5, 15])
    assert chart.center == pytest.approx(0.06)  # 60 / 1000
    sigma = math.sqrt(0.06 * 0.94 / 100)  # 0.023749
    last = chart.points[-1]
    assert last.ucl == pytest.approx(0.06 + 3 * sigma) and last.ucl == pytest.approx(0.131246, abs=1e-6)
    assert last.lcl == 0.0  # 0.06 − 0.0712 clipped
    assert last.z == pytest.approx((0.15 - 0.06) / sigma) and last.rules == (1,)
    assert [(b.rule, b.points) for b in chart.breaks] == [(1, ("s9",))]


def test_limits_follow_each_periods_n_and_empty_periods_are_left_out():
    chart = spc.p_chart(["a", "b", "c"], [400, 0, 25], [20, 0, 2])
    assert [p.label for p in chart.points] == ["a", "c"]
    assert chart.center == pytest.approx(22 / 425)
    wide, narrow = chart.points[1].ucl - chart.center, chart.points[0].ucl - chart.center
    assert wide == pytest.approx(narrow * math.sqrt(400 / 25))  # σ ∝ 1/sqrt(n): 4× wider at 25 than at 400


def test_rule_4_eight_in_a_row_on_each_side():
    chart = spc.p_chart([str(i) for i in range(16)], [100] * 16, [7] * 8 + [5] * 8)
    assert chart.center == pytest.approx(0.06)
    assert [(b.rule, len(b.points)) for b in chart.breaks] == [(4, 16)]
    seven = spc.p_chart([str(i) for i in range(7)], [100] * 7, [7] * 7)  # p̄ = 0.07: all on the line
    assert seven.breaks == []


def test_rules_2_and_3_on_z_values():
    assert spc.run_rules([0, 2.5, 0.5, 2.2, 0])[2] == {1, 3}
    assert spc.run_rules([0, 2.5, 0.5, -2.2, 0])[2] == set()  # opposite sides
    assert spc.run_rules([1.5, 1.2, -0.5, 1.1, 1.3])[3] == {0, 1, 3, 4}
    assert spc.run_rules([1.5, 1.2, -0.5, 1.1, 0.3])[3] == set()
    assert spc.run_rules([0.2, -3.5, None])[1] == {1}


def test_a_center_of_zero_has_no_out_of_control_points():
    chart = spc.p_chart(["a", "b"], [50, 50], [0, 0])
    assert chart.center == 0.0 and all(p.z is None and p.rules == () for p in chart.points)


# ---------------------------------------------------------------- audit sample and estimates


def test_audit_u_is_splitmix64_and_uniform():
    assert int(audit.audit_u(0) * 2**53) << 11 == 0xE220A8397B1DCDAF >> 11 << 11  # splitmix64's first output
    us = [audit.audit_u(i) for i in range(1, 50_001)]
    assert abs(sum(us) / len(us) - 0.5) < 0.01
    inside = sum(audit.AuditSample(0.02, 0).contains(u) for u in us)
    assert 900 < inside < 1100  # 2% of 50,000 = 1,000 (±3σ ≈ ±94)


def test_audit_window_wraps_and_seeds_differ():
    sample = audit.AuditSample(0.5, 1)  # offset frac(φ) = 0.618: [0.618, 1) and [0, 0.118)
    assert sample.offset == pytest.approx(0.6180339887)
    assert sample.contains(0.7) and sample.contains(0.05) and not sample.contains(0.3)
    a, b = audit.AuditSample(0.02, 0), audit.AuditSample(0.02, 1)
    assert not any(a.contains(u) and b.contains(u) for u in (audit.audit_u(i) for i in range(1, 20_000)))


def test_line_quality_by_hand():
    pairs = [("OK", "NG")] * 2 + [("NG", "NG")] * 8 + [("NG", "OK")] * 3 + [("OK", "OK")] * 87 + [("OK", None)] * 20
    q = audit.line_quality(pairs, inspected=10_000, passed=9_500, escape_target=0.01, overkill_target=0.05)
    assert (q.sampled, q.reviewed) == (120, 100)
    assert (q.confusion.tp, q.confusion.fn, q.confusion.fp, q.confusion.tn) == (8, 2, 3, 87)
    assert q.escape.value == pytest.approx(0.2)
    assert (q.escape.low, q.escape.high) == (pytest.approx(0.0567, abs=1e-4), pytest.approx(0.5098, abs=1e-4))
    assert q.overkill.value == pytest.approx(3 / 90)
    assert q.outgoing.value == pytest.approx(2 / 89)
    assert q.escaped[0] == pytest.approx(2 / 89 * 9500)  # ≈ 213 NG parts passed
    assert q.escaped[1] == pytest.approx(q.outgoing.low * 9500) and q.escaped[2] == pytest.approx(
        q.outgoing.high * 9500
    )
    escape = q.needed["escape"]
    assert escape.of_class is None and "not below the target" in escape.reason  # 20% seen, 1% wanted


def test_reviews_needed_for_zero_errors_by_hand():
    # 0 escapes in n NG parts bounds the rate at z²/(n + z²): at most 1% from n = 381 (3.8415·99 = 380.3).
    assert audit.smallest_n(0.0, 0.01) == 381
    assert audit.smallest_n(0.0, 0.05) == 73  # 3.8415·19 = 72.99
    pairs = [("NG", "NG")] * 10 + [("OK", "OK")] * 90
    needed = audit.line_quality(pairs, 1000, 900, 0.01, 0.05).needed["escape"]
    assert (needed.of_class, needed.more, needed.of_audit) == (381, 371, 3810)  # NG is 10% of the audit
    unseen = audit.line_quality([("OK", "OK")] * 5, 100, 100, 0.01, 0.05).needed["escape"]
    assert unseen.of_class == 381 and unseen.of_audit is None and "unknown" in unseen.reason


# ---------------------------------------------------------------- drift


def test_bins_shares_and_psi_by_hand():
    assert drift.bin_counts([0.01, 0.5, 0.99, 0.2]) == [1, 0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert drift.shares([0, 2]) == pytest.approx([1e-4 / 1.0001, 1 / 1.0001])
    # 0.4·ln(0.9/0.5) + (−0.4)·ln(0.1/0.5) = 0.4·(0.5878 + 1.6094)
    assert drift.psi([0.9, 0.1], [0.5, 0.5]) == pytest.approx(0.878890, abs=1e-6)
    assert drift.psi([0.3, 0.7], [0.3, 0.7]) == 0.0


def test_mixed_share_is_the_adjusted_count():
    ok = [0.9] * 5 + [0.1] * 95  # fpr 0.05
    ng = [0.9] * 45 + [0.1] * 5  # tpr 0.9
    assert drift.mixed_share(0.1375, ok, ng, 0.5) == pytest.approx((0.1375 - 0.05) / 0.85)
    assert drift.mixed_share(0.01, ok, ng, 0.5) == 0.0  # clipped
    assert drift.mixed_share(0.3, [0.9] * 10, [0.9] * 10, 0.5) == 0.3  # no separation: the verdict share


def _window(scores, threshold=0.5):
    return [(p, "NG" if p >= threshold else "OK", threshold) for p in scores]


def test_judge_collects_then_compares():
    settings = drift.DriftSettings(window=100)
    base = [0.05 + 0.002 * (i % 50) for i in range(100)]  # 0.05–0.148
    reference = drift.Reference("station", "m", "first 100", tuple(base), None, 0.5)
    early = drift.judge(_window(base[:40]), reference, reference, settings)
    assert early.status == "collecting" and early.reasons == ["40 of 100 inspections"]
    same = drift.judge(_window(base), reference, reference, settings)
    assert same.status == "ok" and same.psi == pytest.approx(0.0) and same.reasons == []
    brighter = drift.judge(_window([p / 4 for p in base]), reference, reference, settings)
    assert brighter.status == "alarm" and brighter.psi > 0.25 and "PSI" in brighter.reasons[0]


def test_ng_rate_beyond_the_baselines_limits_is_an_alarm():
    settings = drift.DriftSettings(window=500, psi_alarm=99, psi_warn=98)  # PSI out of the way
    baseline = drift.Reference("station", "m", "first 500", tuple([0.9] * 25 + [0.1] * 475), None, 0.5)
    assert baseline.ng_rate == pytest.approx(0.05)
    judged = drift.judge(_window([0.9] * 60 + [0.1] * 440), baseline, baseline, settings)
    lo, hi = judged.ng_limits  # 0.05 ± 3·sqrt(0.05·0.95/500) = 0.05 ± 0.02924
    assert (lo, hi) == (pytest.approx(0.02076, abs=1e-5), pytest.approx(0.07924, abs=1e-5))
    assert judged.status == "alarm" and "NG rate 12.0% above the 3σ limit 7.9%" in judged.reasons[0]
    clean = drift.Reference("station", "m", "first 500", tuple([0.1] * 500), None, 0.5)
    assert clean.ng_rate == pytest.approx(0.5 / 500)  # a clean baseline counts as half an NG part


def test_an_evaluation_reference_is_mixed_to_the_lines_share():
    ok, ng = [0.02] * 90 + [0.2] * 10, [0.95] * 45 + [0.6] * 5
    reference = drift.Reference("evaluate", "m", "results.json", tuple(ok + ng), tuple(["OK"] * 100 + ["NG"] * 50), 0.5)
    line = [0.02] * 882 + [0.2] * 98 + [0.95] * 18 + [0.6] * 2  # the same classes, 2% NG
    judged = drift.judge(_window(line), reference, None, drift.DriftSettings(window=1000))
    assert judged.mixed_ng_share == pytest.approx(0.02) and judged.psi < 0.02 and judged.status == "ok"
    assert judged.ng_limits is None  # no station baseline: no NG-rate check


def test_latency_percentiles_interpolate_inside_buckets():
    buckets = [0] * 13
    buckets[3], buckets[4] = 50, 50  # 50 in (50, 100] ms, 50 in (100, 250] ms
    got = latency_percentiles(buckets)
    assert got["p50_ms"] == 100.0 and got["p95_ms"] == pytest.approx(235.0) and got["n"] == 100
    assert latency_percentiles([0] * 13)["p50_ms"] is None
