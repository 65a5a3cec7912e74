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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
from workers.runner import BatchResult, TimedEngine, audit_batch

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


class Writes:
    """Where a worker's chunk writes run: here and now, or (`pipelined`) in a writer thread, so
    that the engine generates the next chunk while the last one's verdicts are written.

    At most one write is outstanding: handing another waits for it (back-pressure, and the
    order of a worker's writes is the order of its chunks). A write handles its own faults
    (retries, the chunk's failures); one that escapes is logged. `drain()` waits for the
    outstanding write, as a clean shutdown must before it gives the worker's leases back.
    """

    def __init__(self, *, pipelined: bool = False) -> None:
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-writer")
            if pipelined
            else None
        )
        self._outstanding: Future[None] | None = None

    def hand(self, job_id: uuid.UUID, write: Callable[[], None]) -> None:
        if self._executor is None:
            write()
            return
        self.drain()
        self._outstanding = self._executor.submit(_logged, job_id, write)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for the outstanding write; False if it is still running after `timeout`."""
        outstanding = self._outstanding
        if outstanding is None:
            return True
        try:
            outstanding.result(timeout)
        except TimeoutError:
            return False
        self._outstanding = None
        return True


def _logged(job_id: uuid.UUID, write: Callable[[], None]) -> None:
    with job_logging(str(job_id)):
        try:
            write()
        except Exception:
            log.exception(
                "a chunk write of job %s failed; its lease and the sweeper mend it", job_id
            )


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
    writes: Writes = field(default_factory=Writes)


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
    """Run a chunk this worker holds: generate and judge its examples here, then hand its write
    to `worker.writes` (a thread of its own in a pipelined worker, so that the next chunk
    generates while this one writes). The lease is renewed until the write commits or is given
    up; a worker that dies before that loses nothing committed, and the sweeper hands the chunk
    out again once the lease runs out.
    """
    lease = Lease(worker, chunk)
    lease.start()
    try:
        judged = retrying(worker, chunk, lambda: judge_chunk(worker, chunk, lease))
    except BaseException:
        lease.stop()
        raise
    if judged is None:
        lease.stop()
        return
    worker.writes.hand(chunk.job_id, lambda: write_and_finalize(worker, chunk, judged, lease))


def run_chunk(worker: Worker, chunk: repository.ClaimedChunk) -> None:
    """Audit the chunk's examples and write their verdicts, here and now, without retries:
    read, generate, write, each apart."""
    with Lease(worker, chunk) as lease:
        write_chunk(worker, chunk, judge_chunk(worker, chunk, lease))


def write_and_finalize(
    worker: Worker, chunk: repository.ClaimedChunk, judged: JudgedChunk, lease: Lease
) -> None:
    """The second half of a chunk: write it (retried through transient faults), give up its
    lease, and finish the job if it was the last."""
    try:
        written = retrying(worker, chunk, lambda: write_chunk(worker, chunk, judged))
    finally:
        lease.stop()
    if written is not None:
        finalize_when_done(worker, chunk.job_id)


T = TypeVar("T")


def retrying(worker: Worker, chunk: repository.ClaimedChunk, step: Callable[[], T]) -> T | None:
    """Run one step of a chunk this worker holds, again in place through transient faults; None
    when the chunk is left: stopped, failed, done by another worker, or left to its lease.

    A permanent fault fails the job; an unexpected error counts against the chunk, which fails
    the job after `max_chunk_failures`. Past `transient_retry_seconds` the chunk is left to its
    lease: once that runs out, the sweeper hands it out again.
    """
    settings = worker.settings
    deadline = time.monotonic() + settings.transient_retry_seconds
    delay = 0.5
    while True:
        try:
            return step()
        except Stopped as exc:
            log.info("chunk %s of job %s stopped: %s", chunk.index, chunk.job_id, exc)
            return None
        except PermanentError as exc:
            log.exception("chunk %s of job %s failed", chunk.index, chunk.job_id)
            fail_job(worker, chunk.job_id, str(exc))
            return None
        except EngineRefused:
            log.exception("chunk %s of job %s: the engine refused", chunk.index, chunk.job_id)
            fail_job(
                worker, chunk.job_id, "the student's engine refused a request (see the worker logs)"
            )
            return None
        except Exception as exc:
            if not is_transient(exc):
                count_failure(worker, chunk, exc)
                return None
            if time.monotonic() > deadline:
                log.warning(
                    "chunk %s: still failing (%s); leaving it to its lease", chunk.index, exc
                )
                return None
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
                return None  # done by another worker, or its job ended


@dataclass
class JudgedChunk:
    """A chunk generated and judged, its write still to do."""

    positions: list[int]
    result: BatchResult
    generations: int
    cached_generations: int
    engine_seconds: float
    """Seconds in the model's own calls, the generation cache's reads and writes left out."""
    started: float
    """`time.monotonic()` when the chunk's generation began."""
    model_id: str
    unsaved: dict[bytes, list[str]]
    """New answers the generation cache has still to store: they are written with the chunk,
    off the engine's path."""


def judge_chunk(worker: Worker, chunk: repository.ClaimedChunk, lease: Lease) -> JudgedChunk:
    """Read the chunk's examples, generate what they need and judge them; writes nothing but
    the generation cache's rows, committed after the engine calls that made them (within
    `SAVE_SECONDS`), and those still waiting when the chunk fails. The rest go with the
    chunk's write (`JudgedChunk.unsaved`)."""
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
    with autocommit_connection(worker.sessions) as connection:
        model = TimedEngine(
            # Loaded only if an answer is missing from the cache: a rescore in full mode never.
            LazyEngine(lambda: load_engine(worker, student), worker.model_id_for(student))
        )
        engine = CachedEngine(model, repository.SqlGenerationStore(connection), namespace=namespace)
        try:
            result = audit_batch(
                examples,
                sets,
                engine,
                config,
                call_generations=worker.settings.engine_call_generations,
                checkpoint=lease.checkpoint(connection),
            )
        except BaseException:
            engine.save()  # what the engine made stays for a later run, however this one ended
            raise
    return JudgedChunk(
        positions,
        result,
        engine.new_generations,
        engine.cached_generations,
        model.seconds,
        started,
        engine.model_id,
        engine.take_unsaved(),
    )


def write_chunk(worker: Worker, chunk: repository.ClaimedChunk, judged: JudgedChunk) -> bool:
    """The new answers the generation cache has still to store, then in one transaction: the
    chunk's verdicts, its counters, and the job's; False when another worker wrote it first.
    Raises `Stopped` once the job is no longer running (a cancel)."""
    if judged.unsaved:
        with autocommit_connection(worker.sessions) as connection:
            repository.SqlGenerationStore(connection).put_many(judged.model_id, judged.unsaved)
        judged.unsaved = {}
    with worker.sessions.begin() as session:
        status = repository.lock_job_status(session, chunk.job_id)
        if status != JobStatus.RUNNING:
            raise Stopped(f"the job is {status.value if status else 'gone'}")
        row = session.get(Chunk, (chunk.job_id, chunk.index), with_for_update=True)
        if row is None or row.status == ChunkStatus.DONE:
            return False  # another worker finished it while this one was away
        result = judged.result
        repository.write_verdicts(
            session,
            chunk.job_id,
            list(zip(judged.positions, result.verdicts, result.tallies, strict=True)),
        )
        row.status = ChunkStatus.DONE
        row.claimed_by = row.lease_expires_at = None
        row.generations = judged.generations
        row.cached_generations = judged.cached_generations
        row.engine_calls = result.stats.engine_calls
        row.engine_seconds = judged.engine_seconds
        row.seconds = time.monotonic() - judged.started
        row.finished_at = utcnow()
        count_chunk(session, row)
    return True


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
    """Keeps a claimed chunk's lease alive, from a thread of its own, while the worker
    generates and until the chunk's write commits.

    `checkpoint(connection)` is the runner's check between engine calls: it raises `Stopped`
    once the job is no longer running (a cancel) or the lease went to another worker. It reads
    on `connection`, the chunk's own (in autocommit mode), and leaves renewing to the thread.
    """

    def __init__(self, worker: Worker, chunk: repository.ClaimedChunk) -> None:
        self.worker = worker
        self.chunk = chunk
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Lease:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    def checkpoint(self, connection: Connection) -> Callable[[], None]:
        def check() -> None:
            self._note(repository.held_job_status(connection, self.chunk, self.worker.name))
            if self.lost:
                raise Stopped(self.lost)

        return check

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
