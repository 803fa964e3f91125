"""Review orders: which records an operator sees first, in the history list and the labeller's queue.

- `newest` (the history's default) and `oldest` (the labeller's): by time.
- `least-sure`: records with a model verdict, p(NG) nearest its threshold first; what the model
  was unsure of teaches the next model most.
- `disagreements`: records whose latest review differs from the model's verdict, newest first;
  as a queue, the ones only one operator has looked at (a second opinion before they train a model).
- `audit`: the random audit sample (audit.py) in its random order; only its reviews measure the
  line's escape and overkill without bias.

The labeller's queue holds unreviewed records in every order but `disagreements`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import aliased

from vlm_inspect.station.audit import AuditSample
from vlm_inspect.station.schema import Inspection, Review

ORDERS = ("newest", "oldest", "least-sure", "disagreements", "audit")


def ordered(query: Select, order: str, sample: AuditSample, queue: bool = False) -> tuple[Select, list[Any]]:
    """The history query narrowed to what the order shows, and its ORDER BY terms.

    Args:
        query: the history query (`Review` in it is each record's latest review).
        order: one of ORDERS.
        sample: the audit sample, for `audit`.
        queue: the labeller's queue: unreviewed records only (disagreements: reviewed by one operator only).
    """
    if queue:
        query = query.where(_once_reviewed() if order == "disagreements" else unreviewed())
    if order == "oldest":
        return query, [Inspection.id.asc()]
    if order == "least-sure":
        return query.where(Inspection.margin.is_not(None)), [Inspection.margin.asc(), Inspection.id.desc()]
    if order == "disagreements":
        disagree = (Review.id.is_not(None), Inspection.verdict.is_not(None), Review.verdict != Inspection.verdict)
        return query.where(*disagree), [Inspection.id.desc()]
    if order == "audit":
        return query.where(sample.condition(Inspection.audit_u)), [sample.order(Inspection.audit_u), Inspection.id]
    return query, [Inspection.id.desc()]


def unreviewed() -> Any:
    """No review of the inspection exists. NOT EXISTS, which PostgreSQL estimates well: `Review.id IS NULL`
    after the outer join it took for one row, and sorted a million records for the least-sure queue."""
    any_review = aliased(Review)
    return ~exists(select(any_review.id).where(any_review.inspection_id == Inspection.id))


def _once_reviewed() -> Any:
    earlier = aliased(Review)
    return ~exists(select(earlier.id).where(earlier.inspection_id == Inspection.id, earlier.id < Review.id))


def audit_unreviewed(store: Any, sample: AuditSample) -> int:
    """How many records of the audit sample no operator has reviewed (the audit queue's depth)."""
    query = select(func.count()).where(
        sample.condition(Inspection.audit_u), Inspection.verdict.is_not(None), unreviewed()
    )
    with store.reading() as session:
        return int(session.scalar(query) or 0)
