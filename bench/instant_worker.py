"""`kma worker` with a student that answers at once: everything a job does, but the model.

Usage, from the repository root: .venv/bin/python -m bench.instant_worker [--loglevel INFO]

Replaces the engine factory of `workers.tasks` by one giving `InstantEngine`, then starts the
Celery worker through the `kma worker` command itself. Every job this worker runs goes through
the `jobs.work` task, the claims and leases, the `CachedEngine` wrapper and its generation
cache, the runner, the verdict upserts and the finalize step, whatever its `student` says.

The student answers questions of the form "What is number <i>?" (the query at the end of the
prompt): `<i>` when i is even, `WRONG_ANSWER` when it is odd. So even examples are HighlyKnown
and odd ones Unknown, in both modes. Any other question gets `WRONG_ANSWER`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kma.cli.parser import main  # noqa: E402
from workers import tasks  # noqa: E402
from workers.engines.base import GenerationRequest, GenerationResult  # noqa: E402

WRONG_ANSWER = "forty-two"
QUERY = re.compile(r"number (\d+)\?\s*A:\s*$")


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
    found = QUERY.search(prompt)
    if found is None or int(found[1]) % 2:
        return WRONG_ANSWER
    return found[1]


def instant_engine_for(student: dict[str, Any]) -> InstantEngine:
    """Takes the place of `workers.tasks.engine_for`: the job's student model names the engine
    (its cache key), whatever engine it asks for."""
    return InstantEngine(f"instant:{student['model']}")


def run(argv: list[str]) -> int:
    # Before the worker starts: `tasks.this_worker()` reads the factory when it first runs.
    tasks.engine_for = instant_engine_for
    return main(["worker", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
