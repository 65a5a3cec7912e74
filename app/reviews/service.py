"""Review use cases: decide on one flagged example or on many at once, and carry decisions over
to another job of the same dataset."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.datasets.domain import MAX_REPORTED_ERRORS
from app.errors import Conflict, InvalidFields, NotFound
from app.jobs import repository as jobs_repository
from app.jobs import service as jobs_service
from app.jobs.schemas import ExampleRead
from app.models import Job
from app.reviews import repository
from app.reviews.schemas import ReviewBatch, ReviewBatchRead, ReviewItem, ReviewUpdate
from app.workspaces.service import Caller

REVIEWABLE = jobs_service.EXPORTABLE
ANONYMOUS = "anonymous"
"""Who decided, for requests without a key (where the operator allows them)."""
NOT_FLAGGED = "example {position} is not flagged: only flagged examples are reviewed"


def _reviewable(session: Session, workspace_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    """The workspace's job, locked: decisions on one job are stored one request at a time, and
    the job cannot be deleted under them."""
    job = jobs_service.find_job(session, workspace_id, job_id, lock=True)
    if job.status not in REVIEWABLE:
        raise Conflict(
            f"job {job_id} is {job.status.value}: only a succeeded or cancelled job is reviewed"
        )
    return job


def _save(
    session: Session, job: Job, decisions: Sequence[tuple[int, ReviewUpdate]], caller: Caller
) -> None:
    """Store the decisions as made by `caller`, with its key (or anonymously)."""
    name = caller.key_name if caller.key_name is not None else ANONYMOUS
    repository.save_reviews(session, job.id, decisions, caller.key_id, name)


def review_example(
    session: Session,
    caller: Caller,
    job_id: uuid.UUID,
    position: int,
    update: ReviewUpdate,
) -> ExampleRead:
    """Store the decision on the flagged example at `position`; returns the example with it.

    404 when the job has no verdict there; 422 when the example is not flagged.
    """
    job = _reviewable(session, caller.workspace.id, job_id)
    flagged = repository.flagged_at(session, job.id, [position]).get(position)
    if flagged is None:
        raise NotFound(f"job {job_id} has no audited example at position {position}")
    if not flagged:
        raise InvalidFields([(["path", "position"], NOT_FLAGGED.format(position=position))])
    _save(session, job, [(position, update)], caller)
    return jobs_service.get_example(session, caller.workspace.id, job_id, position)


def review_examples(
    session: Session,
    caller: Caller,
    job_id: uuid.UUID,
    batch: ReviewBatch,
) -> ReviewBatchRead:
    """Store every decision of the batch, or none: 422 naming each item at fault (its index and
    field, up to MAX_REPORTED_ERRORS), for a position without a verdict, one not flagged, or one
    given twice."""
    job = _reviewable(session, caller.workspace.id, job_id)
    positions = [item.position for item in batch.items]
    problems = _problems(job_id, batch.items, repository.flagged_at(session, job.id, positions))
    if problems:
        raise InvalidFields(problems)
    _save(session, job, [(item.position, item) for item in batch.items], caller)
    reviews = jobs_service.get_job(session, caller.workspace, job_id).reviews
    return ReviewBatchRead(updated=len(batch.items), reviews=reviews)


def _problems(
    job_id: uuid.UUID, items: Sequence[ReviewItem], flagged: dict[int, bool]
) -> list[tuple[list[str | int], str]]:
    problems: list[tuple[list[str | int], str]] = []
    first: dict[int, int] = {}
    for index, item in enumerate(items):
        position = item.position
        earlier = first.setdefault(position, index)
        if earlier != index:
            message = f"position {position} is also item {earlier}'s: one decision an example"
        elif position not in flagged:
            message = f"job {job_id} has no audited example at position {position}"
        elif not flagged[position]:
            message = NOT_FLAGGED.format(position=position)
        else:
            continue
        problems.append((["body", "items", index, "position"], message))
        if len(problems) == MAX_REPORTED_ERRORS:
            break
    return problems


def copy_decisions(session: Session, source: Job, target: Job) -> int:
    """Give `target` the decisions made on `source` (a job of the same dataset, say the one it
    re-scores), example by example; returns how many were copied.

    A decision is copied where the target's example at the same position is flagged and has no
    decision yet; an `accept` only where the target suggests the answer that was accepted. Who
    decided, when and why are kept. The caller commits.
    """
    if source.dataset_id != target.dataset_id:
        raise ValueError(
            f"jobs {source.id} and {target.id} audit different datasets: their positions name "
            "different examples"
        )
    return repository.copy_reviews(session, source.id, target.id)


def carry_decisions(session: Session, job: Job) -> None:
    """When a rescore succeeds: copy its source job's decisions onto it (`copy_decisions`), and
    count on it those copied and those left behind. Nothing for a job that is no rescore, or
    whose source is gone. The caller commits."""
    if job.rescore_of is None:
        return
    source = jobs_repository.get_job(session, job.rescore_of)
    if source is None:
        return
    made = sum(repository.decision_counts(session, [source.id]).get(source.id, {}).values())
    job.reviews_carried = copy_decisions(session, source, job)
    job.reviews_not_carried = made - job.reviews_carried
