"""Queries the audit workers run: chunks, verdict upserts, the generation cache."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.models import Chunk, ChunkStatus, Example, Generation, Job, JobStatus, Verdict, utcnow


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id, with_for_update=True)


def queued_job_ids(session: Session) -> list[uuid.UUID]:
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED)))


def iter_examples(
    session: Session, dataset_id: uuid.UUID, start: int = 0, stop: int | None = None
) -> Iterator[Example]:
    query = (
        select(Example)
        .where(Example.dataset_id == dataset_id, Example.position >= start)
        .order_by(Example.position)
    )
    if stop is not None:
        query = query.where(Example.position < stop)
    yield from session.scalars(query.execution_options(yield_per=5000))


def add_chunks(session: Session, job_id: uuid.UUID, total: int, size: int) -> int:
    starts = range(0, total, size)
    session.add_all(
        Chunk(job_id=job_id, index=i, start=start, stop=min(start + size, total))
        for i, start in enumerate(starts)
    )
    return len(starts)


def pending_chunks(session: Session, job_id: uuid.UUID) -> list[int]:
    return list(
        session.scalars(
            select(Chunk.index)
            .where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.PENDING)
            .order_by(Chunk.index)
        )
    )


def get_chunk(session: Session, job_id: uuid.UUID, index: int) -> Chunk | None:
    return session.get(Chunk, (job_id, index))


def upsert_verdicts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write verdicts; a chunk run again overwrites its own rows instead of adding more."""
    if not rows:
        return
    statement = insert(Verdict).values(list(rows))
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Verdict.job_id, Verdict.position],
            set_={
                c: statement.excluded[c]
                for c in ("category", "flagged", "conflict", "audit", "answers")
            },
        )
    )


def mark_failed(session: Session, job_id: uuid.UUID, error: str) -> Job | None:
    """Fail the job unless it already finished; returns it when this call failed it."""
    job = lock_job(session, job_id)
    if job is None or job.status.finished:
        return None
    job.status, job.error, job.finished_at = JobStatus.FAILED, error, utcnow()
    return job


class SqlGenerationStore:
    """The generation cache in PostgreSQL. Writes join the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]:
        found: dict[bytes, list[str]] = {}
        for start in range(0, len(keys), 5000):
            batch = keys[start : start + 5000]
            rows = self.session.execute(
                select(Generation.key, Generation.texts).where(Generation.key.in_(batch))
            )
            found.update({key: texts for key, texts in rows})
        return found

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None:
        rows = [{"key": k, "model_id": model_id, "texts": v} for k, v in items.items()]
        for start in range(0, len(rows), 5000):
            self.session.execute(
                insert(Generation).values(rows[start : start + 5000]).on_conflict_do_nothing()
            )
