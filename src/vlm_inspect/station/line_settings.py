"""The settings the line view, drift and the audit sample read, taken from a verb's settings (serve, watch).

The fields are one group in config.py (`config.LineSettings`, embedded in `ServeConfig` and `WatchConfig`), where
their docstrings are their help; `LineSettings.of(cfg)` takes them from a verb's settings (the labeller has none:
defaults).
"""

from __future__ import annotations

import dataclasses
from datetime import tzinfo
from typing import Any

from vlm_inspect import config
from vlm_inspect.errors import DataError
from vlm_inspect.station import audit
from vlm_inspect.station.drift import DriftSettings
from vlm_inspect.station.periods import plant_zone, shift_problems, zone_problems

MAX_LINE_CHARS = 80


class LineSettings(config.LineSettings):
    """The settings group (config.LineSettings, where each field's docstring is its help) with what it means
    for the station: drift thresholds, the audit sample, the plant's time zone."""

    @classmethod
    def of(cls, cfg: Any) -> LineSettings:
        """The line settings a verb's config holds (same names), the others at their defaults."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        return cls(**values)

    @property
    def drift(self) -> DriftSettings:
        return DriftSettings(self.drift_window, self.drift_psi_warn, self.drift_psi_alarm, self.drift_ng_sigma)

    @property
    def sample(self) -> audit.AuditSample:
        return audit.AuditSample(self.audit_rate, self.audit_seed)

    @property
    def zone(self) -> tzinfo:
        return plant_zone(self.timezone)


def line_problems(cfg: Any) -> list[str]:
    """Every problem with the line settings a verb's config holds (for its one ConfigError)."""
    from vlm_inspect.station.baselines import read_report

    s = LineSettings.of(cfg)
    problems = []
    if s.line is not None and not 0 < len(s.line.strip()) <= MAX_LINE_CHARS:
        problems.append(f"line: {s.line!r} must be 1 to {MAX_LINE_CHARS} characters")
    for name in ("baseline_n", "drift_window"):
        if getattr(s, name) < 10:
            problems.append(f"{name}: {getattr(s, name)} must be at least 10")
    if not 0 < s.drift_psi_warn <= s.drift_psi_alarm:
        problems.append(
            f"drift_psi_warn, drift_psi_alarm: need 0 < warn ≤ alarm, got {s.drift_psi_warn} and {s.drift_psi_alarm}"
        )
    if s.drift_ng_sigma <= 0:
        problems.append(f"drift_ng_sigma: {s.drift_ng_sigma} must be more than 0")
    problems += shift_problems(list(s.shift_hours)) + zone_problems(s.timezone)
    problems += audit.problems(s.audit_rate, s.audit_escape_target, s.audit_overkill_target)
    if s.baseline and not (getattr(cfg, "station", None) or getattr(cfg, "db", None)):
        problems.append("baseline: needs a station (--station DIR), where the model's baseline is kept")
    if s.baseline:
        try:
            read_report(s.baseline)
        except DataError as err:
            problems.append(f"baseline: {err}")
    return problems
