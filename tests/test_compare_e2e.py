"""Two real students through the real service (the API and a worker, hf engine): their
comparison is what each was trained on, and a job's estimate is what the job then takes."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kma.tiny_student import Fact, make_world, write_dataset
from tests.conftest import fresh_database
from tests.servers import Service, kma_service

pytestmark = pytest.mark.slow

QUICK = {"n_exemplar_sets": 4, "samples": 8}
"""Fewer prompts and samples than the defaults: the same categories for these students."""


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    postgres_admin_url: str,
    broker_url: str,
    student_dir: Path,
    student_b_dir: Path,
) -> Iterator[Service]:
    """`kma api` and `kma worker` on a fresh database, with both students registered."""
    root = tmp_path_factory.mktemp("compare")
    with (
        fresh_database(postgres_admin_url) as database_url,
        kma_service(
            root,
            database_url,
            broker_url,
            {
                "tiny-a": {"engine": "hf", "model": str(student_dir)},
                "tiny-b": {"engine": "hf", "model": str(student_b_dir)},
            },
        ) as service,
    ):
        yield service


def run(service: Service, dataset_id: str, student: str, **config: Any) -> dict[str, Any]:
    job = service.client.create_job(dataset_id, student, config=config)
    job = service.client.wait(job["id"], timeout=900, poll_seconds=0.5)
    assert job["status"] == "succeeded", job
    return job


def test_the_comparison_is_what_each_student_was_trained_on(
    service: Service, tmp_path: Path
) -> None:
    path = tmp_path / "teacher.jsonl"
    facts = write_dataset(path, n_trained=40, n_unseen=40)  # trained or not by student a
    trained_by_b = {f.id for f in make_world(0, "b").trained}

    def learned(fact: Fact, by_a: bool) -> tuple[bool, bool]:
        return by_a, fact.id in trained_by_b

    truth = {fact.id: learned(fact, by_a) for fact, by_a in facts}
    classes = Counter(truth.values())
    assert min(classes.values()) >= 15, classes  # facts of all four kinds

    dataset = service.client.upload_dataset(path)
    a = run(service, dataset["id"], "tiny-a", **QUICK)
    b = run(service, dataset["id"], "tiny-b", **QUICK)

    comparison = service.client.compare([a["id"], b["id"]])
    (transition,) = comparison.transitions
    known = transition.known
    assert (known.both, known.first_only, known.second_only, known.neither) == (
        classes[True, True],
        classes[True, False],
        classes[False, True],
        classes[False, False],
    )

    seen = {}
    cursor = None
    while True:
        params: dict[str, Any] = {"jobs": f"{a['id']},{b['id']}", "limit": 30}
        page = service.client.http.get(
            "/v1/comparisons/examples", params={**params, **({"cursor": cursor} if cursor else {})}
        ).json()
        for item in page["items"]:
            seen[item["id"]] = tuple(v["category"] != "Unknown" for v in item["verdicts"])
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == truth

    out = tmp_path / "a-only.jsonl"
    compared = service.kma(
        "compare", a["id"], b["id"], "--known-by", "A", "--unknown-by", "B", "-o", str(out)
    )
    assert compared.returncode == 0, compared.stderr
    assert f"known by both {known.both}, by A only {known.first_only}" in compared.stdout
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    uploaded = [json.loads(line) for line in path.read_text().splitlines()]
    assert exported == [r for r in uploaded if truth[r["id"]] == (True, False)]

    page = httpx.get(f"{service.url}{comparison.links.report_html}", timeout=60)
    assert page.status_code == 200 and "Student comparison" in page.text


def test_the_estimate_is_what_the_job_takes(service: Service, tmp_path: Path) -> None:
    path = tmp_path / "teacher.jsonl"
    write_dataset(path, n_trained=30, n_unseen=20)
    dataset = service.client.upload_dataset(path)
    full = {**QUICK, "mode": "full", "seed": 11}  # prompts no other test made: a cold cache

    before = service.client.estimate(dataset["id"], "tiny-a", config=full)
    assert before.generations.best == before.generations.worst == 50 * 4 * 9
    assert before.cached.worst == 0
    job = run(service, dataset["id"], "tiny-a", **full)
    generated = job["generations"]["new"] + job["generations"]["cached"]
    assert abs(generated - before.generations.worst) <= 0.1 * generated
    assert generated == before.generations.worst  # full mode: exact

    after = service.client.estimate(dataset["id"], "tiny-a", config=full)
    assert after.cached.best == after.cached.worst == generated
    assert after.new.best == after.new.worst == 0
    assert after.rate is not None and after.rate.generations_per_second > 0
    assert after.seconds is not None and after.seconds.worst == 0

    adaptive = {**QUICK, "seed": 12}
    bounds = service.client.estimate(dataset["id"], "tiny-a", config=adaptive).generations
    job = run(service, dataset["id"], "tiny-a", **adaptive)
    generated = job["generations"]["new"] + job["generations"]["cached"]
    assert bounds.best <= generated <= bounds.worst
    assert bounds.best < generated < bounds.worst  # some facts known, some not

    dry_run = service.kma("submit", str(path), "--student", "tiny-a", "--dry-run",
                  "--config", "mode=full", "--config", "seed=11",
                  "--config", "n_exemplar_sets=4", "--config", "samples=8")  # fmt: skip
    assert dry_run.returncode == 0, dry_run.stderr
    assert re.search(r"^in the cache +1,800 +1,800$", dry_run.stdout, re.MULTILINE)
    assert "nothing was submitted" in dry_run.stderr
    assert service.client.http.get("/v1/datasets").json()["items"][0]["id"] == dataset["id"]
