"""A job's steps as the worker runs them: plan it into chunks, audit a chunk, finalize.

Each step takes ids, does its work in one transaction and commits; each is safe to run twice
(a task redelivered after its worker died). Celery calls these from `workers.tasks`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from app.audit import repository
from app.audit.domain import draw_exemplar_sets, exemplar_sets_from_json, exemplar_sets_to_json
from app.audit.schemas import AuditConfig
from app.datasets import service as datasets_service
from app.datasets.domain import Example, parse_record
from app.jobs.service import build_report
from app.models import ChunkStatus, Job, JobStatus, utcnow
from app.models import Example as ExampleRow
from app.queue import RUN_CHUNK, SEND_WEBHOOK, Queue
from workers.engines.base import Engine
from workers.engines.cached import CachedEngine
from workers.runner import audit_batch

log = logging.getLogger(__name__)

EngineFactory = Callable[[dict[str, Any]], Engine]
"""Gives the engine for a job's `student` spec ({model, engine, revision})."""


def to_example(row: ExampleRow, record_format: str) -> Example:
    """The example of a stored row, read in its dataset's format."""
    return parse_record(record_format, row.raw, row.line)


def dataset_format(session: Session, dataset_id: uuid.UUID) -> str:
    return datasets_service.get_dataset(session, dataset_id).format


def plan_job(session: Session, job_id: uuid.UUID, queue: Queue, chunk_size: int) -> None:
    """Draw the exemplar sets, split the job into chunks and enqueue them."""
    job = repository.lock_job(session, job_id)
    if job is None or job.status.finished:
        return
    if job.status == JobStatus.QUEUED:
        config = AuditConfig.model_validate(job.config)
        record_format = dataset_format(session, job.dataset_id)
        examples = [
            to_example(r, record_format) for r in repository.iter_examples(session, job.dataset_id)
        ]
        job.exemplar_sets = exemplar_sets_to_json(draw_exemplar_sets(examples, config))
        repository.add_chunks(session, job.id, len(examples), chunk_size)
        job.status = JobStatus.RUNNING
        job.started_at = utcnow()
    # A plan that ran before and died before enqueueing sends what is still pending; a chunk
    # sent twice finds itself done and returns.
    pending = repository.pending_chunks(session, job.id)
    session.commit()
    for index in pending:
        queue.send(RUN_CHUNK, str(job_id), index)


def run_chunk(
    session: Session, job_id: uuid.UUID, index: int, engine_for: EngineFactory, queue: Queue
) -> None:
    """Audit one chunk and upsert its verdicts; the last chunk to finish finalizes the job."""
    job = repository.lock_job(session, job_id)
    chunk = repository.get_chunk(session, job_id, index)
    if job is None or chunk is None or job.status != JobStatus.RUNNING:
        return
    if chunk.status == ChunkStatus.DONE:
        session.rollback()
        finalize_job(session, job_id, queue)
        return
    chunk.attempts += 1
    config = AuditConfig.model_validate(job.config)
    student, dataset_id = dict(job.student), job.dataset_id
    record_format = dataset_format(session, dataset_id)
    sets = exemplar_sets_from_json(job.exemplar_sets or {})
    session.commit()  # releases the job row while the chunk runs

    started = time.monotonic()
    rows = list(repository.iter_examples(session, dataset_id, chunk.start, chunk.stop))
    engine = CachedEngine(engine_for(student), repository.SqlGenerationStore(session))
    result = audit_batch([to_example(r, record_format) for r in rows], sets, engine, config)
    repository.upsert_verdicts(
        session,
        [
            {
                "job_id": job_id,
                "position": row.position,
                "category": verdict.audit.category.value,
                "flagged": verdict.audit.flagged,
                "conflict": verdict.conflict,
                "audit": verdict.audit.model_dump(mode="json"),
                "answers": {"greedy": tally.greedy, "samples": tally.samples},
            }
            for row, tally, verdict in zip(rows, result.tallies, result.verdicts, strict=True)
        ],
    )
    chunk = repository.get_chunk(session, job_id, index)
    assert chunk is not None
    chunk.status = ChunkStatus.DONE
    chunk.generations = engine.new_generations
    chunk.cached_generations = engine.cached_generations
    chunk.engine_calls = result.stats.engine_calls
    chunk.engine_seconds = result.stats.engine_seconds
    chunk.seconds = time.monotonic() - started
    chunk.finished_at = utcnow()
    session.commit()
    finalize_job(session, job_id, queue)


def finalize_job(session: Session, job_id: uuid.UUID, queue: Queue) -> None:
    """Write the report and mark the job succeeded, once every chunk is done."""
    job = repository.lock_job(session, job_id)
    if job is None or job.status != JobStatus.RUNNING or repository.pending_chunks(session, job_id):
        session.rollback()
        return
    job.status = JobStatus.SUCCEEDED
    job.finished_at = utcnow()
    report = build_report(session, job)
    job.report = report.model_dump(mode="json")
    session.commit()
    log.info("job %s succeeded: %s examples", job_id, report.num_examples)
    notify(job, queue)


def fail_job(session: Session, job_id: uuid.UUID, error: str, queue: Queue) -> None:
    session.rollback()
    job = repository.mark_failed(session, job_id, error)
    session.commit()
    if job is not None:
        notify(job, queue)


def notify(job: Job, queue: Queue) -> None:
    """Enqueue the job's webhook, if it has one; call after the commit that finished it."""
    if job.webhook_url:
        queue.send(SEND_WEBHOOK, str(job.id))
