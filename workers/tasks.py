"""Celery tasks: thin wrappers that open a session and call the steps in `workers.jobs`.

Run a worker with `kma worker` (one process per GPU, solo pool).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery.signals import worker_ready

from app.audit import repository
from app.db import get_sessionmaker
from app.queue import PLAN_JOB, RUN_CHUNK, get_queue, make_celery
from app.settings import get_settings
from workers import jobs
from workers.engines import load_engine
from workers.engines.base import Engine

log = logging.getLogger(__name__)

celery = make_celery(get_settings().broker_url or "redis://")

_loaded: dict[tuple[str, str, str | None], Engine] = {}


def engine_for(student: dict[str, Any]) -> Engine:
    """The student's engine, loaded once per worker process; one model held at a time."""
    key = (student.get("engine", "auto"), student["model"], student.get("revision"))
    if key not in _loaded:
        _loaded.clear()
        log.info("loading %s on engine %s", key[1], key[0])
        _loaded[key] = load_engine(key[0], key[1], revision=key[2])
    return _loaded[key]


@worker_ready.connect
def plan_queued_jobs(**_: Any) -> None:
    """Queue again the jobs the broker never took (it was down when they were submitted)."""
    with get_sessionmaker()() as session:
        for job_id in repository.queued_job_ids(session):
            get_queue().send(PLAN_JOB, str(job_id))


@celery.task(name=PLAN_JOB)
def plan_job(job_id: str) -> None:
    with get_sessionmaker()() as session:
        try:
            jobs.plan_job(session, uuid.UUID(job_id), get_queue(), get_settings().chunk_size)
        except Exception as exc:
            log.exception("planning job %s failed", job_id)
            jobs.fail_job(session, uuid.UUID(job_id), f"planning failed: {exc}")


@celery.task(name=RUN_CHUNK)
def run_chunk(job_id: str, index: int) -> None:
    with get_sessionmaker()() as session:
        try:
            jobs.run_chunk(session, uuid.UUID(job_id), index, engine_for)
        except Exception as exc:
            log.exception("chunk %s of job %s failed", index, job_id)
            jobs.fail_job(session, uuid.UUID(job_id), f"chunk {index} failed: {exc}")
