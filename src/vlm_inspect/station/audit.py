"""The random audit sample, and the line's measured quality from the operators' reviews of it.

Every inspection gets `audit_u`, a number in [0, 1) that a fixed hash (splitmix64) makes of its id
when it is recorded: it has nothing to do with the photo, the model or its score. The audit sample
of rate r and seed s is the inspections whose u lies in [o, o + r) (wrapping at 1), o = frac(s·φ):
a seeded random share r of every line, model, hour and score. Raising r keeps every record already
in the sample; another seed draws another sample. The audit queue shows the sample's unreviewed
records in the order of their u, so whichever part of the sample gets reviewed is random too.

Only reviews of the sample measure the line: the least-sure and disagreement queues pick records by
their score, and estimates from them would be biased. From the reviewed sample (operator = truth):

- escape rate: NG parts the model passed, of NG parts (FN / NG), as `evaluate` reports it;
- overkill rate: OK parts the model rejected, of OK parts (FP / OK);
- outgoing NG share: NG parts among those the model passed (FN / passed), which times the parts
  passed in the period estimates the NG parts that left the line;

each with its 95% Wilson interval (evaluate/metrics.py), and the number of reviews that would bound
the escape and overkill rates under a target at the rate observed so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, and_, case, or_

from vlm_inspect.evaluation.metrics import Confusion, Estimate, proportion, wilson_interval

_MASK = (1 << 64) - 1
_GOLDEN = (math.sqrt(5) - 1) / 2
MAX_SAMPLE = 10_000_000
"""Largest sample size `reviews_needed` looks for; beyond it the answer is 'more than that'."""


def audit_u(inspection_id: int) -> float:
    """The inspection's place in [0, 1) for audit sampling: splitmix64 of its id, top 53 bits."""
    z = (inspection_id + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


@dataclass(frozen=True)
class AuditSample:
    """A share `rate` of all inspections, chosen by `seed`."""

    rate: float = 0.02
    seed: int = 0

    @property
    def offset(self) -> float:
        return (self.seed * _GOLDEN) % 1.0

    def contains(self, u: float) -> bool:
        return (u - self.offset) % 1.0 < self.rate

    def condition(self, u: ColumnElement) -> ColumnElement:
        """SQL: u lies in the sample (one or two ranges, so an index on u serves it)."""
        lo, hi = self.offset, self.offset + self.rate
        if hi <= 1.0:
            return and_(u >= lo, u < hi)
        return or_(u >= lo, u < hi - 1.0)

    def order(self, u: ColumnElement) -> ColumnElement:
        """SQL: the sample's random order, (u − offset) mod 1."""
        return case((u >= self.offset, u - self.offset), else_=u - self.offset + 1.0)


def problems(rate: float, escape_target: float, overkill_target: float) -> list[str]:
    """What is wrong with the audit settings."""
    out = []
    if not 0.0 < rate <= 1.0:
        out.append(f"audit_rate: {rate} is not above 0 and at most 1")
    for name, value in (("audit_escape_target", escape_target), ("audit_overkill_target", overkill_target)):
        if not 0.0 < value < 1.0:
            out.append(f"{name}: {value} is not between 0 and 1")
    return out


# ---------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Needed:
    """Reviews that would bound a rate under a target: of the class (NG or OK parts) and of audited parts."""

    target: float
    of_class: int | None
    of_audit: int | None
    more: int | None
    reason: str | None = None


@dataclass(frozen=True)
class Quality:
    """The line's quality in one group (a model in a period) as its reviewed audit sample shows it."""

    inspected: int
    passed: int
    sampled: int
    reviewed: int
    confusion: Confusion
    escape: Estimate
    overkill: Estimate
    outgoing: Estimate
    escaped: tuple[float, float, float] | None
    """Estimated NG parts passed in the group (value, low, high): outgoing share × parts passed."""
    needed: dict[str, Needed] = field(default_factory=dict)


def line_quality(
    pairs: Iterable[tuple[str, str | None]],
    inspected: int,
    passed: int,
    escape_target: float,
    overkill_target: float,
) -> Quality:
    """Estimates from the sample's (model verdict, operator verdict or None when unreviewed) pairs.

    Args:
        pairs: one per inspection of the sample in the group.
        inspected: inspections in the group (all of them, not only the sample).
        passed: of them, those the model passed (OK).
        escape_target: the escape rate to bound (95% upper bound at most this).
        overkill_target: the overkill rate to bound.
    """
    pairs = list(pairs)
    reviewed = [(model, truth) for model, truth in pairs if truth is not None]
    c = Confusion(
        tp=sum(1 for m, t in reviewed if m == "NG" and t == "NG"),
        fn=sum(1 for m, t in reviewed if m == "OK" and t == "NG"),
        fp=sum(1 for m, t in reviewed if m == "NG" and t == "OK"),
        tn=sum(1 for m, t in reviewed if m == "OK" and t == "OK"),
    )
    outgoing = proportion(c.fn, c.fn + c.tn, "no reviewed part the model passed")
    escaped = None
    if outgoing.value is not None:
        escaped = (outgoing.value * passed, outgoing.low * passed, outgoing.high * passed)
    escape = proportion(c.fn, c.n_ng, "no NG part among the reviewed audit sample")
    overkill = proportion(c.fp, c.n_ok, "no OK part among the reviewed audit sample")
    needed = {
        "escape": reviews_needed(escape, escape_target, c.n_ng, c.n),
        "overkill": reviews_needed(overkill, overkill_target, c.n_ok, c.n),
    }
    return Quality(inspected, passed, len(pairs), len(reviewed), c, escape, overkill, outgoing, escaped, needed)


def reviews_needed(rate: Estimate, target: float, have_class: int, have_all: int) -> Needed:
    """How many parts of the class must be reviewed for the 95% upper bound to reach `target`,
    at the rate seen so far (0 if none seen), and how many audited parts that takes at the class's share."""
    observed = rate.value or 0.0
    if observed >= target:
        reason = f"the rate seen so far ({observed:.2%}) is not below the target ({target:.2%})"
        return Needed(target, None, None, None, reason)
    n = smallest_n(observed, target)
    if n is None:
        return Needed(target, None, None, None, f"more than {MAX_SAMPLE:,} reviews")
    more = max(0, n - have_class)
    if have_class == 0 or have_all == 0:
        return Needed(target, n, None, more, "no part of this class reviewed yet: its share is unknown")
    return Needed(target, n, math.ceil(n * have_all / have_class), more)


def smallest_n(rate: float, target: float) -> int | None:
    """The smallest n whose 95% Wilson upper bound at k = round(rate·n) is at most `target`."""

    def bounded(n: int) -> bool:
        return wilson_interval(round(rate * n), n)[1] <= target

    hi = 1
    while not bounded(hi):
        hi *= 2
        if hi > MAX_SAMPLE:
            return None
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if bounded(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi
