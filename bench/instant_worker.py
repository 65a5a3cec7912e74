"""`kma worker` with a student that answers at once: everything a job does, but the model.

Usage, from the repository root: .venv/bin/python -m bench.instant_worker [--loglevel INFO]

Replaces the engine factory of `workers.tasks` by one giving `InstantEngine`, then starts the
Celery worker through the `kma worker` command itself. Every job this worker runs goes through
the `jobs.work` task, the claims and leases, the `CachedEngine` wrapper and its generation
cache, the runner, the verdict upserts and the finalize step, whatever its `student` says.

The student answers questions of the form "What is number <i>?" (the query at the end of the
prompt): `<i>` when i is even, `WRONG_ANSWER` when it is odd. So even examples are HighlyKnown
and odd ones Unknown, in both modes. Any other question gets `WRONG_ANSWER`.

With `BENCH_WORKER_TIMINGS=FILE` in its environment, the worker also times its units of work and
the scoring rules within them (`AnswerKey.any_match`, `judge`), and writes the totals
(`WorkerTimings`) to FILE after each unit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kma.cli.parser import main  # noqa: E402
from workers import jobs, runner, tasks  # noqa: E402
from workers.engines.base import GenerationRequest, GenerationResult  # noqa: E402

TIMINGS_ENV = "BENCH_WORKER_TIMINGS"
WRONG_ANSWER = "forty-two"


class InstantEngine:
    """Answers every prompt at once, in order; keeps nothing between calls.

    Not `workers.engines.fake.FakeEngine`: that one records every request it is given, which a
    million-example job would hold in the worker for its whole life.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return [GenerationResult([answer(r.prompt)] * r.options.n) for r in requests]

    def close(self) -> None:
        """Nothing to release."""


def answer(prompt: str) -> str:
    # String methods, not a regular expression: the engine should cost next to nothing.
    number, mark, rest = prompt.rpartition("number ")[2].partition("?")
    if not (number.isdigit() and mark and rest.strip() == "A:") or int(number) % 2:
        return WRONG_ANSWER
    return number


def instant_model_id(student: dict[str, Any]) -> str:
    """Takes the place of `workers.tasks.model_id_for`: instant answers are cached apart from
    a real student's of the same name."""
    return f"instant:{student['model']}"


def instant_engine_for(student: dict[str, Any]) -> InstantEngine:
    """Takes the place of `workers.tasks.engine_for`: the job's student model names the engine
    (its cache key), whatever engine it asks for."""
    return InstantEngine(instant_model_id(student))


@dataclass
class WorkerTimings:
    busy_s: float = 0.0
    """Seconds in units of work: planning a job, or a chunk with the finalize step after it."""
    busy_cpu_s: float = 0.0
    """CPU seconds of the thread doing them, in them."""
    scoring_s: float = 0.0
    """Of the busy seconds, those in the scoring rules the runner calls (`AnswerKey.any_match`,
    `judge`)."""
    scoring_cpu_s: float = 0.0
    units: int = 0
    """Units of work asked for, those that found none included."""


def record_timings(path: Path) -> None:
    """Time every unit of work, and the scoring within it; write the totals to `path` after each."""
    timings = WorkerTimings()
    work_once = jobs.work_once

    def timed_work_once(worker: jobs.Worker) -> bool:
        started, started_cpu = time.perf_counter(), time.thread_time()
        try:
            return work_once(worker)
        finally:
            timings.busy_s += time.perf_counter() - started
            timings.busy_cpu_s += time.thread_time() - started_cpu
            timings.units += 1
            path.write_text(json.dumps(asdict(timings)))

    def timed(rule: Callable[..., Any]) -> Callable[..., Any]:
        def timed_rule(*args: Any) -> Any:
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                return rule(*args)
            finally:
                timings.scoring_s += time.perf_counter() - started
                timings.scoring_cpu_s += time.thread_time() - started_cpu

        return timed_rule

    jobs.work_once = timed_work_once
    runner.judge = timed(runner.judge)  # type: ignore[attr-defined]
    runner.AnswerKey.any_match = timed(runner.AnswerKey.any_match)  # type: ignore[method-assign]


def run(argv: list[str]) -> int:
    # Before the worker starts: `tasks.this_worker()` reads the factory when it first runs.
    tasks.engine_for = instant_engine_for
    tasks.model_id_for = instant_model_id
    if path := os.environ.get(TIMINGS_ENV):
        record_timings(Path(path))
    return main(["worker", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
