"""The p-chart of a line's NG rate: 3σ binomial control limits and the Western Electric run rules.

Each subgroup is one period (an hour, a shift or a day) with n inspections of which k were NG.
The centre line is p̄ = Σk / Σn over the charted periods (trial limits, as a plant sets up a chart
from its own history); each point has its own limits p̄ ± 3·sqrt(p̄(1 − p̄)/n), clipped to [0, 1],
so a short shift has wider ones. The run rules read each point as z = (p − p̄) / σ(n):

1. one point beyond 3σ;
2. two of three points in a row beyond 2σ on the same side;
3. four of five points in a row beyond 1σ on the same side;
4. eight points in a row on the same side of the centre line.

A rule's points are those that make up a breaking run (for rules 2 and 3, the ones beyond the band).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

RULES = {
    1: "one point beyond 3σ",
    2: "2 of 3 in a row beyond 2σ, same side",
    3: "4 of 5 in a row beyond 1σ, same side",
    4: "8 in a row on one side of the centre",
}


@dataclass(frozen=True)
class ChartPoint:
    """One period on the chart: its NG share, limits, z and the rules it breaks."""

    label: str
    n: int
    ng: int
    p: float
    lcl: float
    ucl: float
    z: float | None
    """(p − p̄)/σ(n); None when σ is 0 (p̄ is 0 or 1: nothing can be out of control)."""
    rules: tuple[int, ...] = ()


@dataclass(frozen=True)
class RuleBreak:
    """Which points broke one run rule."""

    rule: int
    name: str
    points: tuple[str, ...]


@dataclass(frozen=True)
class PChart:
    """A p-chart: centre line, points (periods with at least one inspection) and the rules broken."""

    center: float | None
    points: list[ChartPoint]
    breaks: list[RuleBreak]


def binomial_limits(center: float, n: int, sigmas: float = 3.0) -> tuple[float, float]:
    """Lower and upper control limits of a share from n parts around `center`, clipped to [0, 1]."""
    half = sigmas * math.sqrt(center * (1.0 - center) / n)
    return max(0.0, center - half), min(1.0, center + half)


def p_chart(labels: Sequence[str], n: Sequence[int], ng: Sequence[int]) -> PChart:
    """The chart of periods given in time order; periods with n = 0 are left out."""
    rows = [(label, total, bad) for label, total, bad in zip(labels, n, ng, strict=True) if total > 0]
    if not rows:
        return PChart(None, [], [])
    center = sum(bad for _, _, bad in rows) / sum(total for _, total, _ in rows)
    zs = [_z(bad / total, center, total) for _, total, bad in rows]
    flagged = run_rules(zs)
    points = []
    for i, ((label, total, bad), z) in enumerate(zip(rows, zs, strict=True)):
        lcl, ucl = binomial_limits(center, total)
        rules = tuple(rule for rule, hits in flagged.items() if i in hits)
        points.append(ChartPoint(label, total, bad, bad / total, lcl, ucl, z, rules))
    breaks = [
        RuleBreak(rule, RULES[rule], tuple(rows[i][0] for i in sorted(hits))) for rule, hits in flagged.items() if hits
    ]
    return PChart(center, points, breaks)


def _z(p: float, center: float, n: int) -> float | None:
    sigma = math.sqrt(center * (1.0 - center) / n)
    return None if sigma == 0 else (p - center) / sigma


def run_rules(zs: Sequence[float | None]) -> dict[int, set[int]]:
    """For each Western Electric rule, the indices of the points that broke it."""
    return {
        1: {i for i, z in enumerate(zs) if z is not None and abs(z) > 3},
        2: _k_of_m(zs, 2, 3, 2.0),
        3: _k_of_m(zs, 4, 5, 1.0),
        4: _same_side_runs(zs, 8),
    }


def _k_of_m(zs: Sequence[float | None], k: int, m: int, band: float) -> set[int]:
    """Points beyond `band` σ in any window of m points in a row that holds k or more of them on one side."""
    hits: set[int] = set()
    for start in range(len(zs) - m + 1):
        window = range(start, start + m)
        for side in (1, -1):
            beyond = [i for i in window if zs[i] is not None and side * zs[i] > band]
            if len(beyond) >= k:
                hits.update(beyond)
    return hits


def _same_side_runs(zs: Sequence[float | None], length: int) -> set[int]:
    """Points in runs of `length` or more in a row strictly on one side of the centre."""
    hits: set[int] = set()
    run: list[int] = []
    side = 0
    for i, z in enumerate(zs):
        here = 0 if z is None or z == 0 else (1 if z > 0 else -1)
        if here != 0 and here == side:
            run.append(i)
        else:
            run, side = ([i] if here else []), here
        if len(run) >= length:
            hits.update(run)
    return hits
