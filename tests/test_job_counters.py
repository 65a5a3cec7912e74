"""A job's progress counters, which workers keep as they write verdicts and polls read."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import func, inspect, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.repository import claim_chunk
from app.audit.schemas import Category
from app.db import make_engine, migrate
from app.embedded import ensure_database
from app.jobs import repository, service
from app.jobs.schemas import GenerationCounts, Progress
from app.models import Chunk, Job, JobStatus, Verdict, Workspace
from tests.test_jobs import get_job, knows_even_numbers, make_job, make_worker, run_all
from workers import jobs
from workers.engines.fake import FakeEngine


def poll(sessions: sessionmaker[Session], job_id: uuid.UUID) -> tuple[Progress, GenerationCounts]:
    """What `GET /v1/jobs/{id}` shows of the job's progress."""
    with sessions() as session:
        workspace_id = get_job(sessions, job_id).workspace_id
        job = service.get_job(session, session.get_one(Workspace, workspace_id), job_id)
        return job.progress, job.generations


def counted(
    sessions: sessionmaker[Session], job_id: uuid.UUID
) -> tuple[Progress, GenerationCounts]:
    """The same, counted over the job's verdicts and chunks."""
    with sessions() as session:
        rows = session.execute(
            select(Verdict.category, Verdict.flagged, func.count())
            .where(Verdict.job_id == job_id)
            .group_by(Verdict.category, Verdict.flagged)
        ).all()
        new, cached = session.execute(
            select(
                func.coalesce(func.sum(Chunk.generations), 0),
                func.coalesce(func.sum(Chunk.cached_generations), 0),
            ).where(Chunk.job_id == job_id)
        ).one()
        total = session.get_one(Job, job_id).total
    categories = dict.fromkeys(Category, 0)
    for category, _, n in rows:
        categories[Category(category)] += n
    progress = Progress(
        total=total,
        done=sum(n for _, _, n in rows),
        categories=categories,
        flagged=sum(n for _, flagged, n in rows if flagged),
    )
    return progress, GenerationCounts(new=int(new), cached=int(cached))


def test_the_counters_follow_the_verdicts_chunk_by_chunk(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 10)
    worker = make_worker(sessions, lambda student: engine)
    assert jobs.plan_next_job(worker)
    assert poll(sessions, job_id) == counted(sessions, job_id)  # nothing yet
    done = []
    while jobs.work_once(worker):
        progress, generations = poll(sessions, job_id)
        assert (progress, generations) == counted(sessions, job_id)
        done.append(progress.done)
    assert done == [4, 8, 10]
    progress, generations = poll(sessions, job_id)
    assert progress.categories[Category.HIGHLY_KNOWN] == progress.categories[Category.UNKNOWN] == 5
    assert progress.flagged == 5
    assert generations.new == 5 * 10 + 5 * 170
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED


def test_a_chunk_run_twice_is_counted_once(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 4)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    with sessions.begin() as session:
        slow = claim_chunk(session, "slow", 60)
        session.execute(update(Chunk).values(lease_expires_at=func.now()))
    with sessions.begin() as session:
        fast = claim_chunk(session, "w1", 60)
    assert slow == fast is not None
    jobs.run_chunk(worker, fast)
    with pytest.raises(jobs.Stopped, match="lease"):
        jobs.run_chunk(make_worker(sessions, lambda student: engine, name="slow"), slow)
    assert poll(sessions, job_id) == counted(sessions, job_id)
    assert poll(sessions, job_id)[0].done == 4


def test_a_cancelled_job_counts_what_was_written_before_the_cancel(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 12)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    assert jobs.work_once(worker)  # the first chunk
    with sessions.begin() as session:
        late = claim_chunk(session, "w1", 60)
    assert late is not None
    with sessions() as session:
        service.cancel_job(
            session, session.get_one(Workspace, get_job(sessions, job_id).workspace_id), job_id
        )
        session.commit()
    with pytest.raises(jobs.Stopped, match="cancelled"):
        jobs.run_chunk(worker, late)  # generated before the cancel, written after: refused
    assert not jobs.work_once(worker)
    progress, generations = poll(sessions, job_id)
    assert (progress, generations) == counted(sessions, job_id)
    assert (progress.total, progress.done) == (12, 4)
    assert generations.new > 0


def test_a_deleted_job_takes_its_counters_and_a_late_chunk_writes_nothing(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 8)
    other = make_job(sessions, 4)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    with sessions.begin() as session:
        late = claim_chunk(session, "w1", 60)
    assert late is not None and late.job_id == job_id
    with sessions.begin() as session:
        service.delete_job(session, get_job(sessions, job_id).workspace_id, job_id)
    with pytest.raises(jobs.Stopped, match="gone"):
        jobs.run_chunk(worker, late)
    with sessions() as session:
        assert session.get(Job, job_id) is None
        assert session.scalar(select(func.count()).where(Verdict.job_id == job_id)) == 0
    run_all(worker)
    assert poll(sessions, other) == counted(sessions, other)
    assert poll(sessions, other)[0].done == 4


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(knows_even_numbers)


class HeldWrite:
    """Holds the first worker that comes to count its chunk there, in its write transaction
    (the job row locked, its verdicts written), until `release` is set."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def wrap(self, count: Callable[[Session, Chunk], None]) -> Callable[[Session, Chunk], None]:
        def held(session: Session, chunk: Chunk) -> None:
            if not self.holding.is_set():
                self.holding.set()
                assert self.release.wait(30)
            count(session, chunk)

        return held


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldWrite]:
    held = HeldWrite()
    monkeypatch.setattr(jobs, "count_chunk", held.wrap(repository.count_chunk))
    yield held
    held.release.set()


def in_thread(work: Callable[[], object]) -> Callable[[], None]:
    """Start `work` in a thread; returns a join that raises what it raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> None:
        thread.join(60)
        assert not thread.is_alive()
        if errors:
            raise errors[0]

    return join


def wait_for_a_lock_wait(sessions: sessionmaker[Session]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with sessions() as session:
            if session.scalar(text("SELECT count(*) FROM pg_locks WHERE NOT granted")):
                return
        time.sleep(0.05)
    raise AssertionError("nothing waited for a lock")


def test_two_workers_writing_chunks_of_one_job_take_turns(
    sessions: sessionmaker[Session], engine: FakeEngine, held: HeldWrite
) -> None:
    """A write transaction locks the job row for update from its start, so the second waits
    for the first; both holding a share lock, then both updating the row, would deadlock."""
    job_id = make_job(sessions, 8)
    jobs.plan_next_job(make_worker(sessions, lambda student: engine))
    claimed = []
    for name in ("w1", "w2"):
        with sessions.begin() as session:
            claimed.append(
                (
                    make_worker(sessions, lambda student: engine, name),
                    claim_chunk(session, name, 60),
                )
            )
    (w1, first), (w2, second) = claimed
    assert first is not None and second is not None
    join_first = in_thread(lambda: jobs.run_chunk(w1, first))
    assert held.holding.wait(30)
    join_second = in_thread(lambda: jobs.run_chunk(w2, second))
    wait_for_a_lock_wait(sessions)  # the second write, for the first's job row
    held.release.set()
    join_first()
    join_second()
    assert poll(sessions, job_id) == counted(sessions, job_id)
    assert poll(sessions, job_id)[0].done == 8


def test_a_cancel_waits_for_a_chunk_being_written(
    sessions: sessionmaker[Session], engine: FakeEngine, held: HeldWrite
) -> None:
    """No verdict lands after a cancel commits: a chunk being written holds the job row."""
    job_id = make_job(sessions, 4)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    with sessions.begin() as session:
        chunk = claim_chunk(session, "w1", 60)
    assert chunk is not None
    join = in_thread(lambda: jobs.run_chunk(worker, chunk))
    assert held.holding.wait(30)
    with sessions.begin() as session:
        session.execute(text("SET LOCAL lock_timeout = '300ms'"))
        with pytest.raises(sqlalchemy.exc.OperationalError, match="lock timeout"):
            session.get(Job, job_id, with_for_update=True)  # as a cancel takes it
    held.release.set()
    join()
    assert poll(sessions, job_id)[0].done == 4


# --- migration 0004 -----------------------------------------------------------------------------


@pytest.fixture
def database_at_0003(postgres_admin_url: str) -> Iterator[str]:
    name = f"kma_test_{uuid.uuid4().hex[:12]}"
    ensure_database(postgres_admin_url, name)
    base, _, query = postgres_admin_url.partition("?")
    url = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    migrate(url, "0003")
    try:
        yield url
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


COUNTERS = (
    "done",
    *repository.CATEGORY_COUNTERS.values(),
    "flagged",
    "generations",
    "cached_generations",
)


def test_the_migration_counts_the_jobs_it_finds(database_at_0003: str) -> None:
    engine = make_engine(database_at_0003)
    job, idle = uuid.uuid4(), uuid.uuid4()  # with verdicts and chunks, and without
    workspace, dataset = uuid.uuid4(), uuid.uuid4()
    with engine.begin() as connection:
        for statement in (
            "INSERT INTO workspace (id, name, webhook_secret, created_at) "
            "VALUES (:workspace, 'w', 's', now())",
            "INSERT INTO dataset (id, workspace_id, name, format, num_examples, created_at) "
            "VALUES (:dataset, :workspace, 'd', 'qa', 5, now())",
            "INSERT INTO job (id, workspace_id, dataset_id, status, student, config, total, "
            "created_at) SELECT id, :workspace, :dataset, 'running', '{}', '{}', 5, now() "
            "FROM unnest(ARRAY[:job, :idle]) AS id",
            "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, answers) "
            "SELECT :job, i, (ARRAY['HighlyKnown', 'Unknown', 'Unknown', 'WeaklyKnown'])[i + 1], "
            "i IN (1, 2), false, '{}', '{}' FROM generate_series(0, 3) AS i",
            "INSERT INTO chunk (job_id, index, start, stop, status, attempts, failures, "
            "generations, cached_generations, engine_calls, engine_seconds) "
            "VALUES (:job, 0, 0, 3, 'done', 1, 0, 30, 2, 1, 1.0), "
            "(:job, 1, 3, 5, 'done', 1, 0, 7, 1, 1, 1.0)",
        ):
            ids = {"workspace": workspace, "dataset": dataset, "job": job, "idle": idle}
            connection.execute(text(statement), ids)
    migrate(database_at_0003)
    with Session(engine) as session:
        counters = [
            tuple(getattr(j, column) for column in COUNTERS)
            for j in (session.get_one(Job, job), session.get_one(Job, idle))
        ]
    engine.dispose()
    assert counters == [(4, 1, 0, 1, 2, 2, 37, 3), (0,) * 8]


def test_the_api_reads_a_job_without_its_bulky_json(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 4)
    run_all(make_worker(sessions, lambda student: engine))
    with sessions() as session:
        job = repository.get_job(session, job_id)
        assert job is not None
        assert {"exemplar_sets", "report"} <= inspect(job).unloaded
        assert job.report is not None  # read when used
