"""A rescore through the real service (the API, a worker, the hf engine, the tiny student):
gold answers with a suffix the student never says (" Town"), so that `normalized_exact` and
`contains` disagree; rescoring with `contains` generates nothing and gives the verdicts that
judging the stored answers with `contains` gives, and those of a fresh `contains` job."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.domain import judge
from app.audit.repository import tally_from_answers
from app.audit.schemas import AuditConfig
from app.datasets.domain import parse_record
from app.db import make_engine
from app.models import Example, Verdict
from kma.tiny_student import write_dataset
from tests.conftest import fresh_database
from tests.servers import Service, kma_service

pytestmark = pytest.mark.slow

QUICK = {"n_exemplar_sets": 4, "samples": 8}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_admin_url: str,
    broker_url: str,
    student_dir: Path,
) -> Iterator[Service]:
    """`kma api` and `kma worker` on a fresh database, with the tiny student registered."""
    root = tmp_path_factory.mktemp("rescore")
    with (
        fresh_database(postgres_admin_url) as database_url,
        kma_service(
            root, database_url, broker_url, {"tiny": {"engine": "hf", "model": str(student_dir)}}
        ) as service,
    ):
        yield service


@pytest.fixture(scope="module")
def dataset_id(service: Service, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Facts the student was trained on and facts it never saw, every gold answer + " Town"."""
    path = tmp_path_factory.mktemp("data") / "towns.jsonl"
    write_dataset(path, n_trained=30, n_unseen=30)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    towns = [{**r, "answer": r["answer"] + " Town"} for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in towns))
    return str(service.client.upload_dataset(path)["id"])


def run(service: Service, dataset_id: str, **config: Any) -> dict[str, Any]:
    job = service.client.create_job(dataset_id, "tiny", config=config)
    return finish(service, job["id"])


def finish(service: Service, job_id: str) -> dict[str, Any]:
    job = service.client.wait(job_id, timeout=900, poll_seconds=0.5)
    assert job["status"] == "succeeded", job
    return job


def audits(service: Service, job_id: str) -> list[dict[str, Any]]:
    items, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = service.client.http.get(f"/v1/jobs/{job_id}/examples", params=params).json()
        items += [item["audit"] for item in page["items"]]
        if (cursor := page["next_cursor"]) is None:
            return items


def judged_again(
    service: Service, job: dict[str, Any], config: AuditConfig
) -> list[dict[str, Any]]:
    """The job's stored answers, judged here under `config` with the pure rules."""
    engine = make_engine(service.database_url)
    try:
        with Session(engine) as session:
            rows = session.execute(
                select(Verdict, Example)
                .join(Example, Example.position == Verdict.position)
                .where(
                    Verdict.job_id == uuid.UUID(job["id"]),
                    Example.dataset_id == uuid.UUID(job["dataset_id"]),
                )
                .order_by(Verdict.position)
            ).all()
            return [
                judge(
                    parse_record("qa", example.raw, example.line),
                    tally_from_answers(verdict.answers),
                    config,
                ).audit.model_dump(mode="json")
                for verdict, example in rows
            ]
    finally:
        engine.dispose()


def test_a_contains_rescore_is_a_fresh_contains_job_with_no_generation(
    service: Service, dataset_id: str
) -> None:
    exact = run(service, dataset_id, mode="full", **QUICK)
    assert exact["generations"]["new"] == 60 * 4 * 9

    rescored = service.kma("rescore", exact["id"], "--config", "matcher=contains", "--wait")
    assert rescored.returncode == 0, rescored.stderr
    job_id = rescored.stdout.strip()
    job = service.client.get_job(job_id)
    assert job["rescore_of"] == exact["id"]
    assert job["generations"] == {"new": 0, "cached": 60 * 4 * 9}
    assert "generations: 0 new, 2160 from the stored answers" in rescored.stderr

    contains = AuditConfig.model_validate(job["config"])
    assert contains.matcher == "contains" and contains.mode == "full"
    assert audits(service, job_id) == judged_again(service, exact, contains)
    # The matchers disagree on these answers: the student says "Quell", the teacher "Quell Town".
    before, after = service.client.report(exact["id"]), service.client.report(job_id)
    assert after.categories != before.categories
    assert after.flagged < before.flagged
    assert after.generations == 0

    fresh = run(service, dataset_id, mode="full", matcher="contains", **QUICK)
    assert fresh["generations"]["new"] == 0  # the same prompts: the same cached answers
    assert audits(service, fresh["id"]) == audits(service, job_id)


def test_an_adaptive_rescore_draws_what_the_stricter_matcher_needs(
    service: Service, dataset_id: str
) -> None:
    """Under `contains` the student's "Quell" settles a fact at its greedy answers; under
    `normalized_exact` it does not, and the sampling rounds a fresh job would draw are drawn."""
    loose = run(service, dataset_id, matcher="contains", seed=5, **QUICK)
    job = service.client.rescore(loose["id"], {"matcher": "normalized_exact"})
    job = finish(service, job["id"])
    drawn = sum(a["generations"] for a in audits(service, job["id"]))
    assert job["generations"]["new"] > 0
    assert job["generations"]["new"] + job["generations"]["cached"] == drawn
    assert service.client.report(job["id"]).generations == job["generations"]["new"]

    back = finish(service, service.client.rescore(job["id"], {"matcher": "contains"})["id"])
    assert back["generations"]["new"] == 0
    assert audits(service, back["id"]) == audits(service, loose["id"])
