"""The quality engineer's line view: per line and model, the NG rate per period as a p-chart, latency,
the recent p(NG) against the model's reference, and the line's quality measured from the audit sample.

One page view runs two queries over the chosen days (NG counts and latency per 15-minute slot; the
audit sample with its latest reviews) and one drift window per line and model; everything else is
folded in Python. Periods are local hours, shifts or days (periods.py).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from sqlalchemy import BigInteger, Integer, case, cast, extract, func, select
from sqlalchemy.orm import aliased

from vlm_inspect.errors import StationError
from vlm_inspect.station import charts
from vlm_inspect.station.audit import Quality, line_quality
from vlm_inspect.station.line_settings import LineSettings
from vlm_inspect.station.metrics import LATENCY_BUCKETS_S, latency_percentiles
from vlm_inspect.station.monitor import health_row, judge_pair
from vlm_inspect.station.periods import PERIODS, SLOT_S, Period, day_problems, period_of, slot_moment
from vlm_inspect.station.schema import Inspection, Review
from vlm_inspect.station.spc import p_chart
from vlm_inspect.station.store import StationStore

MAX_POINTS = 1500
MAX_DAYS = 400
_PER_DAY = {"hour": 24, "day": 1}


@dataclass(frozen=True)
class LineQuery:
    """What one line view shows: local days since … until (inclusive), the period, one line or model or all."""

    since: date
    until: date
    period: str = "shift"
    line: str | None = None
    model: str | None = None

    def problems(self, shifts_per_day: int) -> list[str]:
        problems = [] if self.period in PERIODS else [f"period: {self.period!r} is not one of {', '.join(PERIODS)}"]
        dated = day_problems(since=self.since, until=self.until)
        if dated:
            return problems + dated
        days = (self.until - self.since).days + 1
        if days < 1:
            problems.append(f"until: {self.until} is before since: {self.since}")
        elif days > MAX_DAYS:
            problems.append(f"since, until: {days} days; the line view shows at most {MAX_DAYS}")
        elif self.period in PERIODS and days * _PER_DAY.get(self.period, shifts_per_day) > MAX_POINTS:
            problems.append(
                f"period: {self.period} over {days} days makes more than {MAX_POINTS} points; choose a longer period"
            )
        return problems


@dataclass
class _Group:
    line: str
    model: str
    model_hash: str
    periods: dict[datetime, list[Any]]  # start -> [label, n, ng, latency sum, latency count, latency max]
    latency: list[int]  # inspections per latency bucket (LATENCY_BUCKETS_S, then the open one)


def line_view(store: StationStore, q: LineQuery, settings: LineSettings) -> dict[str, Any]:
    """Everything the line page shows, with its charts as SVG text.

    Raises:
        StationError: the query is unusable (every problem listed) or the store cannot be read.
    """
    problems = q.problems(len(settings.shift_hours))
    if problems:
        raise StationError("line view: " + "; ".join(problems))
    zone = settings.zone
    since = datetime.combine(q.since, time(), zone).astimezone(timezone.utc)
    until = datetime.combine(q.until + timedelta(days=1), time(), zone).astimezone(timezone.utc)
    groups = _groups(store, q, settings, since, until)
    return {
        "since": q.since.isoformat(),
        "until": q.until.isoformat(),
        "period": q.period,
        "timezone": str(zone),
        "shift_hours": list(settings.shift_hours),
        "groups": [_group_view(store, g, settings, q.period) for g in groups],
        "audit": _audit_view(store, q, settings, groups, since, until),
    }


# ---------------------------------------------------------------- queries


def _filters(q: LineQuery, since: datetime, until: datetime) -> list[Any]:
    conditions = [Inspection.created_at >= since, Inspection.created_at < until, Inspection.verdict.is_not(None)]
    if q.line:
        conditions.append(Inspection.line == q.line)
    if q.model:
        conditions.append(Inspection.model_name == q.model)
    return conditions


def _slot(dialect: str) -> Any:
    """The 15-minute UTC slot of an inspection's time, in SQL (seconds since 1970 // 900)."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", Inspection.created_at), Integer) // SLOT_S
    return cast(func.floor(extract("epoch", Inspection.created_at) / SLOT_S), BigInteger)


def _groups(store: StationStore, q: LineQuery, s: LineSettings, since: datetime, until: datetime) -> list[_Group]:
    """One scan: per line, model and 15-minute slot, inspections, NG, latency sum/count/max and cumulative
    latency counts per bucket (as Prometheus's `le`), folded into the query's periods."""
    slot = _slot(store.engine.dialect.name).label("slot")
    ng = func.sum(case((Inspection.verdict == "NG", 1), else_=0))
    at_most = [func.sum(case((Inspection.latency_ms <= b * 1000, 1), else_=0)) for b in LATENCY_BUCKETS_S]
    keys = (Inspection.line, Inspection.model_name, Inspection.model_hash)
    latency = (func.sum(Inspection.latency_ms), func.count(Inspection.latency_ms), func.max(Inspection.latency_ms))
    query = (
        select(*keys, slot, func.count(), ng, *latency, *at_most)
        .where(*_filters(q, since, until))
        .group_by(*keys, slot)
    )
    with store.reading() as session:
        rows = session.execute(query).all()
    fold = _PeriodCache(q.period, s)
    found: dict[tuple, _Group] = {}
    for line, name, model_hash, number, n, bad, lat_sum, lat_n, lat_max, *cumulative in rows:
        key = (line or "", model_hash or "", name or "")
        group = found.setdefault(key, _Group(key[0], name or "(no model)", model_hash or "", {}, _no_latency()))
        period = fold(int(number))
        acc = group.periods.setdefault(period.start, [period.label, 0, 0, 0.0, 0, None])
        acc[1] += n
        acc[2] += int(bad or 0)
        acc[3] += float(lat_sum or 0.0)
        acc[4] += int(lat_n or 0)
        acc[5] = lat_max if acc[5] is None else max(acc[5], lat_max or 0.0)
        below = 0
        for i, c in enumerate([*(int(c or 0) for c in cumulative), int(lat_n or 0)]):
            group.latency[i] += c - below
            below = c
    return [found[k] for k in sorted(found)]


def _no_latency() -> list[int]:
    return [0] * (len(LATENCY_BUCKETS_S) + 1)


class _PeriodCache:
    """The period of a 15-minute slot, worked out once per slot."""

    def __init__(self, period: str, s: LineSettings):
        self.period, self.zone, self.shifts, self.known = period, s.zone, list(s.shift_hours), {}

    def __call__(self, slot: int) -> Period:
        if slot not in self.known:
            self.known[slot] = period_of(slot_moment(slot), self.period, self.zone, self.shifts)
        return self.known[slot]

    def of(self, moment: datetime) -> Period:
        utc = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC
        return self(int(utc.timestamp()) // SLOT_S)


def _audit_rows(store: StationStore, q: LineQuery, s: LineSettings, since: datetime, until: datetime) -> list[Any]:
    """The audit sample in the view: (time, model name, model hash, model verdict, latest review's verdict or None)."""
    latest = aliased(Review)
    last_id = select(func.max(Review.id)).where(Review.inspection_id == Inspection.id).scalar_subquery()
    query = (
        select(Inspection.created_at, Inspection.model_name, Inspection.model_hash, Inspection.verdict, latest.verdict)
        .outerjoin(latest, latest.id == last_id)
        .where(s.sample.condition(Inspection.audit_u), *_filters(q, since, until))
    )
    with store.reading() as session:
        return session.execute(query).all()


# ---------------------------------------------------------------- folding


def _group_view(store: StationStore, g: _Group, s: LineSettings, period: str) -> dict[str, Any]:
    starts = sorted(g.periods)
    rows = [g.periods[t] for t in starts]
    labels = [r[0] for r in rows]
    chart = p_chart(labels, [r[1] for r in rows], [r[2] for r in rows])
    means = [r[3] / r[4] if r[4] else None for r in rows]
    judgement, reference = judge_pair(store, s, g.line, g.model_hash) if g.model_hash else (None, None)
    drift = health_row(g.line, g.model, g.model_hash, judgement, reference) if judgement else None
    return {
        "line": g.line,
        "model": g.model,
        "model_hash": g.model_hash,
        "center": chart.center,
        "points": [asdict(p) for p in chart.points],
        "breaks": [asdict(b) for b in chart.breaks],
        "latency": {"mean_ms": means, "max_ms": [r[5] for r in rows], **latency_percentiles(g.latency)},
        "drift": drift,
        "charts": {
            "p_chart": charts.p_chart_svg(chart, f"NG share per {period}"),
            "histogram": charts.histogram_svg(judgement.recent, judgement.expected, "recent p(NG)")
            if judgement
            else "",
            "latency": charts.latency_svg(labels, means, [r[5] for r in rows], f"latency per {period}"),
        },
    }


def _audit_view(
    store: StationStore, q: LineQuery, s: LineSettings, groups: list[_Group], since: datetime, until: datetime
) -> dict[str, Any]:
    """Escape, overkill and outgoing NG per model, for the whole view and for each period."""
    fold = _PeriodCache(q.period, s)
    counts: dict[str, dict[Any, list]] = defaultdict(dict)  # model hash -> period start or "all" -> [label, n, passed]
    names = {}
    for g in groups:
        names[g.model_hash] = g.model
        for start, (label, n, bad, *_rest) in g.periods.items():
            for key, shown in ((start, label), ("all", "all")):
                acc = counts[g.model_hash].setdefault(key, [shown, 0, 0])
                acc[1] += n
                acc[2] += n - bad
    pairs: dict[str, dict[Any, list]] = defaultdict(lambda: defaultdict(list))
    for created, _name, model_hash, verdict, truth in _audit_rows(store, q, s, since, until):
        start = fold.of(created).start
        for key in (start, "all"):
            pairs[model_hash or ""][key].append((verdict, truth))
    models = []
    for model_hash in sorted(counts):
        rows = []
        for key in ["all", *sorted(k for k in counts[model_hash] if k != "all")]:
            label, n, passed = counts[model_hash][key]
            quality = line_quality(pairs[model_hash][key], n, passed, s.audit_escape_target, s.audit_overkill_target)
            rows.append({"period": label, **quality_dict(quality)})
        models.append({"model": names[model_hash], "model_hash": model_hash, "periods": rows})
    return {
        "rate": s.audit_rate,
        "seed": s.audit_seed,
        "escape_target": s.audit_escape_target,
        "overkill_target": s.audit_overkill_target,
        "models": models,
    }


def quality_dict(quality: Quality) -> dict[str, Any]:
    """A Quality as plain JSON."""
    return {
        "inspected": quality.inspected,
        "passed": quality.passed,
        "sampled": quality.sampled,
        "reviewed": quality.reviewed,
        "confusion": quality.confusion.to_dict(),
        "escape": quality.escape.to_dict(),
        "overkill": quality.overkill.to_dict(),
        "outgoing": quality.outgoing.to_dict(),
        "escaped": list(quality.escaped) if quality.escaped else None,
        "needed": {k: asdict(v) for k, v in quality.needed.items()},
    }
