"""The plant's periods: hours, shifts and days in the plant's own time zone, for the line view's charts.

Inspections are stored in UTC. The line view counts them in 15-minute UTC slots (every time zone in
use is a whole number of quarter hours from UTC, so a slot never straddles a local hour) and folds
the slots into local hours, shifts or days here. Shifts start at the local hours of `shift_hours`
(e.g. 6, 14, 22: A 06–14, B 14–22, C 22–06); a shift that runs past midnight belongs to the day it
started on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("hour", "shift", "day")
SLOT_S = 900
"""Seconds in the UTC slots the database counts in (15 minutes)."""
SHIFT_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWX"
FIRST_DAY, LAST_DAY = date(1900, 1, 1), date(9998, 12, 31)
"""The days a history or line view may name: the day after, and a plant's time zone, stay inside the calendar."""


@dataclass(frozen=True)
class Period:
    """One subgroup of the p-chart: its local start, and a label a plant reads ("2026-12-03 B 14–22")."""

    start: datetime
    label: str


def day_problems(**days: date | None) -> list[str]:
    """What is wrong with each named day (`since=..., until=...`): one outside FIRST_DAY .. LAST_DAY."""
    return [
        f"{name}: {day} is not between {FIRST_DAY} and {LAST_DAY}"
        for name, day in days.items()
        if day is not None and not FIRST_DAY <= day <= LAST_DAY
    ]


def zone_problems(name: str | None) -> list[str]:
    """What is wrong with a time zone setting (empty when it is usable or unset)."""
    if not name:
        return []
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return [f"timezone: {name!r} is not a time zone name (e.g. Europe/Berlin, Asia/Shanghai, UTC)"]
    return []


def plant_zone(name: str | None) -> tzinfo:
    """The time zone named (IANA, e.g. Europe/Berlin; checked by `zone_problems`), else this machine's own."""
    if name:
        return ZoneInfo(name)
    if os.environ.get("TZ"):
        try:
            return ZoneInfo(os.environ["TZ"].lstrip(":"))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    localtime = Path("/etc/localtime")
    if localtime.exists():
        with localtime.open("rb") as f:
            return ZoneInfo.from_file(f, key="localtime")
    return timezone.utc


def shift_problems(shift_hours: list[int]) -> list[str]:
    """What is wrong with a list of shift start hours (empty when it is usable)."""
    if not shift_hours:
        return ["shift_hours: give at least one local start hour, e.g. 6,14,22"]
    problems = [f"shift_hours: {h} is not an hour from 0 to 23" for h in shift_hours if not 0 <= h <= 23]
    if len(set(shift_hours)) != len(shift_hours):
        problems.append(f"shift_hours: {shift_hours} names an hour twice")
    return problems


def period_of(moment: datetime, period: str, zone: tzinfo, shift_hours: list[int]) -> Period:
    """The hour, shift or day a UTC moment falls in, in the plant's time zone."""
    local = moment.astimezone(zone)
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        return Period(start, start.strftime("%Y-%m-%d %H:00"))
    if period == "day":
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(start, start.strftime("%Y-%m-%d"))
    if period == "shift":
        return _shift_of(local, zone, sorted(shift_hours))
    raise ValueError(f"period {period!r} is not one of {', '.join(PERIODS)}")


def _shift_of(local: datetime, zone: tzinfo, hours: list[int]) -> Period:
    day = local.date()
    started = [h for h in hours if h <= local.hour]
    if started:
        index = len(started) - 1
    else:  # before the first shift of the day: the last shift of the day before
        index, day = len(hours) - 1, day - timedelta(days=1)
    start_hour, end_hour = hours[index], hours[(index + 1) % len(hours)]
    start = datetime(day.year, day.month, day.day, start_hour, tzinfo=zone)
    name = SHIFT_NAMES[index] if len(hours) > 1 else "day"
    return Period(start, f"{day.isoformat()} {name} {start_hour:02d}–{end_hour:02d}")


def slot_moment(slot: int) -> datetime:
    """The UTC start of a 15-minute slot number (seconds since 1970 // SLOT_S)."""
    return datetime.fromtimestamp(slot * SLOT_S, timezone.utc)
