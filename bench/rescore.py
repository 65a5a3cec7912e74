"""Rescore a job of N examples with another matcher: how long the worker takes when every answer
comes from the generation cache.

Usage: .venv/bin/python bench/rescore.py [--examples 2000] [--mode full] [--keep]

A job of N invented questions ("What is number 12?") runs through the worker's own steps, in
this process, against a scripted student that answers at once (a third of the numbers it
knows, a third it answers "12 Town", which only `contains` takes, a third it does not know), so
the times are the service's own: the database, the cache, the judging. Then the job is
rescored with `contains` and run the same way. PostgreSQL as `bench/upload_export.py` finds it.
The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import AuditConfig  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.jobs import service  # noqa: E402
from app.jobs.schemas import JobRescore  # noqa: E402
from app.models import Dataset, Example, Job, Workspace  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.workspaces.service import ensure_workspace  # noqa: E402
from bench.upload_export import database, machine, run_in_work_dir  # noqa: E402
from workers import jobs  # noqa: E402
from workers.engines.base import GenerationRequest, GenerationResult  # noqa: E402
from workers.engines.fake import FakeEngine  # noqa: E402

STUDENTS: Any = {"scripted": {"engine": "hf", "model": "scripted"}}


def answer(request: GenerationRequest) -> GenerationResult:
    assert isinstance(request.prompt, str)
    number = request.prompt.rsplit("number ", 1)[1].split("?")[0]
    said = (number, f"{number} Town", "7777")[int(number) % 3]
    return GenerationResult([" " + said] * request.options.n)


class Queue:
    """No broker: the benchmark works until nothing is left."""

    def send(self, task: str, *args: Any) -> None:
        pass

    def depth(self) -> int | None:
        return None


@dataclass
class Result:
    examples: int
    mode: str
    job_seconds: float
    job_generations: int
    rescore_seconds: float
    rescore_generations_new: int
    rescore_generations_cached: int
    machine: dict[str, Any] = field(default_factory=dict)


def add_job(sessions: sessionmaker[Session], examples: int, config: AuditConfig) -> Any:
    with sessions.begin() as session:
        workspace = ensure_workspace(session, "bench")
        dataset = Dataset(workspace_id=workspace.id, name="n", format="qa", num_examples=examples)
        session.add(dataset)
        session.flush()
        session.add_all(
            Example(
                dataset_id=dataset.id,
                position=i,
                line=i + 1,
                record_id=str(i),
                group=None,
                raw={"question": f"What is number {i}?", "answer": str(i)},
            )
            for i in range(examples)
        )
        job = Job(
            workspace_id=workspace.id,
            dataset_id=dataset.id,
            student={"name": "scripted", "engine": "hf", "model": "scripted"},
            config=config.model_dump(mode="json"),
            total=examples,
        )
        session.add(job)
        session.flush()
        return job.id


def work(worker: jobs.Worker) -> float:
    started = time.monotonic()
    while jobs.work_once(worker):
        pass
    return time.monotonic() - started


def run(examples: int, mode: str, work_dir: Path, keep: bool) -> Result:
    with database(work_dir, keep) as (url, _):
        engine = make_engine(url)
        sessions = sessionmaker(engine, expire_on_commit=False)
        settings = Settings(students=STUDENTS)
        student = FakeEngine(answer, model_id="scripted")
        worker = jobs.Worker("bench", sessions, lambda spec: student, Queue(), settings)
        job_id = add_job(sessions, examples, AuditConfig(mode=mode))
        job_seconds = work(worker)
        with sessions() as session:
            source = session.get_one(Job, job_id)
            workspace = session.get_one(Workspace, source.workspace_id)
            rescore = JobRescore.model_validate({"config": {"matcher": "contains"}})
            rescored = service.rescore_job(session, workspace, job_id, rescore, settings)
            session.commit()
        rescore_seconds = work(worker)
        with sessions() as session:
            source = session.get_one(Job, job_id)
            job = session.get_one(Job, rescored.id)
            result = Result(
                examples=examples,
                mode=mode,
                job_seconds=round(job_seconds, 1),
                job_generations=source.generations,
                rescore_seconds=round(rescore_seconds, 1),
                rescore_generations_new=job.generations,
                rescore_generations_cached=job.cached_generations,
                machine=machine(url),
            )
        engine.dispose()
        return result


def table(result: Result) -> str:
    return (
        f"{result.examples:,} examples, {result.mode} mode, default options\n"
        f"job:     {result.job_seconds:>7.1f} s, {result.job_generations:,} generations\n"
        f"rescore: {result.rescore_seconds:>7.1f} s, {result.rescore_generations_new:,} new, "
        f"{result.rescore_generations_cached:,} from the cache"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--mode", choices=("full", "adaptive"), default="full")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    args = parser.parse_args()
    return run_in_work_dir(
        lambda work_dir: run(args.examples, args.mode, work_dir, args.keep), table, args.keep, []
    )


if __name__ == "__main__":
    sys.exit(main())
