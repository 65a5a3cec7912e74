"""Review queries: decisions stored in bulk, read per example, per job, or counted."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    Text,
    Uuid,
    and_,
    any_,
    bindparam,
    cast,
    func,
    literal,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from app.db import AsyncConnections, compiled
from app.models import Decision, Review, Verdict, utcnow
from app.reviews.domain import Review as Decided
from app.reviews.schemas import ReviewUpdate

COLUMNS = (
    "job_id",
    "position",
    "decision",
    "answer",
    "note",
    "api_key_id",
    "reviewed_by",
    "reviewed_at",
)


def _among(position: InstrumentedAttribute[int], positions: Iterable[int]) -> ColumnElement[bool]:
    """`position = ANY(array)`: one parameter however many positions (IN binds each, and
    PostgreSQL takes at most 65,535)."""
    return position == any_(literal(list(positions), ARRAY(Integer)))


def flagged_at(session: Session, job_id: uuid.UUID, positions: Iterable[int]) -> dict[int, bool]:
    """Whether each audited example among `positions` is flagged; absent: no verdict there."""
    rows = session.execute(
        select(Verdict.position, Verdict.flagged).where(
            Verdict.job_id == job_id, _among(Verdict.position, positions)
        )
    )
    return {position: flagged for position, flagged in rows}


def save_reviews(
    session: Session,
    job_id: uuid.UUID,
    decisions: Sequence[tuple[int, ReviewUpdate]],
    api_key_id: uuid.UUID | None,
    reviewed_by: str,
) -> None:
    """Store decisions (position, decision) made with one key, each replacing the example's
    earlier one: one statement, its rows passed as arrays, however many there are."""
    items = (
        func.unnest(
            literal([position for position, _ in decisions], ARRAY(Integer)),
            literal([d.decision.value for _, d in decisions], ARRAY(Text)),
            literal([d.answer for _, d in decisions], ARRAY(Text)),
            literal([d.note for _, d in decisions], ARRAY(Text)),
        )
        .table_valued("position", "decision", "answer", "note")
        .render_derived()
    )
    rows = select(
        literal(job_id, Uuid),
        items.c.position,
        cast(items.c.decision, Review.__table__.c.decision.type),
        items.c.answer,
        items.c.note,
        literal(api_key_id, Uuid),
        literal(reviewed_by, Text),
        literal(utcnow(), DateTime(timezone=True)),
    )
    statement = insert(Review).from_select(COLUMNS, rows)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Review.job_id, Review.position],
            set_={column: statement.excluded[column] for column in COLUMNS[2:]},
        )
    )


def reviews_at(session: Session, job_id: uuid.UUID, positions: Iterable[int]) -> dict[int, Review]:
    """The decisions on the examples at `positions` that have one."""
    rows = session.scalars(
        select(Review).where(Review.job_id == job_id, _among(Review.position, positions))
    )
    return {review.position: review for review in rows}


def decisions(session: Session, job_id: uuid.UUID) -> dict[int, Decided]:
    """Every decision on the job's examples, by position, as the export applies them."""
    rows = session.execute(
        select(Review.position, Review.decision, Review.answer).where(Review.job_id == job_id)
    )
    return {position: Decided(decision, answer) for position, decision, answer in rows}


def decision_counts(
    session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[Decision, int]]:
    """Per job: how many of its examples have each decision."""
    rows = session.execute(
        select(Review.job_id, Review.decision, func.count())
        .where(Review.job_id.in_(job_ids))
        .group_by(Review.job_id, Review.decision)
    )
    counts: dict[uuid.UUID, dict[Decision, int]] = {}
    for job_id, decision, n in rows:
        counts.setdefault(job_id, {})[decision] = n
    return counts


JOB_DECISION_COUNTS = compiled(
    select(Review.decision, func.count())
    .where(Review.job_id == bindparam("job_id"))
    .group_by(Review.decision)
)


async def fetch_decision_counts(
    connections: AsyncConnections, job_id: uuid.UUID
) -> dict[Decision, int]:
    """`decision_counts` of one job, on the event loop."""
    rows = await connections.fetch(JOB_DECISION_COUNTS, {"job_id": job_id})
    return {Decision(decision): n for decision, n in rows}


def copy_reviews(session: Session, source_id: uuid.UUID, target_id: uuid.UUID) -> int:
    """Copy the source job's decisions onto the target job's examples at the same positions;
    returns how many were copied.

    Only where the target's example is flagged and has no decision of its own, and an `accept`
    only where the target suggests the very answer that was accepted: a decision is about that
    answer. Who decided, when and why come along.
    """
    source_verdict, target_verdict = aliased(Verdict), aliased(Verdict)
    suggested = "suggested_answer"
    copied = (
        select(
            target_verdict.job_id,
            Review.position,
            Review.decision,
            Review.answer,
            Review.note,
            Review.api_key_id,
            Review.reviewed_by,
            Review.reviewed_at,
        )
        .join(
            source_verdict,
            and_(
                source_verdict.job_id == Review.job_id, source_verdict.position == Review.position
            ),
        )
        .join(
            target_verdict,
            and_(
                target_verdict.job_id == target_id,
                target_verdict.position == Review.position,
                target_verdict.flagged,
            ),
        )
        .where(
            Review.job_id == source_id,
            (Review.decision != Decision.ACCEPT)
            | target_verdict.audit[suggested].astext.is_not_distinct_from(
                source_verdict.audit[suggested].astext
            ),
        )
    )
    statement = (
        insert(Review)
        .from_select(COLUMNS, copied)
        .on_conflict_do_nothing()
        .returning(Review.position)
    )
    return len(session.execute(statement).all())
