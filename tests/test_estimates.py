"""Estimates of a job before it runs: the schedule's bounds, the cache looked up as the worker
looks it up, the workers' measured pace; refused exactly as the submission would be."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.domain import worst_case_generations
from app.audit.schemas import AuditConfig, Report
from app.estimates import service as estimates_service
from app.estimates.domain import (
    SampleStep,
    generations_per_prompt,
    sample_positions,
    sampling_steps,
)
from app.estimates.schemas import Bounds, Estimate
from app.estimates.service import estimate_job
from app.jobs import service as jobs_service
from app.jobs.schemas import JobCreate
from app.models import Job, Workspace
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.students.schemas import RegisteredStudent
from tests.conftest import bearer
from tests.test_api_jobs import RECORDS, STUDENTS, TINY, Recorder
from tests.test_jobs import knows_even_numbers, make_worker, numbers_dataset, run_all
from workers.engines.fake import FakeEngine

# --- the schedule's bounds --------------------------------------------------------------------


def test_full_mode_draws_every_sample_either_way() -> None:
    config = AuditConfig(mode="full", samples=16)
    assert sampling_steps(config, correct=True) == [SampleStep(0, 16)]
    assert sampling_steps(config, correct=False) == [SampleStep(0, 16)]


def test_adaptive_mode_draws_nothing_or_every_round() -> None:
    config = AuditConfig(mode="adaptive", samples=16)
    assert sampling_steps(config, correct=True) == []
    assert sampling_steps(config, correct=False) == [
        SampleStep(0, 1),
        SampleStep(1, 3),
        SampleStep(4, 12),
    ]
    assert sampling_steps(AuditConfig(samples=0), correct=False) == []


@pytest.mark.parametrize("mode", ["full", "adaptive"])
@pytest.mark.parametrize("samples", [0, 1, 5, 16, 100])
def test_the_worst_case_is_the_limit_a_submission_is_held_to(mode: str, samples: int) -> None:
    config = AuditConfig(mode=mode, samples=samples, n_exemplar_sets=7)
    prompts = 13 * 7
    assert prompts * generations_per_prompt(config, correct=False) == worst_case_generations(
        config, 13
    )
    best = prompts * generations_per_prompt(config, correct=True)
    assert best == (prompts if mode == "adaptive" else worst_case_generations(config, 13))


# --- estimate, run, estimate again ------------------------------------------------------------

FAKE = Settings(students={"fake": RegisteredStudent(engine="hf", model="fake")})


def estimate(
    sessions: sessionmaker[Session], workspace_id: uuid.UUID, submission: JobCreate
) -> Estimate:
    with sessions() as session:
        return estimate_job(session, workspace_id, submission, FAKE)


def run_job(
    sessions: sessionmaker[Session], workspace_id: uuid.UUID, submission: JobCreate
) -> Report:
    with sessions.begin() as session:
        workspace = session.get_one(Workspace, workspace_id)
        job, _ = jobs_service.create_job(session, workspace, submission, FAKE)
    engine = FakeEngine(knows_even_numbers)
    run_all(make_worker(sessions, lambda student: engine))
    with sessions() as session:
        return Report.model_validate(session.get_one(Job, job.id).report)


@pytest.mark.parametrize("mode", ["full", "adaptive"])
def test_the_estimate_bounds_the_job_and_counts_its_cache(
    sessions: sessionmaker[Session], mode: str
) -> None:
    """The even numbers are known (HighlyKnown), the odd ones not (Unknown): in adaptive mode
    the job lands strictly between the bounds."""
    workspace_id, dataset_id = numbers_dataset(sessions, 12)
    config = AuditConfig(mode=mode, n_exemplar_sets=3, samples=8)
    submission = JobCreate(dataset_id=dataset_id, student="fake", config=config)

    before = estimate(sessions, workspace_id, submission)
    assert (before.examples, before.prompts) == (12, 36)
    assert before.generations == Bounds(best=36 if mode == "adaptive" else 324, worst=324)
    assert before.cached == Bounds(best=0, worst=0)
    assert before.new == before.generations
    assert before.rate is None and before.seconds is None
    with sessions() as session:  # nothing was stored
        assert session.scalar(select(func.count()).select_from(Job)) == 0

    report = run_job(sessions, workspace_id, submission)
    generated = report.generations
    assert report.generations_cached == 0
    if mode == "full":
        assert generated == before.generations.best == before.generations.worst
    else:
        assert generated == 6 * 3 + 6 * 3 * 9  # greedy for all, every round for the odd ones
        assert before.generations.best < generated < before.generations.worst

    after = estimate(sessions, workspace_id, submission)
    assert after.generations == before.generations
    assert after.cached.worst == generated  # every completion the job made is a cache hit
    assert after.cached.best == (36 if mode == "adaptive" else 324)
    assert after.new.best == 0
    assert after.new.worst == after.generations.worst - generated
    assert after.rate is not None and after.rate.chunks == 3  # 12 examples, chunks of 4
    assert after.rate.generations_per_second > 0
    assert after.seconds is not None
    assert after.seconds.best == 0
    assert after.seconds.worst == pytest.approx(
        after.new.worst / after.rate.generations_per_second, rel=0.01, abs=0.1
    )


def test_a_large_dataset_is_looked_up_on_an_even_sample(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampled every third example (0, 3, 6, 9: two known, two not), the counts scaled up are
    the exact ones."""
    workspace_id, dataset_id = numbers_dataset(sessions, 12)
    config = AuditConfig(n_exemplar_sets=3, samples=8)
    submission = JobCreate(dataset_id=dataset_id, student="fake", config=config)
    report = run_job(sessions, workspace_id, submission)
    exact = estimate(sessions, workspace_id, submission)
    assert exact.cache_examples == 12
    monkeypatch.setattr(estimates_service, "CACHE_SAMPLE", 4)
    sampled = estimate(sessions, workspace_id, submission)
    assert sampled.cache_examples == 4
    assert sampled.cached == exact.cached == Bounds(best=36, worst=report.generations)


def test_sample_positions_spread_evenly() -> None:
    assert list(sample_positions(5, 10)) == [0, 1, 2, 3, 4]
    assert list(sample_positions(12, 4)) == [0, 3, 6, 9]
    spread = sample_positions(1_000_000, 10_000)
    assert len(set(spread)) == 10_000 and spread[-1] == 999_900


def test_another_workspace_finds_nothing_in_the_cache(sessions: sessionmaker[Session]) -> None:
    config = AuditConfig(mode="full", n_exemplar_sets=2, samples=2)
    workspace_id, dataset_id = numbers_dataset(sessions, 4)
    run_job(sessions, workspace_id, JobCreate(dataset_id=dataset_id, student="fake", config=config))
    other, same_questions = numbers_dataset(sessions, 4)
    submission = JobCreate(dataset_id=same_questions, student="fake", config=config)
    seen = estimate(sessions, other, submission)
    assert seen.cached == Bounds(best=0, worst=0)
    assert seen.rate is None
    changed = config.model_copy(update={"seed": 1})  # other exemplar sets: other prompts
    mine = JobCreate(dataset_id=dataset_id, student="fake", config=changed)
    assert estimate(sessions, workspace_id, mine).cached == Bounds(best=0, worst=0)


# --- through the API --------------------------------------------------------------------------


@pytest.fixture
def events() -> list[Any]:
    return []


@pytest.fixture
def settings(broker_url: str) -> Settings:
    return Settings(broker_url=broker_url, students=STUDENTS, max_generations_per_job=1000)


@pytest.fixture
def client(
    api: FastAPI, api_key: str, events: list[Any], settings: Settings
) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder(events)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


@pytest.fixture
def dataset_id(client: TestClient) -> str:
    content = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    return str(client.post("/v1/datasets", files={"file": ("t.jsonl", content)}).json()["id"])


def test_an_estimate_stores_and_queues_nothing(
    client: TestClient, dataset_id: str, events: list[Any]
) -> None:
    response = client.post("/v1/estimates", json={"dataset_id": dataset_id, "student": "tiny"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "dataset_id": dataset_id,
        "student": TINY,
        "mode": "adaptive",
        "examples": 5,
        "prompts": 50,
        "generations": {"best": 50, "worst": 850},
        "cached": {"best": 0, "worst": 0},
        "cache_examples": 5,
        "new": {"best": 50, "worst": 850},
        "rate": None,
        "seconds": None,
    }
    assert events == []
    assert client.get("/v1/jobs").json()["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"student": "qwen"},
        {"student": "/etc/passwd"},
        {"config": {"samples": -1}},
        {"config": {"mode": "thorough"}},
        {"config": {"prompt": {"query": "{question!r}"}}},
        {"config": {"samples": 32}},  # over max_generations_per_job
        {"webhook_url": "http://10.0.0.1/hook"},
        {"webhook_url": "ftp://example.com/hook"},
        {"surprise": True},
        {"dataset_id": str(uuid.uuid4())},
        {"dataset_id": "not-an-id"},
    ],
)
def test_refused_exactly_as_the_submission_would_be(
    client: TestClient,
    dataset_id: str,
    events: list[Any],
    body: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 80))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: private)
    submission = {"dataset_id": dataset_id, "student": "tiny", **body}
    estimated = client.post("/v1/estimates", json=submission)
    submitted = client.post("/v1/jobs", json=submission)
    assert estimated.status_code in (404, 422)
    assert (estimated.status_code, estimated.json()) == (submitted.status_code, submitted.json())
    assert events == []
