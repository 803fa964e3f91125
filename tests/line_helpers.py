"""A synthetic line for the line-view tests and screenshots: box photos scored by the darkness model,
a camera that turns brighter after record N, and operators who review the audit sample truthfully.

Parts: 94% good boxes (shade 185–215, p(NG) 0.16–0.27), 6% defective ones (shade 60–120 with a dark
spot, p(NG) 0.53–0.76). After `drift_after` records the camera adds 40 to every shade: good parts
score 0.01–0.12 and three of seven defective shades fall under 0.5, so they escape.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from PIL import Image

from station_helpers import DarknessModel, photo
from vlm_inspect.station.audit import AuditSample, audit_u
from vlm_inspect.station.schema import Inspection, Photo, Review
from vlm_inspect.station.store import StationStore

GOOD = tuple(range(185, 216, 5))
BAD = tuple(range(60, 121, 10))
BRIGHTER = 40
NG_SHARE = 0.06


@dataclass(frozen=True)
class Part:
    shade: int
    defective: bool

    def photo(self, brighter: bool) -> bytes:
        return photo(min(255, self.shade + (BRIGHTER if brighter else 0)), size=(320, 240), spot=self.defective)


def parts(n: int, seed: int = 0) -> list[Part]:
    rng = random.Random(seed)
    return [Part(rng.choice(BAD), True) if rng.random() < NG_SHARE else Part(rng.choice(GOOD), False) for _ in range(n)]


def fill_line(
    store: StationStore,
    n: int,
    start: datetime,
    step: timedelta,
    drift_after: int | None = None,
    line: str = "cam1",
    model: tuple[str, str] = ("boxes-v1", "a1b2c3d4e5f60718"),
    audit: AuditSample | None = None,
    seed: int = 0,
) -> list[int]:
    """Record n inspections of the synthetic line in one transaction (fast); the audit sample is reviewed.

    Returns:
        The ids of the inspections, in order.
    """
    scorer, cache = DarknessModel(), {}
    rows = []
    for i, part in enumerate(parts(n, seed)):
        brighter = drift_after is not None and i >= drift_after
        key = (part, brighter)
        if key not in cache:
            data = part.photo(brighter)
            stored = store.store_photo(data)
            cache[key] = (stored, scorer.score([Image.open(io.BytesIO(data))])[0])
        stored, p_ng = cache[key]
        rows.append((stored, p_ng, part, start + i * step))
    return _insert(store, rows, line, model, audit or AuditSample())


def _insert(store, rows, line, model, audit) -> list[int]:
    with store.writing() as session:
        for stored in {r[0].sha256: r[0] for r in rows}.values():
            if session.get(Photo, stored.sha256) is None:
                session.add(Photo(**vars(stored)))
        session.flush()  # photos before the rows that name them
        inspections = []
        for i, (stored, p_ng, _part, moment) in enumerate(rows):
            verdict = "NG" if p_ng >= 0.5 else "OK"
            inspections.append(
                Inspection(
                    photo_sha256=stored.sha256, file_name=f"{line}-{i:05d}.png", source="watch", line=line,
                    verdict=verdict, p_ng=p_ng, threshold=0.5, margin=abs(p_ng - 0.5), model_name=model[0],
                    model_hash=model[1], latency_ms=80 + (i * 37) % 60, created_at=moment,
                )
            )  # fmt: skip
        session.add_all(inspections)
        session.flush()
        for row, (_stored, _p, part, moment) in zip(inspections, rows, strict=True):
            row.audit_u = audit_u(row.id)
            if audit.contains(row.audit_u):  # the operator tells the truth about the part
                truth = "NG" if part.defective else "OK"
                session.add(Review(inspection_id=row.id, verdict=truth, operator="auditor", created_at=moment))
        return [row.id for row in inspections]
