"""Store a batch of review decisions through a real `kma api` process: one PATCH of N items.

Usage: .venv/bin/python bench/review_batch.py [--items 100000] [--keep]

A succeeded job with N flagged verdicts is written straight into a fresh database (no worker
runs), then `PATCH /v1/jobs/{id}/examples` sends a decision for each: accept, reject and
override in turn. PostgreSQL and Redis as `bench/upload_export.py` finds them. The last line of
stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import Audit, AuditConfig, Category, SuggestedAction  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.models import Dataset, Job, JobStatus, utcnow  # noqa: E402
from app.workspaces.service import create_key, ensure_workspace  # noqa: E402
from bench.upload_export import (  # noqa: E402
    MB,
    api_process,
    broker,
    database,
    machine,
    run_in_work_dir,
)

FLAGGED = Audit(
    category=Category.UNKNOWN,
    flagged=True,
    p_greedy=0.0,
    p_sample=0.0,
    student_answer="B",
    agreement=1.0,
    suggested_action=SuggestedAction.RELABEL_STUDENT,
    suggested_answer="B",
    generations=170,
)


@dataclass
class Result:
    items: int
    body_mb: float
    seconds: float
    items_per_s: float
    reviewed: int
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def flagged_job(database_url: str, items: int) -> tuple[str, str]:
    """A succeeded job whose `items` examples are all flagged, and a key of its workspace."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = create_key(session, "reviewer", "bench")[1]
            workspace_id = ensure_workspace(session, "bench").id
            dataset = Dataset(
                workspace_id=workspace_id, name="flagged", format="qa", num_examples=items
            )
            session.add(dataset)
            session.flush()
            job = Job(
                workspace_id=workspace_id,
                dataset_id=dataset.id,
                status=JobStatus.SUCCEEDED,
                student={"name": "bench", "engine": "hf", "model": "bench"},
                config=AuditConfig().model_dump(mode="json"),
                total=items,
                finished_at=utcnow(),
            )
            session.add(job)
            session.flush()
            ids = {"dataset": dataset.id, "job": job.id, "last": items - 1}
            session.execute(
                text(
                    "INSERT INTO example (dataset_id, position, line, record_id, raw) "
                    "SELECT :dataset, i, i + 1, 'q' || i, json_build_object("
                    "'question', 'Question ' || i || '?', 'answer', 'A') "
                    "FROM generate_series(0, :last) AS i"
                ),
                ids,
            )
            session.execute(
                text(
                    "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, "
                    "answers) SELECT :job, i, 'Unknown', true, false, CAST(:audit AS jsonb), "
                    "'{}'::jsonb FROM generate_series(0, :last) AS i"
                ),
                {**ids, "audit": FLAGGED.model_dump_json()},
            )
            session.commit()
            return str(job.id), key
    finally:
        engine.dispose()


def decisions(items: int) -> bytes:
    return json.dumps(
        {
            "items": [
                {"position": i, "decision": "override", "answer": f"Answer {i}"}
                if i % 3 == 2
                else {"position": i, "decision": ("accept", "reject")[i % 3]}
                for i in range(items)
            ]
        }
    ).encode()


def run(items: int, work_dir: Path, keep: bool) -> Result:
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir))
        job_id, key = flagged_job(database_url, items)
        _, base_url = stack.enter_context(
            api_process(database_url, broker_url, work_dir / "api.log")
        )
        body = decisions(items)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        with httpx.Client(base_url=base_url, timeout=None, headers=headers) as client:
            started = time.perf_counter()
            response = client.patch(f"/v1/jobs/{job_id}/examples", content=body)
            seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"the batch answered {response.status_code}: {response.text[:2000]}")
        reviewed = response.json()["reviews"]["reviewed"]
        if reviewed != items:
            raise RuntimeError(f"{reviewed} examples reviewed, {items} decisions sent")
        return Result(
            items=items,
            body_mb=len(body) / MB,
            seconds=seconds,
            items_per_s=items / seconds,
            reviewed=reviewed,
            database=database_source,
            broker=broker_source,
            machine={**machine(database_url), "load_average": os.getloadavg()},
        )


def table(result: Result) -> str:
    return (
        f"{result.items:,} decisions, {result.body_mb:.1f} MB: {result.seconds:.1f} s, "
        f"{result.items_per_s:,.0f} decisions/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=100_000, help="decisions in the batch")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and the database")
    args = parser.parse_args(argv)
    if args.items < 1:
        parser.error("--items must be at least 1")
    return run_in_work_dir(
        lambda work_dir: run(args.items, work_dir, args.keep), table, args.keep, ["api.log"]
    )


if __name__ == "__main__":
    sys.exit(main())
