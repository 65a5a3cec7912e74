"""A job's steps as a worker runs them: plan a queued job, run a claimed chunk, finalize.

PostgreSQL is the source of truth for who does what: a worker claims a queued job (row lock,
SKIP LOCKED) or a pending chunk (a lease it renews while it works), and a broker message is only
a hint that there is work to claim. Each step holds the database for short transactions (claim,
read, write) and none while the engine generates; each is safe to run twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import kombu.exceptions
import psycopg
import redis
import sqlalchemy.exc
from sqlalchemy import Connection
from sqlalchemy.orm import Session, defer, sessionmaker

from app.audit import repository
from app.audit.domain import ExemplarSets, exemplar_sets_from_json, exemplar_sets_to_json
from app.audit.schemas import AuditConfig
from app.datasets import service as datasets_service
from app.datasets.domain import Example, parse_record
from app.db import autocommit_connection
from app.jobs import lifecycle
from app.jobs.repository import count_chunk
from app.jobs.service import build_report
from app.logs import job_logging
from app.models import Chunk, ChunkStatus, Job, JobStatus, utcnow
from app.models import Example as ExampleRow
from app.queue import SEND_WEBHOOK, WORK, Queue, QueueUnavailable
from app.reviews.service import carry_decisions
from app.settings import Settings
from app.students.schemas import Student
from workers.engines.base import Engine, EngineRefused, EngineUnavailable, model_id_of
from workers.engines.cached import CachedEngine
from workers.engines.lazy import LazyEngine
from workers.runner import audit_batch

log = logging.getLogger(__name__)

EngineFactory = Callable[[dict[str, Any]], Engine]
"""Gives the engine for a job's stored `student` ({name, engine, model, revision, ...}); raises
`PermanentError`, its message for users, when the worker cannot give that student."""

TRANSIENT: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    psycopg.OperationalError,
    kombu.exceptions.OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    httpx.TransportError,
    QueueUnavailable,
    EngineUnavailable,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """A fault that passes (a lost connection, a restarting server): retry, never fail the job."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, TRANSIENT)


class Stopped(Exception):
    """The chunk is no longer this worker's to finish: its job ended or its lease was lost."""


class PermanentError(Exception):
    """A fault that trying again will not mend; its message is shown to users."""


class ExemplarSetsCache:
    """The exemplar sets of the job whose chunks a worker ran last. A job's sets never change
    once it is planned, and reading and parsing them again for each chunk (a job with many
    groups holds thousands of exemplars) costs more than the chunk's own writes."""

    def __init__(self) -> None:
        self._job_id: uuid.UUID | None = None
        self._sets: ExemplarSets = {}

    def of(self, session: Session, job_id: uuid.UUID) -> ExemplarSets:
        if job_id != self._job_id:
            self._sets = exemplar_sets_from_json(repository.exemplar_sets_json(session, job_id))
            self._job_id = job_id
        return self._sets


def student_model_id(student: dict[str, Any]) -> str:
    """The `model_id` of the engine a job's stored student loads (the worker checks that the
    registry loads that model and revision), before it is loaded."""
    spec = Student.model_validate(student)
    return model_id_of(spec.model, spec.revision)


@dataclass(frozen=True)
class Worker:
    """What a worker's steps need: its name (who holds a lease), and its dependencies."""

    name: str
    sessions: sessionmaker[Session]
    engine_for: EngineFactory
    queue: Queue
    settings: Settings
    exemplar_sets: ExemplarSetsCache = field(default_factory=ExemplarSetsCache)
    model_id_for: Callable[[dict[str, Any]], str] = student_model_id
    """The `model_id` of the engine `engine_for` gives a student, known without loading it:
    the generation cache's keys hold it, and a chunk whose answers are all cached loads none."""


def hint(queue: Queue, count: int) -> None:
    """Tell workers that `count` units of work wait; a lost hint is made good by the sweeper."""
    try:
        for _ in range(count):
            queue.send(WORK)
    except QueueUnavailable as exc:
        log.warning("the broker took no hint (%s); the sweeper sends it again", exc)


def work_once(worker: Worker) -> bool:
    """Do one unit of work: plan the oldest queued job, else run a free chunk. False if none."""
    if plan_next_job(worker):
        return True
    with worker.sessions.begin() as session:
        chunk = repository.claim_chunk(session, worker.name, worker.settings.lease_seconds)
    if chunk is None:
        return False
    with job_logging(str(chunk.job_id)):
        run_claimed_chunk(worker, chunk)
    return True


# --- planning ---------------------------------------------------------------------------------


def plan_next_job(worker: Worker) -> bool:
    """Plan the oldest queued job: draw its exemplar sets, write its chunks, start it."""
    job_id: uuid.UUID | None = None
    try:
        with worker.sessions.begin() as session:
            job = repository.claim_job_to_plan(session)
            if job is None:
                return False
            job_id = job.id
            with job_logging(str(job_id)):
                chunks = plan_job(session, job, worker.settings.chunk_size)
    except Exception as exc:
        if job_id is None or is_transient(exc):
            raise
        log.exception("planning job %s failed", job_id)
        fail_job(worker, job_id, "planning failed with an internal error (see the worker logs)")
        return True
    log.info("job %s planned into %s chunks", job_id, chunks)
    hint(worker.queue, chunks)
    return True


def plan_job(session: Session, job: Job, chunk_size: int) -> int:
    """In the caller's transaction: the job's exemplar sets and chunks; returns the chunks.

    A rescore comes with its source's exemplar sets, and keeps them: its prompts must be the
    very ones whose answers the generation cache holds.
    """
    if job.exemplar_sets is None:
        config = AuditConfig.model_validate(job.config)
        record_format = datasets_service.record_format(session, job.dataset_id)
        sets = repository.draw_exemplar_sets(session, job.dataset_id, record_format, config)
        job.exemplar_sets = exemplar_sets_to_json(sets)
    chunks = repository.add_chunks(session, job.id, job.total, chunk_size)
    lifecycle.start(job)
    return chunks


def to_example(row: ExampleRow, record_format: str) -> Example:
    """The example of a stored row, read in its dataset's format."""
    return parse_record(record_format, row.raw, row.line)


# --- chunks -----------------------------------------------------------------------------------


def run_claimed_chunk(worker: Worker, chunk: repository.ClaimedChunk) -> None:
    """Run a chunk this worker holds, retrying it in place through transient faults.

    A permanent fault fails the job; an unexpected error counts against the chunk, which fails
    the job after `max_chunk_failures`. Past `transient_retry_seconds` the chunk is left to its
    lease: once that runs out, the sweeper hands it out again.
    """
    settings = worker.settings
    deadline = time.monotonic() + settings.transient_retry_seconds
    delay = 0.5
    while True:
        try:
            run_chunk(worker, chunk)
            break
        except Stopped as exc:
            log.info("chunk %s of job %s stopped: %s", chunk.index, chunk.job_id, exc)
            return
        except PermanentError as exc:
            log.exception("chunk %s of job %s failed", chunk.index, chunk.job_id)
            fail_job(worker, chunk.job_id, str(exc))
            return
        except EngineRefused:
            log.exception("chunk %s of job %s: the engine refused", chunk.index, chunk.job_id)
            fail_job(
                worker, chunk.job_id, "the student's engine refused a request (see the worker logs)"
            )
            return
        except Exception as exc:
            if not is_transient(exc):
                count_failure(worker, chunk, exc)
                return
            if time.monotonic() > deadline:
                log.warning(
                    "chunk %s: still failing (%s); leaving it to its lease", chunk.index, exc
                )
                return
            log.warning("chunk %s: transient fault (%s); again in %.1f s", chunk.index, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            try:
                with worker.sessions.begin() as session:
                    again = repository.claim_chunk(
                        session,
                        worker.name,
                        settings.lease_seconds,
                        only=(chunk.job_id, chunk.index),
                    )
            except Exception as retry_exc:
                if not is_transient(retry_exc):
                    raise
                continue  # the database is still away: the loop waits and tries again
            if again is None:
                return  # done by another worker, or its job ended
    finalize_when_done(worker, chunk.job_id)


def run_chunk(worker: Worker, chunk: repository.ClaimedChunk) -> None:
    """Audit the chunk's examples and write their verdicts: read, generate, write, each apart."""
    with worker.sessions() as session:
        job = session.get(Job, chunk.job_id, options=[defer(Job.exemplar_sets)])
        if job is None or job.status != JobStatus.RUNNING:
            raise Stopped(f"the job is {job.status.value if job else 'gone'}")
        config = AuditConfig.model_validate(job.config)
        student = dict(job.student)
        namespace = str(job.workspace_id)
        sets = worker.exemplar_sets.of(session, job.id)
        record_format = datasets_service.record_format(session, job.dataset_id)
        rows = list(repository.iter_examples(session, job.dataset_id, chunk.start, chunk.stop))
        positions = [row.position for row in rows]
        examples = [to_example(row, record_format) for row in rows]

    started = time.monotonic()
    with (
        autocommit_connection(worker.sessions) as connection,
        Lease(worker, chunk, connection) as lease,
    ):
        engine = CachedEngine(
            # Loaded only if an answer is missing from the cache: a rescore in full mode never.
            LazyEngine(lambda: load_engine(worker, student), worker.model_id_for(student)),
            repository.SqlGenerationStore(connection),
            namespace=namespace,
        )
        try:
            result = audit_batch(
                examples,
                sets,
                engine,
                config,
                call_generations=worker.settings.engine_call_generations,
                checkpoint=lease.check,
            )
        finally:
            engine.save()  # what the engine made stays for a later run, however this one ended

    with worker.sessions.begin() as session:
        status = repository.lock_job_status(session, chunk.job_id)
        if status != JobStatus.RUNNING:
            raise Stopped(f"the job is {status.value if status else 'gone'}")
        row = session.get(Chunk, (chunk.job_id, chunk.index), with_for_update=True)
        if row is None or row.status == ChunkStatus.DONE:
            return  # another worker finished it while this one was away
        repository.write_verdicts(
            session,
            chunk.job_id,
            list(zip(positions, result.verdicts, result.tallies, strict=True)),
        )
        row.status = ChunkStatus.DONE
        row.claimed_by = row.lease_expires_at = None
        row.generations = engine.new_generations
        row.cached_generations = engine.cached_generations
        row.engine_calls = result.stats.engine_calls
        row.engine_seconds = result.stats.engine_seconds
        row.seconds = time.monotonic() - started
        row.finished_at = utcnow()
        count_chunk(session, row)


def load_engine(worker: Worker, student: dict[str, Any]) -> Engine:
    name = student.get("name", student.get("model"))
    try:
        return worker.engine_for(student)
    except PermanentError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise
        log.exception("loading the student %s (%s) failed", name, student.get("model"))
        # The user sees the student's name, never the path or server that failed.
        raise PermanentError(
            f"the student {name!r} could not be loaded by the {student.get('engine')} engine"
        ) from exc


def count_failure(worker: Worker, chunk: repository.ClaimedChunk, exc: Exception) -> None:
    """An unexpected error: the chunk is tried again (by any worker) up to the limit."""
    log.error("chunk %s of job %s failed", chunk.index, chunk.job_id, exc_info=exc)
    with worker.sessions.begin() as session:
        failures = repository.add_failure(session, chunk)
    limit = worker.settings.max_chunk_failures
    if failures >= limit:
        fail_job(
            worker,
            chunk.job_id,
            f"chunk {chunk.index} failed {failures} times with an internal error "
            "(see the worker logs)",
        )
    else:
        hint(worker.queue, 1)


class Lease:
    """Keeps a claimed chunk's lease alive while the worker generates, from a thread of its own.

    `check()` is the runner's checkpoint between engine calls: it raises `Stopped` once the job
    is no longer running (a cancel) or the lease went to another worker. It reads on
    `connection`, the chunk's own (in autocommit mode), and leaves renewing to the thread.
    """

    def __init__(
        self, worker: Worker, chunk: repository.ClaimedChunk, connection: Connection
    ) -> None:
        self.worker = worker
        self.chunk = chunk
        self.connection = connection
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        interval = self.worker.settings.lease_seconds / 4
        while not self._done.wait(interval):
            try:
                self.renew()
            except Exception as exc:  # a blip: the lease still runs, the next beat tries again
                log.warning("renewing the lease of chunk %s failed: %s", self.chunk.index, exc)

    def renew(self) -> None:
        with self.worker.sessions.begin() as session:
            status = repository.renew_lease(
                session, self.chunk, self.worker.name, self.worker.settings.lease_seconds
            )
        self._note(status)

    def check(self) -> None:
        self._note(repository.held_job_status(self.connection, self.chunk, self.worker.name))
        if self.lost:
            raise Stopped(self.lost)

    def _note(self, status: JobStatus | None) -> None:
        """Take note of the job's status, None when the lease is no longer this worker's."""
        if status is None:
            self.lost = "its lease went to another worker"
        elif status != JobStatus.RUNNING:
            self.lost = f"the job is {status.value}"


# --- the end of a job -------------------------------------------------------------------------


def finalize_when_done(worker: Worker, job_id: uuid.UUID) -> None:
    """Finish the job if no chunk is left; a fault here is left to the sweeper."""
    try:
        finalize_job(worker, job_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("finalizing job %s failed (%s); the sweeper finishes it", job_id, exc)


def finalize_job(worker: Worker, job_id: uuid.UUID) -> None:
    """Write the report and mark the job succeeded, once every chunk is done."""
    with worker.sessions.begin() as session:
        # Asked before the lock, which every chunk's end would otherwise take in turn: a chunk
        # that is done stays done, so the answer holds.
        if repository.has_pending_chunks(session, job_id):
            return
        job = repository.lock_job(session, job_id)
        if job is None or job.status != JobStatus.RUNNING:
            return
        lifecycle.succeed(job)
        report = build_report(session, job)
        job.report = report.model_dump(mode="json")
        carry_decisions(session, job)
    log.info("job %s succeeded: %s examples", job_id, report.num_examples)
    notify(worker.queue, job)


def fail_job(worker: Worker, job_id: uuid.UUID, error: str) -> None:
    """Fail the job with an error for users, unless it has already ended."""
    with worker.sessions.begin() as session:
        job = repository.lock_job(session, job_id)
        if job is None or job.status.finished:
            return
        lifecycle.fail(job, error)
    log.warning("job %s failed: %s", job_id, error)
    notify(worker.queue, job)


def notify(queue: Queue, job: Job) -> None:
    """Enqueue the job's webhook, if it has one; call after the commit that finished it."""
    if job.webhook_url:
        try:
            queue.send(SEND_WEBHOOK, str(job.id))
        except QueueUnavailable as exc:
            log.error("job %s: the webhook could not be queued: %s", job.id, exc)


# --- the sweeper ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    finalized: int
    hinted: int


def sweep(worker: Worker) -> Sweep | None:
    """Bring back what faults left behind; None when another worker's sweeper holds the turn.

    Finishes running jobs whose chunks are all done, and tops the broker up with one hint per
    unit of work that no message announces (a job queued while the broker was down, a chunk
    whose lease ran out, messages lost in a broker restart).
    """
    with worker.sessions.begin() as session:
        if not repository.try_sweep_lock(session):
            return None
        done = repository.jobs_to_finalize(session)
        claimable = repository.claimable_work(session)
    for job_id in done:
        finalize_job(worker, job_id)
    waiting = worker.queue.depth()
    missing = max(claimable - waiting, 0) if waiting is not None else 0
    if missing:
        log.info("sweeper: %s units of work without a message; sending hints", missing)
        hint(worker.queue, missing)
    return Sweep(len(done), missing)


def release_leases(worker: Worker) -> None:
    """On a clean shutdown: give this worker's chunks back at once instead of at lease end."""
    with worker.sessions.begin() as session:
        repository.release_worker_leases(session, worker.name)
