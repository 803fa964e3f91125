"""The line view on a 1,000,000-inspection store: seconds per page view on SQLite and PostgreSQL, with and without indexes.

Builds a store at the first schema (revision 0001, as a station that ran before the line view had
it), fills it with --n inspections over --days days (3 lines, a model swap two thirds in, a
brighter camera on cam3 for the last two days, 4% NG parts, the 2% audit sample 80% reviewed plus
some least-sure reviews), times the upgrade to the line view's revision, names the three lines
(cam1-3: the upgrade names old records' line after their source), then times what each page view
asks of the store, --repeat times each (first run and median):

- line page: `/v1/station/line` (7 days by shift; 30 days by day; 7 days by hour for one line)
  plus `/v1/station/health` (the drift check of every active line and model);
- history and labeller: the newest 50 with the total, and the least-sure, disagreements and
  audit orders the same way; the labeller's next record (queue, limit 1);
- `/metrics`: one scrape (the audit queue's depth).

Then again without the line view's indexes (revision 0002's), and without any secondary index on
inspections (0001's too). PostgreSQL is a throwaway cluster (tests/station_helpers.py) unless
--pg-url names one; it is VACUUM ANALYZEd after the fill (autovacuum's steady state). SQLite is
not ANALYZEd: the store never does it. Prints a table and writes --out JSON.

Run: python benchmarks/line_view.py [--n 1000000] [--days 30] [--db sqlite,postgresql] [--pg-url URL]
     [--repeat 3] [--out benchmarks/results/cpu-line-view.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import sqlalchemy
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the throwaway PostgreSQL of the tests

from vlm_inspect.station.audit import AuditSample, audit_u  # noqa: E402
from vlm_inspect.station.history import HistoryFilter, list_records  # noqa: E402
from vlm_inspect.station.line_settings import LineSettings  # noqa: E402
from vlm_inspect.station.lineview import LineQuery, line_view  # noqa: E402
from vlm_inspect.station.monitor import LineMonitor  # noqa: E402
from vlm_inspect.station.store import DB_NAME, MIGRATIONS, open_store  # noqa: E402

LINE_VIEW_INDEXES = {
    "ix_inspections_model_hash_line_id": "(model_hash, line, id)",
    "ix_inspections_margin": "(margin)",
    "ix_inspections_audit_u": "(audit_u)",
}
FIRST_INDEXES = {f"ix_inspections_{c}": f"({c})" for c in ("photo_sha256", "verdict", "model_name", "created_at")}
COLUMNS = ("photo_sha256", "file_name", "verdict", "p_ng", "threshold", "model_name", "model_hash", "latency_ms", "source", "created_at")  # fmt: skip
CHUNK = 50_000
SETTINGS = LineSettings(timezone="UTC")  # defaults: windows of 500, audit 2%


# ---------------------------------------------------------------- the store


def synthetic_rows(n: int, days: float, now: datetime, start_id: int, count: int, seed: int) -> tuple[list, list]:
    """Inspections start_id … start_id + count − 1 of n, and the reviews an operator gave some of them."""
    rng = np.random.default_rng(seed + start_id)
    ids = np.arange(start_id, start_id + count)
    seconds = days * 86400
    moments = [now - timedelta(seconds=seconds * (1 - (i - 1) / n)) for i in ids]
    line = (ids % 3) + 1
    bad = rng.random(count) < 0.04
    p = np.where(bad, 1 - rng.beta(0.6, 8, count), rng.beta(0.6, 12, count))
    brighter = (line == 3) & (ids > n * (1 - 2 / days))
    p = np.where(brighter & ~bad, np.minimum(1.0, p * 4), p)
    swapped = ids > n * 2 / 3
    latency = rng.lognormal(np.log(120), 0.3, count)
    rows, reviews = [], []
    sample = AuditSample()
    for k, i in enumerate(ids):
        verdict = "NG" if p[k] >= 0.5 else "OK"
        model = ("boxes-v2", "bbbbbbbbbbbbbbb2") if swapped[k] else ("boxes-v1", "aaaaaaaaaaaaaaa1")
        rows.append(
            (
                "bench",
                f"cam{line[k]}-{i}.jpg",
                verdict,
                float(p[k]),
                0.5,
                *model,
                float(latency[k]),
                "watch",
                moments[k],
            )
        )
        truth = "NG" if bad[k] else "OK"
        if (sample.contains(audit_u(int(i))) and rng.random() < 0.8) or (abs(p[k] - 0.5) < 0.05 and rng.random() < 0.3):
            reviews.append((int(i), truth, "[]", "bench", moments[k]))
    return rows, reviews


def build_old_store(folder: Path, db: str | None, n: int, days: float) -> str:
    """A store at revision 0001 holding n inspections; its URL."""
    from alembic import command
    from alembic.config import Config

    folder.mkdir(parents=True, exist_ok=True)
    url = db or f"sqlite:///{(folder / DB_NAME).resolve()}"
    engine = create_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text("INSERT INTO photos VALUES ('bench', '.jpg', 50000, 640, 480, :t)"), {"t": datetime.now(timezone.utc)}
        )
    now = datetime.now(timezone.utc)
    fill = _fill_sqlite if engine.dialect.name == "sqlite" else _fill_postgres
    for start in range(1, n + 1, CHUNK):
        rows, reviews = synthetic_rows(n, days, now, start, min(CHUNK, n - start + 1), seed=0)
        fill(engine, rows, reviews)
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
    engine.dispose()
    return url


def _fill_sqlite(engine: sqlalchemy.Engine, rows: list, reviews: list) -> None:
    stamp = lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")  # noqa: E731  SQLAlchemy's SQLite datetime text
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.executemany(
            f"INSERT INTO inspections ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [(*r[:-1], stamp(r[-1])) for r in rows],
        )
        cur.executemany(
            "INSERT INTO reviews (inspection_id, verdict, boxes_json, operator, created_at) VALUES (?, ?, ?, ?, ?)",
            [(*r[:-1], stamp(r[-1])) for r in reviews],
        )
        raw.commit()
    finally:
        raw.close()


def _fill_postgres(engine: sqlalchemy.Engine, rows: list, reviews: list) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY inspections ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        with cur.copy("COPY reviews (inspection_id, verdict, boxes_json, operator, created_at) FROM STDIN") as copy:
            for row in reviews:
                copy.write_row(row)
        raw.commit()
    finally:
        raw.close()


# ---------------------------------------------------------------- page views


def page_views(store, today: date) -> dict[str, Callable[[], object]]:
    """What each page view asks of the store, as callables."""
    week, month = today - timedelta(days=6), today - timedelta(days=29)
    monitor = LineMonitor(store, SETTINGS)

    def listing(order: str, limit: int = 50, queue: bool = False) -> Callable[[], object]:
        flt = HistoryFilter(order=order, limit=limit, queue=queue, sample=SETTINGS.sample)
        return lambda: list_records(store, flt)

    return {
        "line: 7 days by shift": lambda: line_view(store, LineQuery(week, today, "shift"), SETTINGS),
        "line: 30 days by day": lambda: line_view(store, LineQuery(month, today, "day"), SETTINGS),
        "line: 7 days by hour, one line": lambda: line_view(
            store, LineQuery(week, today, "hour", line="cam3"), SETTINGS
        ),
        "health (drift of active lines)": monitor.check,
        "history: newest 50 + total": listing("newest"),
        "history: least sure 50 + total": listing("least-sure"),
        "history: disagreements 50 + total": listing("disagreements"),
        "history: audit sample 50 + total": listing("audit"),
        "labeller: next least sure (+ left)": listing("least-sure", limit=1, queue=True),
        "/metrics scrape": monitor.metrics.exposition,
    }


def timed(fn: Callable[[], object], repeat: int) -> dict:
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"first_s": round(seconds[0], 3), "median_s": round(statistics.median(seconds), 3)}


def drop_indexes(store, names: dict[str, str]) -> None:
    with store.engine.begin() as connection:
        for name in names:
            connection.execute(text(f"DROP INDEX IF EXISTS {name}"))


def measure(backend: str, db: str | None, args: argparse.Namespace, tmp: Path) -> dict:
    folder = tmp / backend
    started = time.perf_counter()
    build_old_store(folder, db, args.n, args.days)
    filled = time.perf_counter() - started
    print(f"{backend}: {args.n:,} inspections at revision 0001 in {filled:.0f} s", flush=True)
    started = time.perf_counter()
    store = open_store(folder, db)  # the upgrade to 0002_line_view: columns filled, indexes built
    upgrade = time.perf_counter() - started
    print(f"{backend}: upgrade 0001 → 0002_line_view {upgrade:.1f} s", flush=True)
    with (
        store.engine.begin() as connection
    ):  # the upgrade names each line after its source; `watch --line camN` would have
        connection.execute(text("UPDATE inspections SET line = substr(file_name, 1, 4)"))
    if backend == "postgresql":
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE inspections"))
    today = datetime.now(timezone.utc).date()
    views = page_views(store, today)
    out = {"fill_s": round(filled, 1), "upgrade_s": round(upgrade, 1), "runs": {}}
    for label, drop in (
        ("all indexes", {}),
        ("without 0002's", LINE_VIEW_INDEXES),
        ("no secondary index", FIRST_INDEXES),
    ):
        drop_indexes(store, drop)
        if backend == "postgresql" and drop:
            with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("ANALYZE inspections"))
        out["runs"][label] = {}
        for name, fn in views.items():
            out["runs"][label][name] = timed(fn, args.repeat)
            print(f"{backend:<11} {label:<19} {name:<34} {out['runs'][label][name]}", flush=True)
    store.close()
    return out


@contextmanager
def postgres(url: str | None) -> Iterator[str | None]:
    if url:
        yield url
        return
    from station_helpers import postgres_server

    with postgres_server() as found:
        yield found


def print_table(results: dict) -> None:
    backends = list(results["backends"])
    labels = list(next(iter(results["backends"].values()))["runs"])
    print("\nseconds per page view (median of runs; first run in brackets)")
    head = "| query | " + " | ".join(f"{b}: {label}" for b in backends for label in labels) + " |"
    print(head)
    print("|" + "---|" * (1 + len(backends) * len(labels)))
    names = list(next(iter(next(iter(results["backends"].values()))["runs"].values())))
    for name in names:
        cells = []
        for b in backends:
            for label in labels:
                r = results["backends"][b]["runs"][label][name]
                cells.append(f"{r['median_s']:.3f} ({r['first_s']:.3f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    for b in backends:
        r = results["backends"][b]
        print(f"{b}: fill {r['fill_s']} s, upgrade 0001 → 0002_line_view {r['upgrade_s']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg-url", help="a PostgreSQL database to fill (its station tables are dropped first)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cpu-line-view.json")
    args = parser.parse_args()
    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"sqlalchemy": sqlalchemy.__version__, "sqlite": __import__("sqlite3").sqlite_version},
        "n": args.n,
        "days": args.days,
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.db.split(","):
            if backend == "sqlite":
                results["backends"]["sqlite"] = measure("sqlite", None, args, Path(tmp))
                continue
            with postgres(args.pg_url) as url:
                if url is None:
                    raise SystemExit("PostgreSQL is not installed here (apt-get install postgresql); or give --pg-url")
                from station_helpers import reset_postgres

                reset_postgres(url)
                with create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1)).connect() as c:
                    results["versions"]["postgresql"] = c.execute(text("SHOW server_version")).scalar()
                results["backends"]["postgresql"] = measure("postgresql", url, args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
