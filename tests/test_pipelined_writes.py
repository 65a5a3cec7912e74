"""A pipelined worker: a chunk's write runs in the writer thread while the next chunk generates."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.jobs import lifecycle
from app.models import Chunk, ChunkStatus, Generation, Job, JobStatus, Verdict
from tests.test_jobs import count, get_job, knows_even_numbers, make_job, make_worker
from workers import jobs
from workers.engines.fake import FakeEngine

WAIT = 30.0
"""Seconds a test waits for the other thread before it fails."""


def pipelined(sessions: sessionmaker[Session], engine: FakeEngine, **settings: Any) -> jobs.Worker:
    worker = make_worker(sessions, lambda student: engine, **settings)
    return dataclasses.replace(worker, writes=jobs.Writes(pipelined=True))


def run_all(worker: jobs.Worker) -> int:
    """Work until nothing is left, the outstanding write done: a write that fails gives its
    chunk back, to be claimed again."""
    units = 0
    while True:
        while jobs.work_once(worker):
            units += 1
        assert worker.writes.drain(WAIT)
        if not jobs.work_once(worker):
            return units
        units += 1


@pytest.fixture
def held_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWrites]:
    held = HeldWrites(jobs.write_chunk)
    monkeypatch.setattr(jobs, "write_chunk", held)
    yield held
    held.release.set()


class HeldWrites:
    """`jobs.write_chunk`, made to wait for `release` before each write; `started` is set once
    one waits. `fault`, when set, is raised in place of the next write."""

    def __init__(self, write: Callable[..., bool]) -> None:
        self.write = write
        self.started = threading.Event()
        self.release = threading.Event()
        self.fault: Exception | None = None
        self.calls = 0

    def __call__(self, *args: Any) -> bool:
        self.calls += 1
        self.started.set()
        assert self.release.wait(WAIT)
        if self.fault is not None:
            fault, self.fault = self.fault, None
            raise fault
        return self.write(*args)


def chunk_row(sessions: sessionmaker[Session], job_id: uuid.UUID, index: int) -> Chunk:
    with sessions() as session:
        chunk = session.get(Chunk, (job_id, index))
        assert chunk is not None
        return chunk


def lost_connection() -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("UPDATE job", {}, ConnectionError("server closed"))


def test_the_next_chunk_generates_while_the_last_one_writes(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 8)
    engine = FakeEngine(knows_even_numbers)
    worker = pipelined(sessions, engine)
    assert jobs.plan_next_job(worker)
    assert jobs.work_once(worker)  # chunk 0 generated, its write handed over and held
    assert held_writes.started.wait(WAIT)
    calls = len(engine.calls)
    # Chunk 1 is claimed and generated with chunk 0 still unwritten; handing its write waits.
    second = threading.Thread(target=jobs.work_once, args=(worker,))
    second.start()
    while len(engine.calls) == calls:
        assert second.is_alive()
        second.join(0.01)
    assert count(sessions, Verdict, job_id) == 0
    held_writes.release.set()
    second.join(WAIT)
    assert worker.writes.drain(WAIT)
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    assert count(sessions, Verdict, job_id) == 8


def test_the_lease_is_renewed_until_the_write_commits(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4)
    worker = pipelined(sessions, FakeEngine(knows_even_numbers), lease_seconds=2)
    assert jobs.plan_next_job(worker) and jobs.work_once(worker)
    assert held_writes.started.wait(WAIT)
    renewed = chunk_row(sessions, job_id, 0).lease_expires_at
    threading.Event().wait(1.5)  # past three beats of the lease thread
    held = chunk_row(sessions, job_id, 0)
    assert held.claimed_by == "w1" and held.lease_expires_at is not None
    assert renewed is not None and held.lease_expires_at > renewed
    with sessions() as session:  # no other worker can take it meanwhile
        assert session.scalar(select(func.now())) < held.lease_expires_at
    held_writes.release.set()
    assert worker.writes.drain(WAIT)
    done = chunk_row(sessions, job_id, 0)
    assert (done.status, done.claimed_by) == (ChunkStatus.DONE, None)
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED


def test_a_transient_fault_in_the_write_retries_the_write_alone(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4, mode="full")
    engine = FakeEngine(knows_even_numbers)
    worker = pipelined(sessions, engine)
    held_writes.fault = lost_connection()
    held_writes.release.set()
    run_all(worker)
    assert held_writes.calls == 2
    assert len(engine.calls) == 2  # greedy and samples, once: nothing generated again
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    assert chunk_row(sessions, job_id, 0).failures == 0


def test_a_write_that_fails_counts_against_its_chunk_which_runs_again(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4)
    worker = pipelined(sessions, FakeEngine(knows_even_numbers))
    held_writes.fault = RuntimeError("a bug in the write")
    held_writes.release.set()
    run_all(worker)  # the failure's hint brings the chunk back
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    assert chunk_row(sessions, job_id, 0).failures == 1
    assert count(sessions, Verdict, job_id) == 4


def test_a_cancel_between_generation_and_write_writes_no_verdict_but_keeps_the_generations(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4)
    engine = FakeEngine(knows_even_numbers)
    worker = pipelined(sessions, engine)
    assert jobs.plan_next_job(worker) and jobs.work_once(worker)
    assert held_writes.started.wait(WAIT)
    with sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        assert job is not None
        lifecycle.cancel(job)
    held_writes.release.set()
    assert worker.writes.drain(WAIT)
    assert get_job(sessions, job_id).status == JobStatus.CANCELLED
    assert count(sessions, Verdict, job_id) == 0
    assert chunk_row(sessions, job_id, 0).status == ChunkStatus.PENDING
    # The cache rows still waiting when the chunk was judged went with its write: a request a row.
    with sessions() as session:
        stored = session.scalar(select(func.count()).select_from(Generation))
    assert stored == sum(map(len, engine.calls))


def test_a_shutdown_drains_the_outstanding_write_before_it_gives_leases_back(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4)
    worker = pipelined(sessions, FakeEngine(knows_even_numbers))
    assert jobs.plan_next_job(worker) and jobs.work_once(worker)
    assert held_writes.started.wait(WAIT)
    assert not worker.writes.drain(timeout=0.1)  # still held: a shutdown keeps waiting
    threading.Timer(0.2, held_writes.release.set).start()
    assert worker.writes.drain(WAIT)
    jobs.release_leases(worker)
    assert count(sessions, Verdict, job_id) == 4
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED


def test_a_worker_that_dies_before_the_write_leaves_its_chunk_to_the_lease(
    sessions: sessionmaker[Session], held_writes: HeldWrites
) -> None:
    job_id = make_job(sessions, 4)
    engine = FakeEngine(knows_even_numbers)
    worker = pipelined(sessions, engine)
    assert jobs.plan_next_job(worker) and jobs.work_once(worker)
    assert held_writes.started.wait(WAIT)
    held_writes.fault = jobs.Stopped("the process died")  # the write never commits
    held_writes.release.set()
    assert worker.writes.drain(WAIT)
    assert count(sessions, Verdict, job_id) == 0
    assert chunk_row(sessions, job_id, 0).claimed_by == "w1"
    with sessions.begin() as session:  # its lease runs out
        session.execute(Chunk.__table__.update().values(lease_expires_at=func.now()))
    other = make_worker(sessions, lambda student: engine, name="w2")
    while jobs.work_once(other):
        pass
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    assert count(sessions, Verdict, job_id) == 4
