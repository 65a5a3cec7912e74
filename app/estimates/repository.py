"""Estimate queries: the examples whose requests are looked up, the pace workers measured on a
student."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Chunk, ChunkStatus, Example, Job
from app.students.schemas import RegisteredStudent

RATE_CHUNKS = 20
"""How many of the student's latest chunks its rate is measured on."""


def examples_at(
    session: Session, dataset_id: uuid.UUID, positions: Sequence[int]
) -> Sequence[Example]:
    """The dataset's examples at these positions, in position order."""
    return session.scalars(
        select(Example)
        .where(Example.dataset_id == dataset_id, Example.position.in_(positions))
        .order_by(Example.position)
    ).all()


def generation_rate(
    session: Session, workspace_id: uuid.UUID, student: RegisteredStudent
) -> tuple[int, float, int]:
    """(new completions, engine seconds, chunks) summed over the latest chunks that generated
    something, of the workspace's jobs on this student's engine, model and revision."""
    revision = Job.student["revision"].astext
    latest = (
        select(Chunk.generations, Chunk.engine_seconds)
        .join(Job, Job.id == Chunk.job_id)
        .where(
            Job.workspace_id == workspace_id,
            Job.student["engine"].astext == student.engine,
            Job.student["model"].astext == student.model,
            revision.is_(None) if student.revision is None else revision == student.revision,
            Chunk.status == ChunkStatus.DONE,
            Chunk.generations > 0,
        )
        .order_by(Chunk.finished_at.desc())
        .limit(RATE_CHUNKS)
        .subquery()
    )
    generations, seconds, chunks = session.execute(
        select(
            func.coalesce(func.sum(latest.c.generations), 0),
            func.coalesce(func.sum(latest.c.engine_seconds), 0.0),
            func.count(),
        )
    ).one()
    return int(generations), float(seconds), int(chunks)
