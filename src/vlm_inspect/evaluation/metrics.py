"""OK/NG quality metrics from labels and p(NG) scores: pure functions over numpy.

The positive class is NG. Escape (miss) is an NG part passed as OK: FN / NG count.
Overkill is an OK part rejected: FP / OK count. Every proportion carries a 95% Wilson
interval, because inspection sets are small and a bare percentage overstates what we know.
A rate that cannot be measured on the set (no NG images, say) is None with the reason,
never NaN, so results.json stays plain JSON.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vlm_inspect.errors import DataError

LABELS = ("OK", "NG")
Z_95 = 1.959963984540054
# Balanced accuracy averages two proportions; two 97.5% intervals hold together at least 95%
# of the time (Bonferroni), so their combination is an honest 95% interval.
Z_97_5 = 2.241402727604947

NO_NG = "no NG images in the set"
NO_OK = "no OK images in the set"


@dataclass(frozen=True)
class Estimate:
    """A rate with its 95% interval; value, low and high are None when the set cannot measure it."""

    value: float | None
    low: float | None
    high: float | None
    k: int | None = None
    n: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready mapping."""
        return asdict(self)


@dataclass(frozen=True)
class Confusion:
    """Counts with NG as the positive class."""

    tp: int  # NG rejected
    fn: int  # NG passed: an escape
    fp: int  # OK rejected: an overkill
    tn: int  # OK passed

    @property
    def n_ng(self) -> int:
        return self.tp + self.fn

    @property
    def n_ok(self) -> int:
        return self.fp + self.tn

    @property
    def n(self) -> int:
        return self.n_ng + self.n_ok

    def to_dict(self) -> dict:
        """Plain JSON-ready mapping."""
        return asdict(self)


@dataclass(frozen=True)
class RocCurve:
    """ROC points from the strictest threshold to the loosest; `thresholds[0]` is None (reject nothing)."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float | None]


@dataclass(frozen=True)
class ThresholdChoice:
    """The highest p(NG) threshold whose escape rate on the set stays within the limit."""

    max_escape: float
    threshold: float | None
    escape_rate: Estimate
    overkill_rate: Estimate
    reason: str | None = None

    def to_dict(self) -> dict:
        """Plain JSON-ready mapping."""
        return {
            "max_escape": self.max_escape,
            "threshold": self.threshold,
            "escape_rate": self.escape_rate.to_dict(),
            "overkill_rate": self.overkill_rate.to_dict(),
            "reason": self.reason,
        }


def is_ng(labels: Sequence[str]) -> np.ndarray:
    """Boolean array, True for NG; raises DataError on an empty set or a label other than OK/NG."""
    if len(labels) == 0:
        raise DataError("no labelled images to evaluate: the set is empty")
    bad = sorted({str(label) for label in labels if label not in LABELS})
    if bad:
        raise DataError(f"labels must be OK or NG, found {', '.join(map(repr, bad))}")
    return np.array([label == "NG" for label in labels], dtype=bool)


def _scores(p_ng: Sequence[float], n: int) -> np.ndarray:
    scores = np.asarray(p_ng, dtype=float)
    if scores.shape != (n,):
        raise DataError(f"got {scores.size} scores for {n} labels")
    if not np.all(np.isfinite(scores)):
        raise DataError("p(NG) scores must be finite numbers")
    return scores


def confusion(labels: Sequence[str], predicted: Sequence[str]) -> Confusion:
    """Confusion counts of predicted verdicts against true labels (both "OK"/"NG")."""
    truth = is_ng(labels)
    guess = is_ng(predicted)
    if guess.shape != truth.shape:
        raise DataError(f"got {guess.size} predictions for {truth.size} labels")
    return Confusion(
        tp=int(np.sum(truth & guess)),
        fn=int(np.sum(truth & ~guess)),
        fp=int(np.sum(~truth & guess)),
        tn=int(np.sum(~truth & ~guess)),
    )


def verdicts(p_ng: Sequence[float], threshold: float) -> list[str]:
    """NG where p(NG) is at or above the threshold, else OK."""
    return ["NG" if p >= threshold else "OK" for p in p_ng]


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (default 95%).

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0/n:
    0 of 10 gives an upper bound of about 0.28.
    """
    if n <= 0:
        raise ValueError("the Wilson interval needs at least one trial")
    if not 0 <= k <= n:
        raise ValueError(f"successes ({k}) must lie between 0 and trials ({n})")
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Clamp float noise at the ends (0/n must give exactly 0 as its lower bound).
    return max(0.0, centre - half) if k else 0.0, min(1.0, centre + half) if k < n else 1.0


def proportion(k: int, n: int, reason_if_empty: str) -> Estimate:
    """k/n with its 95% Wilson interval, or an undefined Estimate carrying the reason when n is 0."""
    if n == 0:
        return Estimate(None, None, None, k=0, n=0, reason=reason_if_empty)
    low, high = wilson_interval(k, n)
    return Estimate(k / n, low, high, k=k, n=n)


def accuracy(c: Confusion) -> Estimate:
    """Share of images judged right."""
    return proportion(c.tp + c.tn, c.n, "no images")


def escape_rate(c: Confusion) -> Estimate:
    """NG passed as OK: FN / NG count."""
    return proportion(c.fn, c.n_ng, NO_NG)


def overkill_rate(c: Confusion) -> Estimate:
    """OK rejected as NG: FP / OK count."""
    return proportion(c.fp, c.n_ok, NO_OK)


def balanced_accuracy(c: Confusion) -> Estimate:
    """Mean of the NG hit rate and the OK pass rate, so a model that calls everything NG scores 0.5.

    The interval combines 97.5% Wilson intervals of the two rates (together they hold at least
    95% of the time). Undefined when either class is missing.
    """
    if c.n_ng == 0 or c.n_ok == 0:
        return Estimate(None, None, None, reason=NO_NG if c.n_ng == 0 else NO_OK)
    hit_low, hit_high = wilson_interval(c.tp, c.n_ng, Z_97_5)
    pass_low, pass_high = wilson_interval(c.tn, c.n_ok, Z_97_5)
    value = (c.tp / c.n_ng + c.tn / c.n_ok) / 2
    return Estimate(value, (hit_low + pass_low) / 2, (hit_high + pass_high) / 2)


def roc_curve(p_ng: Sequence[float], labels: Sequence[str]) -> RocCurve:
    """ROC points (false-positive rate = overkill, true-positive rate = 1 - escape) at each distinct score.

    Tied scores move together: one point per distinct score, so ties give a diagonal step.
    A class with no images gives a rate of 0 along its axis.
    """
    truth = is_ng(labels)
    scores = _scores(p_ng, truth.size)
    order = np.argsort(-scores, kind="stable")
    scores, truth = scores[order], truth[order]
    # The last index of each run of equal scores: everything up to it is rejected at that threshold.
    ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])
    tp = np.cumsum(truth)[ends]
    fp = np.cumsum(~truth)[ends]
    n_ng, n_ok = int(truth.sum()), int((~truth).sum())
    tpr = [0.0, *(tp / n_ng if n_ng else np.zeros_like(tp, dtype=float)).tolist()]
    fpr = [0.0, *(fp / n_ok if n_ok else np.zeros_like(fp, dtype=float)).tolist()]
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=[None, *scores[ends].tolist()])


def roc_auc(p_ng: Sequence[float], labels: Sequence[str]) -> tuple[float | None, str | None]:
    """Area under the ROC curve (ties count half), or (None, reason) when a class is missing."""
    truth = is_ng(labels)
    if truth.all():
        return None, f"{NO_OK}: AUC needs both classes"
    if not truth.any():
        return None, f"{NO_NG}: AUC needs both classes"
    curve = roc_curve(p_ng, labels)
    fpr, tpr = np.array(curve.fpr), np.array(curve.tpr)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)), None


def threshold_for_max_escape(p_ng: Sequence[float], labels: Sequence[str], max_escape: float) -> ThresholdChoice:
    """The highest threshold (NG when p >= threshold) whose escape rate on this set is at most `max_escape`.

    A higher threshold rejects fewer OK parts, so this is the least overkill the escape limit allows.
    With no NG images escape cannot be measured and no threshold is chosen.
    """
    if not 0.0 <= max_escape <= 1.0:
        raise ValueError(f"max_escape must lie between 0 and 1, got {max_escape}")
    truth = is_ng(labels)
    scores = _scores(p_ng, truth.size)
    ng_scores, ok_scores = np.sort(scores[truth]), scores[~truth]
    if ng_scores.size == 0:
        reason = f"{NO_NG}: escape cannot be measured, so no threshold can be chosen"
        return ThresholdChoice(max_escape, None, proportion(0, 0, NO_NG), proportion(0, 0, NO_NG), reason)
    # Escapes allowed; the small slack keeps e.g. 0.1 * 30 from rounding down to 2.
    allowed = math.floor(max_escape * ng_scores.size + 1e-9)
    # At threshold = the score of the (allowed+1)-th lowest NG image, exactly the NG images scoring
    # strictly below it escape: at most `allowed`. Any higher threshold lets one more through.
    if allowed < ng_scores.size:
        threshold = float(ng_scores[allowed])
    else:
        # Every NG may escape: the threshold just above every score, which passes everything.
        threshold = float(np.nextafter(scores.max(), np.inf))
    escapes = int(np.sum(ng_scores < threshold))
    overkills = int(np.sum(ok_scores >= threshold))
    return ThresholdChoice(
        max_escape=max_escape,
        threshold=threshold,
        escape_rate=proportion(escapes, int(ng_scores.size), NO_NG),
        overkill_rate=proportion(overkills, int(ok_scores.size), NO_OK),
    )


def score_metrics(p_ng: Sequence[float], labels: Sequence[str], threshold: float, max_escape: float) -> dict:
    """Every metric of one model on one question, as the JSON block results.json stores.

    Args:
        p_ng: p(NG) per image.
        labels: true "OK"/"NG" per image, same order.
        threshold: p(NG) at or above which an image is called NG.
        max_escape: escape-rate limit for the suggested threshold.

    Returns:
        Mapping with n, n_ok, n_ng, threshold, confusion, accuracy, balanced_accuracy,
        escape_rate, overkill_rate (each {value, low, high, k, n, reason}), auc {value, reason},
        roc {fpr, tpr, thresholds} and max_escape_threshold.

    Raises:
        DataError: the set is empty, a label is not OK/NG, or scores and labels differ in length.
    """
    truth = is_ng(labels)
    scores = _scores(p_ng, truth.size)
    c = confusion(labels, verdicts(scores.tolist(), threshold))
    auc, auc_reason = roc_auc(scores, labels)
    curve = roc_curve(scores, labels)
    return {
        "n": c.n,
        "n_ok": c.n_ok,
        "n_ng": c.n_ng,
        "threshold": threshold,
        "confusion": c.to_dict(),
        "accuracy": accuracy(c).to_dict(),
        "balanced_accuracy": balanced_accuracy(c).to_dict(),
        "escape_rate": escape_rate(c).to_dict(),
        "overkill_rate": overkill_rate(c).to_dict(),
        "auc": {"value": auc, "reason": auc_reason},
        "roc": {"fpr": curve.fpr, "tpr": curve.tpr, "thresholds": curve.thresholds},
        "max_escape_threshold": threshold_for_max_escape(scores, labels, max_escape).to_dict(),
    }
