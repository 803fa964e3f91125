"""Query parameters read alike on every station route: an integer is digits, a number is finite, a day is
YYYY-MM-DD, and each problem names its parameter. Which values make sense is the filter's to say
(`station.history.HistoryFilter`, `station.lineview.LineQuery`), so a route and the library refuse the same ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import date

_INTEGER = re.compile(r"[+-]?\d{1,30}")  # longer ones are out of every range anyway


class QueryReader:
    """Reads parameters from a query string, collecting a problem for each one that does not parse."""

    def __init__(self, params: Mapping[str, str]):
        self.params = params
        self.problems: list[str] = []

    def text(self, name: str) -> str | None:
        return self.params.get(name) or None

    def integer(self, name: str, default: int) -> int:
        """The parameter as an integer; `default` when absent or empty (0 is a value, not "unset")."""
        value = self.params.get(name)
        if value is None or not value.strip():
            return default
        if not _INTEGER.fullmatch(value.strip()):
            self.problems.append(f"{name}: {value[:40]!r} is not an integer")
            return default
        return int(value)

    def number(self, name: str) -> float | None:
        """The parameter as a finite number; None when absent or empty."""
        value = self.params.get(name)
        if value is None or not value.strip():
            return None
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            self.problems.append(f"{name}: {value[:40]!r} is not a finite number")
            return None
        return number

    def day(self, name: str, default: date | None = None) -> date | None:
        """The parameter as a day (YYYY-MM-DD); `default` when absent or empty."""
        value = self.params.get(name)
        if not value:
            return default
        try:
            return date.fromisoformat(value)
        except ValueError:
            self.problems.append(f"{name}: {value[:40]!r} is not a date (YYYY-MM-DD)")
            return default
