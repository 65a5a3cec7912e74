"""A job's steps (plan, chunks, finalize) on the real database, with a scripted engine."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.schemas import AuditConfig, Category, Report
from app.models import Chunk, Dataset, Example, Generation, Job, JobStatus, Verdict
from app.queue import RUN_CHUNK
from workers import jobs
from workers.engines.base import GenerationRequest, GenerationResult
from workers.engines.fake import FakeEngine


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def send(self, task: str, *args: Any) -> None:
        self.sent.append((task, args))


def knows_even_numbers(request: GenerationRequest) -> GenerationResult:
    number = int(request.prompt.rsplit("number ", 1)[1].split("?")[0])
    text = f" {number}" if number % 2 == 0 else " 7777"
    return GenerationResult([text] * request.options.n)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(knows_even_numbers)


def make_job(session: Session, n: int, **config: Any) -> Job:
    dataset = Dataset(name="numbers", format="qa", num_examples=n)
    session.add(dataset)
    session.flush()
    session.add_all(
        Example(
            dataset_id=dataset.id,
            position=i,
            line=i + 1,
            record_id=f"n{i}",
            group="numbers",
            raw={"id": f"n{i}", "question": f"What is number {i}?", "answer": str(i)},
        )
        for i in range(n)
    )
    job = Job(
        dataset_id=dataset.id,
        student={"model": "fake", "engine": "hf"},
        config=AuditConfig(**config).model_dump(mode="json"),
        total=n,
    )
    session.add(job)
    session.commit()
    return job


def run_all(session: Session, job: Job, engine: FakeEngine, queue: Recorder) -> None:
    jobs.plan_job(session, job.id, queue, chunk_size=4)
    for task, (job_id, index) in list(queue.sent):
        assert task == RUN_CHUNK
        jobs.run_chunk(session, uuid.UUID(job_id), index, lambda student: engine, queue)


def count(session: Session, model: type[Any], job_id: uuid.UUID) -> int:
    return (
        session.scalar(select(func.count()).select_from(model).where(model.job_id == job_id)) or 0
    )


def test_a_job_runs_to_success(session: Session, engine: FakeEngine) -> None:
    job = make_job(session, 10)
    queue = Recorder()
    run_all(session, job, engine, queue)
    assert [args for _, args in queue.sent] == [(str(job.id), i) for i in range(3)]
    session.refresh(job)
    assert job.status == JobStatus.SUCCEEDED
    assert count(session, Verdict, job.id) == 10
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


def test_a_second_identical_job_generates_nothing(session: Session, engine: FakeEngine) -> None:
    first = make_job(session, 6)
    run_all(session, first, engine, Recorder())
    calls = len(engine.calls)
    second = Job(dataset_id=first.dataset_id, student=first.student, config=first.config, total=6)
    session.add(second)
    session.commit()
    run_all(session, second, engine, Recorder())
    session.refresh(second)
    assert len(engine.calls) == calls
    report = Report.model_validate(second.report)
    assert report.generations == 0
    assert report.generations_cached == report.generations_used > 0
    assert report.categories == Report.model_validate(first.report).categories


def test_a_chunk_run_twice_writes_each_verdict_once(session: Session, engine: FakeEngine) -> None:
    job = make_job(session, 8)
    queue = Recorder()
    jobs.plan_job(session, job.id, queue, chunk_size=4)
    jobs.run_chunk(session, job.id, 0, lambda s: engine, Recorder())
    # The worker died after committing but before acknowledging: the chunk comes again.
    jobs.run_chunk(session, job.id, 0, lambda s: engine, Recorder())
    assert count(session, Verdict, job.id) == 4
    jobs.run_chunk(session, job.id, 1, lambda s: engine, Recorder())
    session.refresh(job)
    assert job.status == JobStatus.SUCCEEDED
    assert count(session, Verdict, job.id) == 8


def test_a_plan_run_twice_resends_pending_chunks_only(session: Session, engine: FakeEngine) -> None:
    job = make_job(session, 8)
    queue = Recorder()
    jobs.plan_job(session, job.id, queue, chunk_size=4)
    jobs.run_chunk(session, job.id, 0, lambda s: engine, Recorder())
    again = Recorder()
    jobs.plan_job(session, job.id, again, chunk_size=4)
    assert [args for _, args in again.sent] == [(str(job.id), 1)]
    assert count(session, Chunk, job.id) == 2


def test_a_cancelled_job_runs_no_more_chunks(session: Session, engine: FakeEngine) -> None:
    job = make_job(session, 8)
    jobs.plan_job(session, job.id, Recorder(), chunk_size=4)
    jobs.run_chunk(session, job.id, 0, lambda s: engine, Recorder())
    job.status = JobStatus.CANCELLED
    session.commit()
    calls = len(engine.calls)
    jobs.run_chunk(session, job.id, 1, lambda s: engine, Recorder())
    assert len(engine.calls) == calls
    assert count(session, Verdict, job.id) == 4
    session.refresh(job)
    assert job.status == JobStatus.CANCELLED


def test_an_engine_error_fails_the_job(session: Session) -> None:
    job = make_job(session, 4)
    jobs.plan_job(session, job.id, Recorder(), chunk_size=4)

    def broken(student: dict[str, Any]) -> FakeEngine:
        raise OSError("no such model: fake")

    with pytest.raises(OSError):
        jobs.run_chunk(session, job.id, 0, broken, Recorder())
    jobs.fail_job(session, job.id, "chunk 0 failed: no such model: fake", Recorder())
    session.refresh(job)
    assert job.status == JobStatus.FAILED
    assert job.error == "chunk 0 failed: no such model: fake"
    assert job.finished_at is not None


def test_cached_generations_are_stored_by_model(session: Session, engine: FakeEngine) -> None:
    job = make_job(session, 2)
    run_all(session, job, engine, Recorder())
    stored = session.scalar(
        select(func.count()).select_from(Generation).where(Generation.model_id == "fake")
    )
    # With two examples, a question's ten prompts are all the same text (the other question as
    # its one exemplar), so the cache holds one entry per question for greedy, and one per
    # sampling round (three) for the question the student does not know.
    assert stored == 2 + 3
