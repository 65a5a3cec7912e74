"""Rescore: a new job that judges a succeeded job's stored answers with other judging options.

The API's refusals run in the test's rolled-back session; the rescores themselves run through
the worker's own steps on the real database with a scripted student, and are held to the
verdicts a fresh job with the new options gives in a workspace of its own (where no answer is
cached, so every one is generated again).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from alembic import command
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.repository import tally_from_answers
from app.audit.schemas import GENERATION_OPTIONS, JUDGING_OPTIONS, AuditConfig, Report
from app.db import alembic_config
from app.jobs import service
from app.jobs.schemas import JobRead, JobRescore
from app.models import Decision, Job, JobStatus, Review, Verdict, Workspace, utcnow
from app.queue import WORK, get_queue
from app.reviews import repository as reviews_repository
from app.reviews.schemas import ReviewUpdate
from app.settings import Settings, get_settings
from tests.conftest import assert_documented, bearer, fresh_database, new_workspace
from tests.test_api_jobs import STUDENTS, Recorder, add_verdicts, set_status, submit
from tests.test_jobs import get_job, make_job, make_worker, run_all
from tests.test_reviews import AUDITS, JSONL
from workers import jobs
from workers.engines.base import GenerationRequest, GenerationResult, SamplingOptions
from workers.engines.fake import FakeEngine
from workers.engines.lazy import LazyEngine

# --- the request, refused or taken ------------------------------------------------------------


@pytest.fixture
def events() -> list[Any]:
    return []


@pytest.fixture
def client(api: FastAPI, api_key: str, broker_url: str, events: list[Any]) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder(events)
    settings = Settings(broker_url=broker_url, students=STUDENTS)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


@pytest.fixture
def succeeded(client: TestClient, session: Session) -> str:
    """A succeeded job of the test workspace, with idk_text and exemplar sets of its own."""
    dataset_id = client.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)}).json()["id"]
    job_id = submit(client, dataset_id, config={"idk_text": "No idea.", "samples": 5})["id"]
    add_verdicts(session, job_id, AUDITS)
    set_status(
        session,
        job_id,
        JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        exemplar_sets={"": [[{"question": "q", "answer": "a"}]]},
    )
    return str(job_id)


def rescore(client: TestClient, job_id: str, **body: Any) -> Any:
    return client.post(f"/v1/jobs/{job_id}/rescore", json=body)


OPERATION = "POST /v1/jobs/{job_id}/rescore"


def test_a_rescore_is_a_new_queued_job_with_the_merged_options(
    api: FastAPI, client: TestClient, session: Session, succeeded: str, events: list[Any]
) -> None:
    response = rescore(client, succeeded, config={"matcher": "contains"})
    assert response.status_code == 202, response.text
    assert_documented(api, OPERATION, response)
    job = JobRead.model_validate(response.json())
    source = session.get_one(Job, uuid.UUID(succeeded))
    assert job.id != source.id
    assert job.status == JobStatus.QUEUED
    assert job.rescore_of == source.id
    assert (job.reviews_carried, job.reviews_not_carried) == (None, None)
    assert job.dataset_id == source.dataset_id
    # The option given changes; those left out keep the source's, not the defaults.
    assert job.config == AuditConfig.model_validate(source.config).model_copy(
        update={"matcher": "contains"}
    )
    assert (job.config.idk_text, job.config.samples) == ("No idea.", 5)
    stored = session.get_one(Job, job.id)
    assert stored.exemplar_sets == source.exemplar_sets  # planned as the source was: no redraw
    assert stored.student == source.student
    assert events[-1] == (WORK,)
    assert client.get(f"/v1/jobs/{job.id}").json()["rescore_of"] == succeeded
    assert client.get(f"/v1/jobs/{succeeded}").json()["rescore_of"] is None


def test_a_rescores_report_page_links_to_its_sources(
    api: FastAPI, client: TestClient, session: Session, succeeded: str
) -> None:
    job_id = rescore(client, succeeded, config={"matcher": "contains"}).json()["id"]
    add_verdicts(session, job_id, AUDITS)
    set_status(session, job_id, JobStatus.SUCCEEDED, finished_at=utcnow(), reviews_carried=3)
    link = client.get(f"/v1/jobs/{job_id}").json()["links"]["report_html"]
    with TestClient(api) as browser:  # no key: the links' tokens open the pages
        page = browser.get(link)
        assert page.status_code == 200
        assert "3 of its review decisions carried over" in page.text
        source_link = page.text.split('id="rescore-of"')[1].split('href="')[1].split('"')[0]
        assert source_link.startswith(f"/v1/jobs/{succeeded}/report.html?access=")
        source = browser.get(source_link.replace("&amp;", "&"))
        assert source.status_code == 200
        assert f"job <code>{succeeded}</code>" in source.text
        assert 'id="rescore-of"' not in source.text


@pytest.mark.parametrize("option", GENERATION_OPTIONS)
def test_an_option_that_needs_new_generations_is_refused_at_its_place(
    api: FastAPI, client: TestClient, succeeded: str, option: str
) -> None:
    value = AuditConfig().model_dump(mode="json")[option]
    response = rescore(client, succeeded, config={"matcher": "contains", option: value})
    assert response.status_code == 422, response.text
    assert_documented(api, OPERATION, response)
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "config", option]
    assert error["type"] == "needs_generations"
    assert error["msg"].startswith(f"{option} changes the student's answers")
    assert "submit a new job" in error["msg"]


def test_unknown_and_invalid_options_are_refused_as_usual(
    client: TestClient, succeeded: str
) -> None:
    response = rescore(client, succeeded, config={"matcher": "fuzzy", "colour": "red"})
    assert response.status_code == 422
    assert {tuple(e["loc"]): e["type"] for e in response.json()["detail"]} == {
        ("body", "config", "matcher"): "literal_error",
        ("body", "config", "colour"): "extra_forbidden",
    }
    response = rescore(client, succeeded, config={}, student="fleet")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "student"]


def test_a_webhook_to_a_private_address_is_refused(client: TestClient, succeeded: str) -> None:
    response = rescore(client, succeeded, webhook_url="http://10.1.2.3/hook")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "webhook_url"]


def test_another_workspaces_job_is_not_found(
    api: FastAPI, client: TestClient, session: Session, succeeded: str
) -> None:
    job = session.get_one(Job, uuid.UUID(succeeded))
    job.workspace_id = new_workspace(session)
    session.commit()
    response = rescore(client, succeeded, config={"matcher": "contains"})
    assert response.status_code == 404
    assert_documented(api, OPERATION, response)
    assert rescore(client, str(uuid.uuid4())).status_code == 404


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.CANCELLED, JobStatus.FAILED])
def test_only_a_succeeded_job_is_rescored(
    api: FastAPI, client: TestClient, session: Session, succeeded: str, status: JobStatus
) -> None:
    set_status(session, succeeded, status)
    response = rescore(client, succeeded, config={"matcher": "contains"})
    assert response.status_code == 409
    assert_documented(api, OPERATION, response)
    assert response.json()["detail"] == (
        f"job {succeeded} is {status.value}: only a succeeded job is rescored, since its "
        "answers are all stored"
    )


def test_a_student_no_longer_registered_as_it_was_is_a_conflict(
    api: FastAPI, client: TestClient, broker_url: str, succeeded: str
) -> None:
    moved = {**STUDENTS, "tiny": {"engine": "auto", "model": "/models/tiny-v2"}}
    api.dependency_overrides[get_settings] = lambda: Settings(broker_url=broker_url, students=moved)
    response = rescore(client, succeeded, config={"matcher": "contains"})
    assert response.status_code == 409
    assert "no longer registered as it was" in response.json()["detail"]


def test_the_client_and_the_options_lists_agree() -> None:
    assert set(JUDGING_OPTIONS) | set(GENERATION_OPTIONS) == set(AuditConfig.model_fields)
    assert not set(JUDGING_OPTIONS) & set(GENERATION_OPTIONS)
    assert {"samples", "shots", "temperature", "prompt", "mode", "seed"} <= set(GENERATION_OPTIONS)


# --- the rescore run, against a fresh job -----------------------------------------------------

FAKE_STUDENTS: Any = {"fake": {"engine": "hf", "model": "fake"}}


def pick(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big")


ANSWERS = {
    0: (("7777", "Vark"), ("7777", "Vark")),
    1: (("{n} Town", "7777", "Vark", "Vark"), ("{n} Town", "7777", "Vark", "Vark")),
    2: (("{n}", "{n} Town", "7777", "Vark"), ("{n}", "{n} Town") + ("7777", "Vark") * 3),
}
"""By the number asked, modulo 3, the greedy answers and the samples the student picks from:
it never knows 0, 3, 6, ...; it says "1 Town" for 1 (which only `contains` takes); it knows
2, 5, 8, ... some of the time."""


def town_student(request: GenerationRequest) -> GenerationResult:
    """Answers that the matchers judge apart, the same whenever the same request is made:
    greedy ones by the prompt, each sample by its prompt, its round's size and its place."""
    assert isinstance(request.prompt, str)
    number = request.prompt.rsplit("number ", 1)[1].split("?")[0]
    greedy, sampled = ANSWERS[int(number) % 3]
    if request.options.greedy:
        picks = [greedy[pick(request.prompt) % len(greedy)]]
    else:
        n = request.options.n
        picks = [sampled[pick(request.prompt, n, k) % len(sampled)] for k in range(n)]
    return GenerationResult([" " + p.format(n=number) for p in picks])


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(town_student)


def fake_worker(
    sessions: sessionmaker[Session], engine: FakeEngine, loads: list[str] | None = None
) -> jobs.Worker:
    """A worker whose student is `engine`; each load of it is noted in `loads`."""

    def engine_for(student: dict[str, Any]) -> FakeEngine:
        if loads is not None:
            loads.append(student["name"])
        return engine

    return make_worker(sessions, engine_for, students=FAKE_STUDENTS)


def rescore_of(sessions: sessionmaker[Session], job_id: uuid.UUID, **options: Any) -> uuid.UUID:
    """Submit a rescore of the job as the API does; returns the new job's id."""
    with sessions() as session:
        workspace = session.get_one(Workspace, get_job(sessions, job_id).workspace_id)
        job = service.rescore_job(
            session,
            workspace,
            job_id,
            JobRescore.model_validate({"config": options}),
            Settings(students=FAKE_STUDENTS),
        )
        session.commit()
    return job.id


def verdicts(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[dict[str, Any]]:
    with sessions() as session:
        rows = session.scalars(
            select(Verdict).where(Verdict.job_id == job_id).order_by(Verdict.position)
        ).all()
        return [
            {"audit": v.audit, "conflict": v.conflict, "answers": tally_from_answers(v.answers)}
            for v in rows
        ]


def report(sessions: sessionmaker[Session], job_id: uuid.UUID) -> Report:
    return Report.model_validate(get_job(sessions, job_id).report)


N = 24


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("normalized_exact", {"matcher": "contains"}),
        ("contains", {"matcher": "normalized_exact"}),
        ("contains", {"matcher": "token_f1", "f1_threshold": 0.8}),
    ],
)
def test_a_full_rescore_generates_nothing_and_judges_as_a_fresh_job(
    sessions: sessionmaker[Session], engine: FakeEngine, old: str, new: dict[str, Any]
) -> None:
    source = make_job(sessions, N, mode="full", samples=6, n_exemplar_sets=3, matcher=old)
    loads: list[str] = []
    worker = fake_worker(sessions, engine, loads)
    run_all(worker)
    calls, loaded = len(engine.calls), len(loads)
    assert loaded == N // 4  # once a chunk (of 4 examples)

    rescored = rescore_of(sessions, source, **new)
    run_all(worker)
    assert len(engine.calls) == calls  # the student was not asked a thing,
    assert len(loads) == loaded  # nor even loaded
    job = get_job(sessions, rescored)
    assert job.status == JobStatus.SUCCEEDED
    assert (job.generations, job.cached_generations) == (0, N * 3 * (1 + 6))
    assert report(sessions, rescored).generations == 0

    # A fresh job with the new matcher, in a workspace of its own: every answer generated anew.
    fresh = make_job(sessions, N, mode="full", samples=6, n_exemplar_sets=3, **new)
    run_all(worker)
    assert get_job(sessions, fresh).generations == N * 3 * (1 + 6)
    assert verdicts(sessions, rescored) == verdicts(sessions, fresh)
    assert verdicts(sessions, rescored) != verdicts(sessions, source)  # the matchers disagree
    assert report(sessions, rescored).categories == report(sessions, fresh).categories


def generations_of(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[int]:
    return [v["audit"]["generations"] for v in verdicts(sessions, job_id)]


@pytest.mark.parametrize(
    ("old", "new"), [("contains", "normalized_exact"), ("normalized_exact", "contains")]
)
def test_an_adaptive_rescore_draws_exactly_the_samples_the_new_matcher_needs(
    sessions: sessionmaker[Session], engine: FakeEngine, old: str, new: str
) -> None:
    """An example the old matcher settled early (a greedy answer "12 Town" that `contains`
    takes) may need sampling rounds under the new one: those, and only those, are generated,
    and the verdicts are a fresh adaptive job's. The other way, nothing is generated."""
    config = {"samples": 16, "n_exemplar_sets": 3}
    source = make_job(sessions, N, matcher=old, **config)
    worker = fake_worker(sessions, engine)
    run_all(worker)

    rescored = rescore_of(sessions, source, matcher=new)
    run_all(worker)
    fresh = make_job(sessions, N, matcher=new, **config)
    run_all(worker)
    assert verdicts(sessions, rescored) == verdicts(sessions, fresh)

    # Each example's rounds are a prefix of one schedule: what the source drew is reused, the
    # rest is drawn, and the job counts it.
    drawn_before, drawn_now = generations_of(sessions, source), generations_of(sessions, rescored)
    needed = sum(max(now - before, 0) for before, now in zip(drawn_before, drawn_now, strict=True))
    job = get_job(sessions, rescored)
    assert job.generations == needed
    assert job.generations + job.cached_generations == get_job(sessions, fresh).generations
    if old == "contains":
        assert needed > 0  # the case this test is for
    else:
        assert needed == 0
    assert report(sessions, rescored).generations == needed


def decide(
    sessions: sessionmaker[Session], job_id: uuid.UUID, decisions: dict[int, Decision]
) -> None:
    with sessions.begin() as session:
        reviews_repository.save_reviews(
            session,
            job_id,
            [(p, ReviewUpdate(decision=d)) for p, d in decisions.items()],
            None,
            "tests",
        )


def audits(sessions: sessionmaker[Session], job_id: uuid.UUID) -> dict[int, dict[str, Any]]:
    return dict(enumerate(v["audit"] for v in verdicts(sessions, job_id)))


def test_decisions_are_carried_where_they_still_apply_and_counted_where_not(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    source = make_job(sessions, N, mode="full", samples=6, n_exemplar_sets=3)
    worker = fake_worker(sessions, engine)
    run_all(worker)
    before = audits(sessions, source)
    flagged = [p for p, a in before.items() if a["flagged"]]
    assert len(flagged) >= 4
    # Every flagged example decided on: rejects, and accepts of the suggested relabel.
    decisions = {p: Decision.REJECT if p // 3 % 2 else Decision.ACCEPT for p in flagged}
    decide(sessions, source, decisions)

    # Another matcher (some examples no longer flagged) and another idk text (every relabel to
    # it is a new suggestion).
    rescored = rescore_of(sessions, source, matcher="contains", idk_text="Unsure.")
    assert get_job(sessions, rescored).reviews_carried is None
    run_all(worker)
    after = audits(sessions, rescored)

    def applies(position: int, decision: Decision) -> bool:
        if not after[position]["flagged"]:
            return False
        return decision != Decision.ACCEPT or (
            after[position]["suggested_answer"] == before[position]["suggested_answer"]
        )

    carried = {p: d for p, d in decisions.items() if applies(p, d)}
    assert 0 < len(carried) < len(decisions)
    job = get_job(sessions, rescored)
    assert (job.reviews_carried, job.reviews_not_carried) == (
        len(carried),
        len(decisions) - len(carried),
    )
    with sessions() as session:
        copied = session.scalars(select(Review).where(Review.job_id == rescored)).all()
        assert {r.position: r.decision for r in copied} == carried
        assert {r.reviewed_by for r in copied} == {"tests"}
        # The source keeps its own.
        assert len(session.scalars(select(Review).where(Review.job_id == source)).all()) == len(
            decisions
        )
        read = service.get_job(session, session.get_one(Workspace, job.workspace_id), rescored)
    assert (read.rescore_of, read.reviews_carried, read.reviews_not_carried) == (
        source,
        len(carried),
        len(decisions) - len(carried),
    )
    assert read.reviews.reviewed == len(carried)


def test_a_rescore_whose_source_is_deleted_still_runs(
    sessions: sessionmaker[Session], engine: FakeEngine
) -> None:
    source = make_job(sessions, 8, mode="full", samples=2, n_exemplar_sets=2)
    worker = fake_worker(sessions, engine)
    run_all(worker)
    rescored = rescore_of(sessions, source, matcher="contains")
    with sessions() as session:
        workspace_id = get_job(sessions, source).workspace_id
        service.delete_job(session, workspace_id, source)
        session.commit()
    run_all(worker)
    job = get_job(sessions, rescored)
    assert job.status == JobStatus.SUCCEEDED
    assert job.rescore_of is None
    assert (job.reviews_carried, job.reviews_not_carried) == (None, None)
    assert job.generations == 0  # the answers outlive the job, in the generation cache


def test_the_migration_goes_down_and_up_again(postgres_admin_url: str) -> None:
    """0007 adds the link, its index and the counts, and takes them away again."""
    with fresh_database(postgres_admin_url) as url:
        config = alembic_config(url)
        command.downgrade(config, "0006")
        with psycopg.connect(url) as conn:
            columns = {
                name
                for (name,) in conn.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'job'"
                )
            }
        assert not columns & {"rescore_of", "reviews_carried", "reviews_not_carried"}
        command.upgrade(config, "head")
        with psycopg.connect(url) as conn:
            (index,) = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_job_rescore_of'"
            ).fetchone() or (None,)
        assert index is not None and "WHERE (rescore_of IS NOT NULL)" in index


def test_a_lazy_engine_loads_on_the_first_request_and_checks_its_model() -> None:
    loads: list[FakeEngine] = []

    def load() -> FakeEngine:
        loads.append(FakeEngine(town_student, model_id="fake"))
        return loads[-1]

    engine = LazyEngine(load, "fake")
    assert not engine.loaded and loads == []
    request = GenerationRequest("Q: What is number 4?\nA:", SamplingOptions())
    engine.generate([request])
    engine.generate([request])
    assert engine.loaded and len(loads) == 1 and len(loads[0].calls) == 2
    other = LazyEngine(lambda: FakeEngine(town_student, model_id="other"), "fake")
    with pytest.raises(RuntimeError, match="cached under another model's keys"):
        other.generate([request])
