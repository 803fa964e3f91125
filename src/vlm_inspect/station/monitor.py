"""What a recording process keeps an eye on: Prometheus metrics, and drift of every active line and model.

`serve` and `watch` each hold one `LineMonitor`. Every answer is counted; at most every
`CHECK_EVERY_S` seconds after a recording (and on every health request) each line and model that
inspected within the last `ACTIVE_HOURS` is judged against its reference (drift.py). A line whose
status changes is logged (a warning, on the `vlm_inspect.station` logger), so an alarm reaches the
log even while nobody has the page open; `/v1/station/health` and the drift gauges show the last check.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from vlm_inspect.station.baselines import active_pairs, references, window
from vlm_inspect.station.drift import STATUSES, Judgement, Reference, judge
from vlm_inspect.station.line_settings import LineSettings
from vlm_inspect.station.metrics import StationMetrics
from vlm_inspect.station.queue import audit_unreviewed
from vlm_inspect.station.store import StationStore

ACTIVE_HOURS = 24
"""Lines and models that inspected within this many hours are checked."""
CHECK_EVERY_S = 10.0
log = logging.getLogger("vlm_inspect.station")


def judge_pair(
    store: StationStore, settings: LineSettings, line: str, model_hash: str
) -> tuple[Judgement, Reference | None]:
    """One line and model's recent window against its reference (the evaluation's if given, else the station's)."""
    found = references(store, model_hash, settings.baseline_n)
    reference = found.get("evaluate") or found.get("station")
    recent = window(store, model_hash, line, settings.drift_window)
    return judge(recent, reference, found.get("station"), settings.drift), reference


class LineMonitor:
    """Metrics and drift checks of one process over one store (the store may be None: metrics only)."""

    def __init__(self, store: StationStore | None, settings: LineSettings, metrics: StationMetrics | None = None):
        self.store, self.settings = store, settings
        self.metrics = metrics or StationMetrics()
        self.states: dict[tuple[str, str], str] = {}
        self.last: dict[str, Any] = {"status": "ok", "checked": None, "lines": []}
        self._checked_at = float("-inf")
        self._lock = threading.Lock()
        if store is not None:
            self.metrics.read_audit_from(lambda: audit_unreviewed(store, settings.sample))

    def answered(self, line: str, model: str, verdict: str | None, latency_ms: float | None) -> None:
        """Count one answer (recorded or not)."""
        self.metrics.inspected(line, model, verdict, latency_ms)

    def maybe_check(self) -> None:
        """Check drift if the last check is older than CHECK_EVERY_S (called after each recording)."""
        if self.store is not None and time.monotonic() - self._checked_at >= CHECK_EVERY_S:
            self.check()

    def check(self) -> dict[str, Any]:
        """Judge every active line and model now; log status changes; the health mapping."""
        if self.store is None:
            return self.last
        with self._lock:
            self._checked_at = time.monotonic()
            now = datetime.now(timezone.utc)
            lines = [
                self._one(line, model_hash, name)
                for line, model_hash, name in active_pairs(self.store, now - timedelta(hours=ACTIVE_HOURS))
            ]
            worst = max((row["status"] for row in lines), key=STATUSES.index, default="ok")
            self.last = {
                "status": "ok" if worst == "collecting" else worst,
                "checked": _iso(now),
                **self._limits(),
                "lines": lines,
            }
            return self.last

    def _one(self, line: str, model_hash: str, name: str | None) -> dict[str, Any]:
        judgement, reference = judge_pair(self.store, self.settings, line, model_hash)
        row = health_row(line, name or model_hash, model_hash, judgement, reference)
        self.metrics.drifted(line, row["model"], model_hash, judgement.status, judgement.psi, judgement.ng_rate)
        before = self.states.get((line, model_hash))
        first_seen_raised = before is None and judgement.status in ("warn", "alarm")
        if first_seen_raised or before is not None and before != judgement.status:
            _log_change(row, before)
        self.states[(line, model_hash)] = judgement.status
        return row

    def _limits(self) -> dict[str, Any]:
        s = self.settings
        return {
            "window": s.drift_window,
            "psi_warn": s.drift_psi_warn,
            "psi_alarm": s.drift_psi_alarm,
            "ng_sigma": s.drift_ng_sigma,
        }


def health_row(line: str, model: str, model_hash: str, j: Judgement, reference: Reference | None) -> dict[str, Any]:
    """One line and model as `/v1/station/health` shows it."""
    ref = None
    if reference is not None:
        ref = {"kind": reference.kind, "name": reference.name, "source": reference.source, "n": reference.n}
        ref["ng_rate"] = reference.ng_rate
    return {
        "line": line,
        "model": model,
        "model_hash": model_hash,
        "status": j.status,
        "n": j.n,
        "psi": None if j.psi is None else round(j.psi, 4),
        "ng_rate": j.ng_rate,
        "ng_limits": list(j.ng_limits) if j.ng_limits else None,
        "mixed_ng_share": j.mixed_ng_share,
        "reference": ref,
        "reasons": j.reasons,
    }


def _log_change(row: dict[str, Any], before: str | None) -> None:
    where = f"line {row['line']}, model {row['model']} ({row['model_hash'][:8]})"
    why = "; ".join(row["reasons"])
    if row["status"] == "alarm":
        log.warning("drift ALARM on %s: %s", where, why)
    elif row["status"] == "warn":
        log.warning("drift warning on %s: %s", where, why)
    elif before in ("warn", "alarm"):
        log.warning("drift %s cleared on %s (now %s)", before, where, row["status"])


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
