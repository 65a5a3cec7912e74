"""Celery tasks: thin wrappers that open a session and call the steps in `workers.jobs`.

Run a worker with `kma worker` (one process per GPU, solo pool).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import httpx
from celery.signals import worker_ready, worker_shutdown

from app.audit import repository
from app.db import get_sessionmaker
from app.jobs import service as jobs_service
from app.logs import job_logging
from app.queue import PLAN_JOB, RUN_CHUNK, SEND_WEBHOOK, get_queue, make_celery
from app.settings import get_settings
from app.webhooks import SIGNATURE_HEADER, sign
from workers import jobs
from workers.engines import load_engine
from workers.engines.base import Engine

log = logging.getLogger(__name__)

celery = make_celery(get_settings().broker_url or "redis://")

_loaded: dict[tuple[str, str, str | None, str | None], Engine] = {}


def engine_for(student: dict[str, Any]) -> Engine:
    """The student's engine, loaded once per worker process; one model held at a time."""
    key = (
        student.get("engine", "auto"),
        student["model"],
        student.get("revision"),
        student.get("base_url"),
    )
    if key not in _loaded:
        close_engines()
        log.info("loading %s on engine %s", key[1], key[0])
        options = {"base_url": key[3]} if key[3] else {}  # jobs give one only for openai
        _loaded[key] = load_engine(key[0], key[1], revision=key[2], **options)
    return _loaded[key]


@worker_shutdown.connect
def close_engines(**_: Any) -> None:
    for engine in _loaded.values():
        engine.close()
    _loaded.clear()


@worker_ready.connect
def plan_queued_jobs(**_: Any) -> None:
    """Queue again the jobs the broker never took (it was down when they were submitted)."""
    with get_sessionmaker()() as session:
        for job_id in repository.queued_job_ids(session):
            get_queue().send(PLAN_JOB, str(job_id))


@celery.task(name=PLAN_JOB)
def plan_job(job_id: str) -> None:
    with job_logging(job_id), get_sessionmaker()() as session:
        try:
            jobs.plan_job(session, uuid.UUID(job_id), get_queue(), get_settings().chunk_size)
        except Exception as exc:
            log.exception("planning job %s failed", job_id)
            jobs.fail_job(session, uuid.UUID(job_id), f"planning failed: {exc}", get_queue())


@celery.task(name=RUN_CHUNK)
def run_chunk(job_id: str, index: int) -> None:
    with job_logging(job_id), get_sessionmaker()() as session:
        try:
            jobs.run_chunk(session, uuid.UUID(job_id), index, engine_for, get_queue())
        except Exception as exc:
            log.exception("chunk %s of job %s failed", index, job_id)
            jobs.fail_job(session, uuid.UUID(job_id), f"chunk {index} failed: {exc}", get_queue())


@celery.task(name=SEND_WEBHOOK, bind=True, acks_late=False)
def send_webhook(task: Any, job_id: str) -> None:
    """POST the job's JSON to its webhook, signed; retried with doubling waits."""
    settings = get_settings()
    with job_logging(job_id):
        with get_sessionmaker()() as session:
            job = jobs_service.get_job(session, uuid.UUID(job_id))
        if not job.webhook_url:
            return
        try:
            body = job.model_dump_json().encode()
            deliver_webhook(job.webhook_url, body, settings.webhook_secret)
            log.info("webhook delivered to %s", job.webhook_url)
        except httpx.HTTPError as exc:
            attempt = task.request.retries + 1
            if attempt >= settings.webhook_attempts:
                log.error("webhook gave up after %s attempts: %s", attempt, exc)
                return
            wait = min(settings.webhook_backoff_seconds * 2**task.request.retries, 300)
            log.warning("webhook attempt %s failed (%s); again in %.1f s", attempt, exc, wait)
            raise task.retry(countdown=wait, max_retries=settings.webhook_attempts) from exc


def deliver_webhook(url: str, body: bytes, secret: str) -> None:
    response = httpx.post(
        url,
        content=body,
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(body, secret)},
        timeout=10,
    )
    response.raise_for_status()
