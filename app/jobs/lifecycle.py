"""The job state machine: every status change goes through a named transition here.

queued ──start──> running ──succeed──> succeeded
  │                 │
  ├──fail───────────┼──fail──> failed
  └──cancel─────────┴──cancel─> cancelled
"""

from __future__ import annotations

from app.errors import Conflict
from app.models import Job, JobStatus, utcnow

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class InvalidTransition(Conflict):
    """The job cannot move to that status from the one it has."""


def can_move(current: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[current]


def _move(job: Job, target: JobStatus) -> None:
    if not can_move(job.status, target):
        raise InvalidTransition(f"job {job.id} is already {job.status.value}")
    job.status = target
    if target.finished:
        job.finished_at = utcnow()


def start(job: Job) -> None:
    """Planned: its chunks exist and workers may claim them."""
    _move(job, JobStatus.RUNNING)
    job.started_at = utcnow()


def succeed(job: Job) -> None:
    _move(job, JobStatus.SUCCEEDED)


def fail(job: Job, error: str) -> None:
    """`error` is shown to users: short, with no SQL, internal address or response body."""
    _move(job, JobStatus.FAILED)
    job.error = error


def cancel(job: Job) -> None:
    _move(job, JobStatus.CANCELLED)
