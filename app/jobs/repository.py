"""Job queries: the jobs, their progress counters and verdict tallies, their examples."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Integer, and_, bindparam, func, select, tuple_, update
from sqlalchemy.orm import Session, defer

from app.audit.domain import VerdictTally
from app.audit.schemas import Category, SuggestedAction
from app.db import AsyncConnections, compiled
from app.models import Chunk, Example, Job, JobStatus, Verdict

EXPORT_BATCH = 2000


BULKY = (defer(Job.exemplar_sets), defer(Job.report))
"""A job's JSON that can run to megabytes, which a poll does not show: read when used."""


def get_job(session: Session, job_id: uuid.UUID, *, lock: bool = False) -> Job | None:
    return session.get(Job, job_id, with_for_update=lock, options=BULKY)


class PolledJob(NamedTuple):
    """A job's row as a poll reads it: its columns but the `BULKY` ones, in table order. A
    tuple, where a `Job` that belongs to no session would take longer to make than the query
    takes to run."""

    id: uuid.UUID
    workspace_id: uuid.UUID
    dataset_id: uuid.UUID
    status: JobStatus
    student: dict[str, Any]
    config: dict[str, Any]
    webhook_url: str | None
    idempotency_key: str | None
    total: int
    done: int
    highly_known: int
    maybe_known: int
    weakly_known: int
    unknown: int
    flagged: int
    generations: int
    cached_generations: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rescore_of: uuid.UUID | None
    reviews_carried: int | None
    reviews_not_carried: int | None


POLLED_COLUMNS = tuple(Job.__table__.c[name] for name in PolledJob._fields)
POLLED_JOB = compiled(select(*POLLED_COLUMNS).where(Job.id == bindparam("job_id")))


async def fetch_job(connections: AsyncConnections, job_id: uuid.UUID) -> PolledJob | None:
    """`get_job` on the event loop, without the `BULKY` columns."""
    rows = await connections.fetch(POLLED_JOB, {"job_id": job_id})
    if not rows:
        return None
    job = PolledJob(*rows[0])
    return job._replace(status=JobStatus(job.status))


def get_job_by_idempotency_key(session: Session, workspace_id: uuid.UUID, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.workspace_id == workspace_id, Job.idempotency_key == key)
    ).first()


def list_jobs(
    session: Session,
    workspace_id: uuid.UUID,
    status: JobStatus | None,
    after: Job | None,
    limit: int,
) -> Sequence[Job]:
    """The workspace's jobs, newest first; `after` is the last job of the previous page."""
    query = (
        select(Job)
        .options(*BULKY)
        .where(Job.workspace_id == workspace_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < (after.created_at, after.id))
    return session.scalars(query).all()


CATEGORY_COUNTERS: dict[Category, str] = {
    Category.HIGHLY_KNOWN: "highly_known",
    Category.MAYBE_KNOWN: "maybe_known",
    Category.WEAKLY_KNOWN: "weakly_known",
    Category.UNKNOWN: "unknown",
}
"""The job's column that counts each category's verdicts."""


def count_chunk(session: Session, chunk: Chunk) -> None:
    """Add a finished chunk's verdicts (per category, flagged) and generations to its job's
    counters, which polls read instead of counting verdicts.

    Call it once per chunk, in the transaction that writes the chunk's verdicts and marks it
    done, after both: the counters then commit, or roll back, with the verdicts.
    """
    counts = (
        session.execute(
            select(
                func.count().label("done"),
                func.count().filter(Verdict.flagged).label("flagged"),
                *(
                    func.count().filter(Verdict.category == category.value).label(column)
                    for category, column in CATEGORY_COUNTERS.items()
                ),
            ).where(
                Verdict.job_id == chunk.job_id,
                Verdict.position >= chunk.start,
                Verdict.position < chunk.stop,
            )
        )
        .mappings()
        .one()
    )
    session.execute(
        update(Job)
        .where(Job.id == chunk.job_id)
        .values(
            {
                **{column: getattr(Job, column) + n for column, n in counts.items()},
                "generations": Job.generations + chunk.generations,
                "cached_generations": Job.cached_generations + chunk.cached_generations,
            }
        )
    )


def verdict_tallies(session: Session, job: Job) -> list[VerdictTally]:
    """The job's verdicts counted by group, category, flag, suggested action and conflict.

    Summed in the database: the rows grow with the number of groups, not of verdicts.
    """
    group = func.coalesce(Example.group, "")
    action = Verdict.audit["suggested_action"].astext
    generations = func.coalesce(func.sum(Verdict.audit["generations"].astext.cast(Integer)), 0)
    rows = session.execute(
        select(
            group,
            Verdict.category,
            Verdict.flagged,
            action,
            Verdict.conflict,
            func.count(),
            generations,
        )
        .select_from(Verdict)
        .join(
            Example,
            and_(Example.dataset_id == job.dataset_id, Example.position == Verdict.position),
        )
        .where(Verdict.job_id == job.id)
        .group_by(group, Verdict.category, Verdict.flagged, action, Verdict.conflict)
    )
    return [
        VerdictTally(
            group=group_name,
            category=Category(category),
            flagged=flagged,
            suggested_action=SuggestedAction(suggested_action),
            conflict=conflict,
            count=count,
            generations=int(used),
        )
        for group_name, category, flagged, suggested_action, conflict, count, used in rows
    ]


def list_examples(
    session: Session,
    job: Job,
    category: str | None,
    flagged: bool | None,
    after_position: int | None,
    limit: int,
    *,
    conflict: bool | None = None,
) -> Sequence[tuple[Verdict, Example]]:
    """The job's verdicts with their examples, by position."""
    query = (
        select(Verdict, Example)
        .join(
            Example,
            and_(Example.dataset_id == job.dataset_id, Example.position == Verdict.position),
        )
        .where(Verdict.job_id == job.id)
        .order_by(Verdict.position)
        .limit(limit)
    )
    if category is not None:
        query = query.where(Verdict.category == category)
    if flagged is not None:
        query = query.where(Verdict.flagged == flagged)
    if conflict is not None:
        query = query.where(Verdict.conflict == conflict)
    if after_position is not None:
        query = query.where(Verdict.position > after_position)
    return session.execute(query).all()


def count_records(session: Session, job: Job, *, without_flagged: bool) -> int:
    """How many examples of the job's dataset there are, or how many have no flagged verdict."""
    query = select(func.count()).select_from(Example).where(Example.dataset_id == job.dataset_id)
    if without_flagged:
        query = query.outerjoin(
            Verdict, and_(Verdict.job_id == job.id, Verdict.position == Example.position)
        ).where(Verdict.flagged.is_not(True))
    return session.scalar(query) or 0


def iter_records(
    session: Session, job: Job
) -> Iterator[tuple[int, dict[str, Any], dict[str, Any] | None]]:
    """Every example of the job's dataset in upload order (position, record), with its audit
    when it has one.

    Read from a server-side cursor in batches, so memory does not grow with the dataset.
    """
    query = (
        select(Example.position, Example.raw, Verdict.audit)
        .outerjoin(Verdict, and_(Verdict.job_id == job.id, Verdict.position == Example.position))
        .where(Example.dataset_id == job.dataset_id)
        .order_by(Example.position)
        .execution_options(yield_per=EXPORT_BATCH)
    )
    yield from session.execute(query)
