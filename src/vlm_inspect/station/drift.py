"""Drift: is a line's recent p(NG) distribution still the one its model was judged on?

A model's reference distribution is one of two (baselines.py keeps them per model hash):

- `station`: the p(NG) of the first `baseline_n` inspections the station recorded under the model
  (the default; the same line, lighting and parts, so directly comparable);
- `evaluate`: the tuned model's p(NG) on the OK and on the NG photos of an `evaluate` report
  (`serve --baseline REPORT`). An evaluation set is not the line's mix (it holds far more NG
  parts), so the reference is the two class distributions mixed in the NG share π the line shows
  now: π = (v − fpr) / (tpr − fpr), with v the window's NG-verdict share and fpr, tpr the
  evaluation's rates at the window's threshold (the adjusted count; v itself when the model
  separates the classes by less than 0.05). A change in the mix alone then moves nothing; a
  change in how the model sees OK or NG parts does.

The recent window of a line and model is its last `drift_window` inspections. It is compared with
the reference by the population stability index over ten bins of p(NG) that are equal on the
logit scale (edges σ(−4) … σ(4): 0.018, 0.047, 0.12, 0.27, 0.5, …), so the mass a sure model puts
near 0 and 1 is resolved too; an empty bin counts as a share of 0.0001, so it costs a finite amount.
PSI = Σ (a − e) ln(a / e): under 0.1 is read as stable, 0.1–0.25 as a moderate shift, above as a
large one (the usual reading; `drift_psi_warn`, `drift_psi_alarm`). Once the station baseline is
complete, the window's NG-verdict share is also held against its share within `drift_ng_sigma` binomial σ
(the baseline's share counted as at least 0.5 NG parts, so a clean baseline does not turn one NG
part into an alarm).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlm_inspect.station.spc import binomial_limits

EDGES = tuple(1.0 / (1.0 + math.exp(-k)) for k in range(-4, 5))
"""Inner bin edges of p(NG): equal steps of 1 on the logit scale, ten bins in all."""
EMPTY_SHARE = 1e-4
MIN_SEPARATION = 0.05
STATUSES = ("collecting", "ok", "warn", "alarm")


def bin_counts(scores: Sequence[float]) -> list[int]:
    """How many scores fall in each of the ten p(NG) bins."""
    counts = [0] * (len(EDGES) + 1)
    for s in scores:
        counts[bisect.bisect_right(EDGES, s)] += 1
    return counts


def shares(counts: Sequence[int]) -> list[float]:
    """Bin shares, an empty bin counted as a share of 0.0001 (so the PSI stays finite), summing to 1."""
    total = sum(counts) or 1
    floored = [max(c / total, EMPTY_SHARE) for c in counts]
    return [f / sum(floored) for f in floored]


def psi(actual: Sequence[float], expected: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (shares, none 0)."""
    return sum((a - e) * math.log(a / e) for a, e in zip(actual, expected, strict=True))


@dataclass(frozen=True)
class Reference:
    """A model's reference p(NG) distribution: station scores, or evaluation scores with their labels."""

    kind: str
    name: str
    source: str
    scores: tuple[float, ...]
    labels: tuple[str, ...] | None = None
    threshold: float | None = None

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def ng_rate(self) -> float | None:
        """The station baseline's NG-verdict share, at least 0.5/n (None for an evaluation set: not the line's mix).

        A baseline without one NG part would otherwise make a single NG part an alarm.
        """
        if self.kind != "station" or not self.scores or self.threshold is None:
            return None
        return max(0.5, sum(1 for s in self.scores if s >= self.threshold)) / len(self.scores)

    def expected(self, ng_share: float, threshold: float) -> tuple[list[float], float | None]:
        """The bin shares the window should show, and π (the NG share mixed in; None for a station baseline)."""
        if self.labels is None:
            return shares(bin_counts(self.scores)), None
        ok = [s for s, label in zip(self.scores, self.labels, strict=True) if label == "OK"]
        ng = [s for s, label in zip(self.scores, self.labels, strict=True) if label == "NG"]
        pi = mixed_share(ng_share, ok, ng, threshold)
        ok_shares, ng_shares = shares(bin_counts(ok)), shares(bin_counts(ng))
        return [(1 - pi) * o + pi * g for o, g in zip(ok_shares, ng_shares, strict=True)], pi


def mixed_share(ng_share: float, ok: Sequence[float], ng: Sequence[float], threshold: float) -> float:
    """π = (v − fpr) / (tpr − fpr) clipped to [0, 1]; v when the classes are not separated at the threshold."""
    fpr = sum(1 for s in ok if s >= threshold) / len(ok) if ok else 0.0
    tpr = sum(1 for s in ng if s >= threshold) / len(ng) if ng else 1.0
    if tpr - fpr < MIN_SEPARATION:
        return ng_share
    return min(1.0, max(0.0, (ng_share - fpr) / (tpr - fpr)))


@dataclass(frozen=True)
class DriftSettings:
    window: int = 500
    psi_warn: float = 0.1
    psi_alarm: float = 0.25
    ng_sigma: float = 3.0


@dataclass
class Judgement:
    """One line and model: the window against the reference."""

    status: str
    n: int
    psi: float | None = None
    ng_rate: float | None = None
    ng_limits: tuple[float, float] | None = None
    mixed_ng_share: float | None = None
    recent: list[int] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def judge(
    window: Sequence[tuple[float, str | None, float | None]],
    reference: Reference | None,
    ng_baseline: Reference | None,
    settings: DriftSettings,
) -> Judgement:
    """Compare a window of (p(NG), verdict, threshold) with the reference distribution.

    Args:
        window: the line's latest inspections under the model (at most settings.window).
        reference: the distribution to compare with (evaluate or station), or None while there is none.
        ng_baseline: the complete station baseline, for the NG-rate check, or None.
        settings: window size and thresholds.
    """
    scores = [p for p, _, _ in window]
    recent = bin_counts(scores)
    if len(window) < settings.window or reference is None:
        waiting = f"{len(window)} of {settings.window} inspections" if len(window) < settings.window else ""
        reason = waiting or "no reference distribution yet"
        return Judgement("collecting", len(window), recent=recent, reasons=[reason])
    ng_share = sum(1 for _, verdict, _ in window if verdict == "NG") / len(window)
    thresholds = [t for _, _, t in window if t is not None]
    threshold = statistics.median(thresholds) if thresholds else 0.5
    expected, pi = reference.expected(ng_share, threshold)
    value = psi(shares(recent), expected)
    out = Judgement("ok", len(window), value, ng_share, None, pi, recent, expected)
    if value >= settings.psi_alarm:
        out.reasons.append(f"PSI {value:.2f} ≥ {settings.psi_alarm:g}: the p(NG) distribution moved")
    elif value >= settings.psi_warn:
        out.reasons.append(f"PSI {value:.2f} ≥ {settings.psi_warn:g}: the p(NG) distribution is shifting")
    _check_ng_rate(out, ng_baseline, settings)
    alarm = value >= settings.psi_alarm or out.ng_limits is not None and not _within(ng_share, out.ng_limits)
    out.status = "alarm" if alarm else "warn" if value >= settings.psi_warn else "ok"
    return out


def _check_ng_rate(out: Judgement, baseline: Reference | None, settings: DriftSettings) -> None:
    base = baseline.ng_rate if baseline is not None else None
    if base is None:
        return
    out.ng_limits = binomial_limits(base, out.n, settings.ng_sigma)
    lo, hi = out.ng_limits
    if out.ng_rate > hi:
        out.reasons.append(
            f"NG rate {out.ng_rate:.1%} above the {settings.ng_sigma:g}σ limit {hi:.1%} (baseline {base:.1%})"
        )
    elif out.ng_rate < lo:
        out.reasons.append(
            f"NG rate {out.ng_rate:.1%} below the {settings.ng_sigma:g}σ limit {lo:.1%} (baseline {base:.1%})"
        )


def _within(value: float, limits: tuple[float, float]) -> bool:
    return limits[0] <= value <= limits[1]
