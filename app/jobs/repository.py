"""Job queries: the jobs, their verdict and generation counts, their examples."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Integer, and_, func, select, tuple_
from sqlalchemy.orm import Session

from app.audit.domain import VerdictTally
from app.audit.schemas import Category, SuggestedAction
from app.models import Chunk, Example, Job, JobStatus, Verdict

EXPORT_BATCH = 2000


def get_job(session: Session, job_id: uuid.UUID, *, lock: bool = False) -> Job | None:
    return session.get(Job, job_id, with_for_update=lock)


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
        .where(Job.workspace_id == workspace_id)
        .order_by(Job.created_at.desc(), Job.id.desc())
        .limit(limit)
    )
    if status is not None:
        query = query.where(Job.status == status)
    if after is not None:
        query = query.where(tuple_(Job.created_at, Job.id) < (after.created_at, after.id))
    return session.scalars(query).all()


def verdict_counts(
    session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[str, bool, int]]]:
    """Per job: (category, flagged, count) for each combination that has verdicts."""
    rows = session.execute(
        select(Verdict.job_id, Verdict.category, Verdict.flagged, func.count())
        .where(Verdict.job_id.in_(job_ids))
        .group_by(Verdict.job_id, Verdict.category, Verdict.flagged)
    )
    counts: dict[uuid.UUID, list[tuple[str, bool, int]]] = {}
    for job_id, category, flagged, n in rows:
        counts.setdefault(job_id, []).append((category, flagged, n))
    return counts


def generation_totals(
    session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[int, int]]:
    """Per job: (new, cached) completions summed over its chunks."""
    rows = session.execute(
        select(Chunk.job_id, func.sum(Chunk.generations), func.sum(Chunk.cached_generations))
        .where(Chunk.job_id.in_(job_ids))
        .group_by(Chunk.job_id)
    )
    return {job_id: (int(new), int(cached)) for job_id, new, cached in rows}


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
