"""Each model's reference p(NG) distribution in the store, and the windows drift compares with it.

`evaluate` baseline: `serve --baseline REPORT` (or `watch --baseline`) reads the tuned model's p(NG)
on the default question, and each photo's label, from REPORT/results.json and keeps them under the
served model's hash (replacing an older one). `station` baseline: the first `baseline_n`
inspections recorded under a model hash; kept once that many exist, never changed after.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from vlm_inspect.errors import DataError
from vlm_inspect.station.drift import Reference
from vlm_inspect.station.schema import Baseline, Inspection
from vlm_inspect.station.store import StationStore

MIN_REPORT_PHOTOS = 50
MIN_REPORT_CLASS = 10


def read_report(path: str | Path) -> Reference:
    """The tuned model's p(NG) and labels from an evaluate report folder or its results.json.

    Raises:
        DataError: no results.json, not one `evaluate` wrote, or too few photos of a class to be a distribution.
    """
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
        qid = next((q["id"] for q in results["questions"] if q.get("default")), results["questions"][0]["id"])
        scores = [float(img["p_ng"]["tuned"][qid]) for img in results["images"]]
        labels = [img["label"] for img in results["images"]]
        name = results["models"]["tuned"].get("name") or "tuned"
        threshold = float(results["config"]["threshold"])
    except FileNotFoundError:
        raise DataError(f"{file}: no such file (give an `evaluate` report folder or its results.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: not valid JSON ({err})") from None
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise DataError(f"{file}: not a results.json from `vlm-inspect evaluate` (no {err})") from None
    _check_counts(file, labels)
    return Reference("evaluate", name, str(file), tuple(scores), tuple(labels), threshold)


def _check_counts(file: Path, labels: list[str]) -> None:
    n_ok, n_ng = labels.count("OK"), labels.count("NG")
    if len(labels) < MIN_REPORT_PHOTOS or min(n_ok, n_ng) < MIN_REPORT_CLASS:
        raise DataError(
            f"{file}: {n_ok} OK and {n_ng} NG photos are too few for a p(NG) distribution (need "
            f"{MIN_REPORT_PHOTOS} in all, {MIN_REPORT_CLASS} of each); leave baseline unset and the station "
            "takes the model's first inspections instead"
        )


def keep_report(store: StationStore, model_hash: str, model_name: str, reference: Reference) -> None:
    """Keep an evaluation's distribution as the model's `evaluate` baseline (replacing an older one)."""
    with store.writing() as session:
        session.execute(delete(Baseline).where(Baseline.model_hash == model_hash, Baseline.kind == "evaluate"))
        session.add(
            Baseline(
                model_hash=model_hash,
                kind="evaluate",
                model_name=model_name,
                source=reference.source,
                threshold=reference.threshold,
                scores_json=json.dumps(list(reference.scores)),
                labels_json=json.dumps(list(reference.labels or ())),
            )
        )


def references(store: StationStore, model_hash: str, baseline_n: int) -> dict[str, Reference]:
    """The model's baselines by kind: `evaluate` if one was given, `station` once it is complete."""
    with store.reading() as session:
        rows = session.scalars(select(Baseline).where(Baseline.model_hash == model_hash)).all()
    found = {row.kind: _reference(row) for row in rows}
    if "station" not in found:
        station = _first_inspections(store, model_hash, baseline_n)
        if station is not None:
            found["station"] = station
    return found


def _reference(row: Baseline) -> Reference:
    labels = tuple(json.loads(row.labels_json)) if row.labels_json else None
    name = row.model_name or row.model_hash
    return Reference(row.kind, name, row.source, tuple(json.loads(row.scores_json)), labels, row.threshold)


def _first_inspections(store: StationStore, model_hash: str, n: int) -> Reference | None:
    """The first n scored inspections under the model, kept as its station baseline once there are n."""
    query = (
        select(Inspection.id, Inspection.p_ng, Inspection.threshold, Inspection.model_name)
        .where(Inspection.model_hash == model_hash, Inspection.p_ng.is_not(None))
        .order_by(Inspection.id)
        .limit(n)
    )
    with store.reading() as session:
        rows = session.execute(query).all()
    if len(rows) < n:
        return None
    thresholds = sorted(r.threshold for r in rows if r.threshold is not None)
    threshold = thresholds[len(thresholds) // 2] if thresholds else 0.5
    source = f"first {n} inspections under the model (ids {rows[0].id}–{rows[-1].id})"
    baseline = Baseline(
        model_hash=model_hash,
        kind="station",
        model_name=rows[0].model_name,
        source=source,
        threshold=threshold,
        scores_json=json.dumps([r.p_ng for r in rows]),
    )
    try:
        with store.writing() as session:
            session.add(baseline)
    except IntegrityError:
        pass  # another process kept the same first inspections a moment earlier
    return _reference(baseline)


def window(store: StationStore, model_hash: str, line: str, n: int) -> list[tuple[float, str | None, float | None]]:
    """The line's latest n scored inspections under the model: (p(NG), verdict, threshold), newest first."""
    query = (
        select(Inspection.p_ng, Inspection.verdict, Inspection.threshold)
        .where(Inspection.model_hash == model_hash, Inspection.line == line, Inspection.p_ng.is_not(None))
        .order_by(Inspection.id.desc())
        .limit(n)
    )
    with store.reading() as session:
        return [tuple(row) for row in session.execute(query)]


def active_pairs(store: StationStore, since: datetime) -> list[tuple[str, str, str | None]]:
    """(line, model hash, model name) of every line and model that inspected since `since`."""
    # Grouped by an expression, not the bare columns: SQLite (without statistics) would otherwise walk the
    # whole (model_hash, line, id) index to save a sort, 20× slower on a million rows than the time range.
    model_hash = func.coalesce(Inspection.model_hash, "")
    query = (
        select(Inspection.line, model_hash, func.max(Inspection.model_name))
        .where(Inspection.created_at >= since, Inspection.p_ng.is_not(None))
        .group_by(Inspection.line, model_hash)
    )
    with store.reading() as session:
        rows = [(line, found, name) for line, found, name in session.execute(query) if found]
    return sorted(rows, key=lambda row: (row[0] or "", row[1]))
