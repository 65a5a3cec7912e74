"""A job's steps (plan, claim, run, finalize, sweep) on the real database, with a scripted engine.

These call the worker's steps directly, as its Celery task would; tests/test_faults.py does the
same through real processes, with faults.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.audit.domain import Tally
from app.audit.repository import claim_chunk, tally_from_answers
from app.audit.schemas import AuditConfig, Category, Report
from app.jobs import lifecycle
from app.models import Chunk, Dataset, Example, Generation, Job, JobStatus, Verdict
from app.queue import WORK
from app.settings import Settings
from tests.conftest import new_workspace
from workers import jobs
from workers.engines.base import EngineUnavailable, GenerationRequest, GenerationResult
from workers.engines.fake import FakeEngine
from workers.engines.openai import CompletionServerError

REPO = Path(__file__).resolve().parent.parent


class Hints:
    """The queue as these tests see it: what was sent; its depth is the hints not yet taken."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        self.waiting = 0

    def send(self, task: str, *args: Any) -> None:
        self.sent.append((task, args))
        self.waiting += task == WORK

    def depth(self) -> int | None:
        return self.waiting


def knows_even_numbers(request: GenerationRequest) -> GenerationResult:
    number = int(request.prompt.rsplit("number ", 1)[1].split("?")[0])
    text = f" {number}" if number % 2 == 0 else " 7777"
    return GenerationResult([text] * request.options.n)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(knows_even_numbers)


def make_worker(
    sessions: sessionmaker[Session],
    engine_for: Callable[[dict[str, Any]], Any],
    name: str = "w1",
    **settings: Any,
) -> jobs.Worker:
    return jobs.Worker(
        name=name,
        sessions=sessions,
        engine_for=engine_for,
        queue=Hints(),
        settings=Settings(chunk_size=4, transient_retry_seconds=5, **settings),
    )


def numbers_dataset(sessions: sessionmaker[Session], n: int) -> tuple[uuid.UUID, uuid.UUID]:
    """A workspace of its own and a dataset of `n` questions "What is number i?"."""
    with sessions.begin() as session:
        workspace_id = new_workspace(session)
        dataset = Dataset(workspace_id=workspace_id, name="numbers", format="qa", num_examples=n)
        session.add(dataset)
        session.flush()
        session.add_all(
            Example(
                dataset_id=dataset.id,
                position=i,
                line=i + 1,
                record_id=f"n{i}",
                group="numbers",
                raw={
                    "id": f"n{i}",
                    "question": f"What is number {i}?",
                    "answer": str(i),
                    "group": "numbers",
                },
            )
            for i in range(n)
        )
        return workspace_id, dataset.id


def make_job(sessions: sessionmaker[Session], n: int, **config: Any) -> uuid.UUID:
    """A job on the fake student over a `numbers_dataset` of `n` questions, queued."""
    workspace_id, dataset_id = numbers_dataset(sessions, n)
    with sessions.begin() as session:
        job = Job(
            workspace_id=workspace_id,
            dataset_id=dataset_id,
            student={"name": "fake", "engine": "hf", "model": "fake"},
            config=AuditConfig(**config).model_dump(mode="json"),
            total=n,
        )
        session.add(job)
        session.flush()
        return job.id


def run_all(worker: jobs.Worker) -> int:
    """Work until nothing is left; returns the units done."""
    units = 0
    while jobs.work_once(worker):
        units += 1
    return units


def get_job(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def count(sessions: sessionmaker[Session], model: type[Any], job_id: uuid.UUID) -> int:
    with sessions() as session:
        query = select(func.count()).select_from(model).where(model.job_id == job_id)
        return session.scalar(query) or 0


def test_a_job_runs_to_success(sessions: sessionmaker[Session], engine: FakeEngine) -> None:
    job_id = make_job(sessions, 10)
    worker = make_worker(sessions, lambda student: engine)
    assert run_all(worker) == 1 + 3  # plan, then three chunks of at most 4
    assert [task for task, _ in worker.queue.sent] == [WORK] * 3  # a hint per chunk
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.SUCCEEDED
    assert count(sessions, Verdict, job_id) == 10
    report = Report.model_validate(job.report)
    assert not report.partial
    assert (report.num_examples, report.total) == (10, 10)
    assert report.categories == {
        Category.HIGHLY_KNOWN: 5,
        Category.MAYBE_KNOWN: 0,
        Category.WEAKLY_KNOWN: 0,
        Category.UNKNOWN: 5,
    }
    assert report.groups["numbers"].examples == 10
    assert report.flagged == 5
    assert report.conflicts == 5  # the fake answers 7777 every time
    assert report.generations == report.generations_used == 5 * 10 + 5 * 170
    assert report.student.model == "fake"


def test_verdicts_keep_every_answer_the_student_gave(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 4, mode="full")
    run_all(make_worker(sessions, lambda student: engine))
    with sessions() as session:
        verdicts = session.scalars(
            select(Verdict).where(Verdict.job_id == job_id).order_by(Verdict.position)
        ).all()
    assert [tally_from_answers(v.answers) for v in verdicts] == [
        Tally([answer] * 10, [[answer] * 16 for _ in range(10)])
        for answer in ("0", "7777", "2", "7777")
    ]


def test_a_second_identical_job_generates_nothing(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    first = make_job(sessions, 6)
    worker = make_worker(sessions, lambda student: engine)
    run_all(worker)
    calls = len(engine.calls)
    with sessions.begin() as session:
        job = get_job(sessions, first)
        second = Job(
            workspace_id=job.workspace_id,
            dataset_id=job.dataset_id,
            student=job.student,
            config=job.config,
            total=6,
        )
        session.add(second)
    run_all(worker)
    assert len(engine.calls) == calls
    report = Report.model_validate(get_job(sessions, second.id).report)
    assert report.generations == 0
    assert report.generations_cached == report.generations_used > 0
    assert report.categories == Report.model_validate(get_job(sessions, first).report).categories


def test_a_chunk_whose_lease_ran_out_is_finished_once(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 8)
    worker = make_worker(sessions, lambda student: engine)
    assert jobs.plan_next_job(worker)
    with sessions.begin() as session:
        slow = claim_chunk(session, "slow", 60)
        session.execute(update(Chunk).values(lease_expires_at=func.now()))
    with sessions.begin() as session:
        fast = claim_chunk(session, "w1", 60)
    assert slow == fast is not None
    jobs.run_chunk(worker, fast)
    # The first worker comes back from a long pause: its lease is gone, it writes nothing.
    with pytest.raises(jobs.Stopped, match="lease"):
        jobs.run_chunk(make_worker(sessions, lambda student: engine, name="slow"), slow)
    assert count(sessions, Verdict, job_id) == 4
    run_all(worker)
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    assert count(sessions, Verdict, job_id) == 8


def test_a_live_lease_keeps_a_chunk_and_an_expired_one_frees_it(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 4)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    with sessions.begin() as session:
        assert claim_chunk(session, "dead", 60) is not None
    with sessions.begin() as session:
        assert claim_chunk(session, "w1", 60) is None  # held by a live lease
    with sessions.begin() as session:  # ... until it runs out
        session.execute(update(Chunk).values(lease_expires_at=func.now()))
    assert run_all(worker) == 1
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    with sessions() as session:
        chunk = session.get(Chunk, (job_id, 0))
        assert chunk is not None
        assert (chunk.attempts, chunk.claimed_by) == (2, None)


def test_a_cancel_stops_the_chunk_between_engine_calls(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, 4, mode="full")
    calls = 0

    def cancel_on_first_call(request: GenerationRequest) -> GenerationResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            with sessions.begin() as session:
                job = session.get(Job, job_id, with_for_update=True)
                assert job is not None
                lifecycle.cancel(job)
        return knows_even_numbers(request)

    engine = FakeEngine(cancel_on_first_call)
    # One prompt per engine call: the runner looks at the job between every two.
    worker = make_worker(sessions, lambda student: engine, engine_call_generations=1)
    run_all(worker)
    assert len(engine.calls) == 1
    assert count(sessions, Verdict, job_id) == 0
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.CANCELLED
    with sessions() as session:  # what the one call generated is kept for a later run
        assert session.scalar(select(func.count()).select_from(Generation)) == 1


def test_generations_are_committed_after_each_engine_call(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, 4, mode="full")

    def breaks_on_third_call(request: GenerationRequest) -> GenerationResult:
        if len(engine.calls) == 3:
            raise RuntimeError("the engine broke")
        return knows_even_numbers(request)

    engine = FakeEngine(breaks_on_third_call)
    worker = make_worker(sessions, lambda student: engine, engine_call_generations=10)
    assert jobs.plan_next_job(worker) and jobs.work_once(worker)
    with sessions() as session:
        assert (session.scalar(select(func.count()).select_from(Generation)) or 0) > 0
        chunk = session.get(Chunk, (job_id, 0))
        assert chunk is not None and chunk.failures == 1
    paid_for = {(r.prompt, r.options) for call in engine.calls[:2] for r in call}
    # The chunk runs again (by the hint it left), taking the first two calls from the cache.
    before = len(engine.calls)
    run_all(worker)
    assert get_job(sessions, job_id).status == JobStatus.SUCCEEDED
    asked_again = {(r.prompt, r.options) for call in engine.calls[before:] for r in call}
    assert asked_again and not paid_for & asked_again


def test_a_transient_engine_fault_is_retried_in_place(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions, 4)
    faults = 2

    def unavailable_twice(request: GenerationRequest) -> GenerationResult:
        nonlocal faults
        if faults:
            faults -= 1
            raise EngineUnavailable("POST http://10.0.0.7:8000/v1/completions: 503")
        return knows_even_numbers(request)

    worker = make_worker(sessions, lambda student: FakeEngine(unavailable_twice))
    run_all(worker)
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.SUCCEEDED, job.error
    with sessions() as session:
        chunk = session.get(Chunk, (job_id, 0))
        assert chunk is not None and chunk.failures == 0


def test_a_student_that_cannot_load_fails_the_job_with_a_clear_error(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, 4)

    def broken(student: dict[str, Any]) -> FakeEngine:
        raise OSError("/srv/models/secret-path: permission denied")

    run_all(make_worker(sessions, broken))
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "the student 'fake' could not be loaded by the hf engine"
    assert job.finished_at is not None


def test_a_student_the_worker_does_not_register_fails_the_job(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, 4)

    def unregistered(student: dict[str, Any]) -> FakeEngine:
        raise jobs.PermanentError(
            f"the student {student['name']!r} is not registered on the worker"
        )

    run_all(make_worker(sessions, unregistered))
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "the student 'fake' is not registered on the worker"


def test_an_engine_server_that_refuses_fails_the_job_without_its_answer(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, 4)

    def refused(request: GenerationRequest) -> GenerationResult:
        raise CompletionServerError("POST http://10.0.0.7:8000/v1/completions: 400 secret body")

    run_all(make_worker(sessions, lambda student: FakeEngine(refused)))
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "the student's engine refused a request (see the worker logs)"


def test_an_unexpected_error_fails_the_job_after_the_limit(
    sessions: sessionmaker[Session],
) -> None:
    job_id = make_job(sessions, 4)

    def buggy(request: GenerationRequest) -> GenerationResult:
        raise KeyError("SELECT * FROM secret")

    run_all(make_worker(sessions, lambda student: FakeEngine(buggy), max_chunk_failures=3))
    job = get_job(sessions, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error == "chunk 0 failed 3 times with an internal error (see the worker logs)"


def test_the_sweeper_finishes_jobs_and_sends_missing_hints(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    worker = make_worker(sessions, lambda student: engine)
    make_job(sessions, 4)
    queued = make_job(sessions, 4)  # submitted while the broker was down: no hint
    assert jobs.plan_next_job(worker)  # the first job is planned: one chunk, one hint
    sweep = jobs.sweep(worker)
    assert sweep is not None and (sweep.finalized, sweep.hinted) == (0, 1)  # the queued job
    assert worker.queue.depth() == 2

    # A job whose last worker died after writing its last chunk, before finishing the job.
    with sessions.begin() as session:
        chunk = claim_chunk(session, "w1", 60)
    assert chunk is not None
    jobs.run_chunk(worker, chunk)
    sweep = jobs.sweep(worker)
    assert sweep is not None and sweep.finalized == 1
    run_all(worker)
    assert get_job(sessions, queued).status == JobStatus.SUCCEEDED


def test_a_cancelled_job_runs_no_more_chunks(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    job_id = make_job(sessions, 8)
    worker = make_worker(sessions, lambda student: engine)
    jobs.plan_next_job(worker)
    assert jobs.work_once(worker)
    with sessions.begin() as session:
        job = session.get(Job, job_id, with_for_update=True)
        assert job is not None
        lifecycle.cancel(job)
    calls = len(engine.calls)
    assert not jobs.work_once(worker)
    assert len(engine.calls) == calls
    assert count(sessions, Verdict, job_id) == 4
    assert get_job(sessions, job_id).status == JobStatus.CANCELLED


def test_cached_generations_are_stored_by_model(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    make_job(sessions, 2)
    run_all(make_worker(sessions, lambda student: engine))
    with sessions() as session:
        stored = session.scalar(
            select(func.count()).select_from(Generation).where(Generation.model_id == "fake")
        )
    # With two examples, a question's ten prompts are all the same text (the other question as
    # its one exemplar), so the cache holds one entry per question for greedy, and one per
    # sampling round (three) for the question the student does not know.
    assert stored == 2 + 3


# --- the state machine ------------------------------------------------------------------------

Q, R, S, F, C = (
    JobStatus.QUEUED,
    JobStatus.RUNNING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
)
ALLOWED = {(Q, R), (Q, F), (Q, C), (R, S), (R, F), (R, C)}


@pytest.mark.parametrize("current", list(JobStatus))
@pytest.mark.parametrize("target", list(JobStatus))
def test_transitions_table(current: JobStatus, target: JobStatus) -> None:
    assert lifecycle.can_move(current, target) == ((current, target) in ALLOWED)
    job = Job(id=uuid.uuid4(), status=current)
    move = {
        R: lifecycle.start,
        S: lifecycle.succeed,
        F: lambda job: lifecycle.fail(job, "broken"),
        C: lifecycle.cancel,
    }.get(target)
    if move is None:
        return  # nothing moves a job back to queued
    if (current, target) in ALLOWED:
        move(job)
        assert job.status == target
        assert (job.finished_at is not None) == target.finished
    else:
        with pytest.raises(lifecycle.InvalidTransition):
            move(job)
        assert job.status == current


ASSIGNS_STATUS = re.compile(r"\bjob\.status\s*=(?!=)|\.status\s*=\s*JobStatus\.")


def test_no_module_but_the_state_machine_sets_a_status() -> None:
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("app", "workers")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "lifecycle.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ASSIGNS_STATUS.search(line)
    ]
    assert offenders == []
