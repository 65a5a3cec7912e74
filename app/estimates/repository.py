"""Estimate queries: the pace workers measured on a student."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Chunk, ChunkStatus, Job
from app.students.schemas import RegisteredStudent

RATE_CHUNKS = 20
"""How many of the student's latest chunks its rate is measured on."""


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
