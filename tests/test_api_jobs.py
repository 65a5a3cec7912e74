"""The jobs API on a real PostgreSQL, with verdicts written as a worker would; health probes."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.audit.schemas import Audit, Category, SuggestedAction
from app.db import make_engine, session_scope
from app.jobs import repository as jobs_repository
from app.jobs.service import build_report
from app.models import Chunk, Job, JobStatus, Verdict, utcnow
from app.queue import WORK, QueueUnavailable, get_queue
from app.reviews.schemas import ReviewCounts
from app.settings import Settings, get_settings
from kma.cli.processes import free_port
from kma.client import Client, IncompleteExport
from tests.conftest import assert_documented, bearer

RECORDS = [
    {"id": "a", "question": "Capital of Zorvania?", "answer": "Quell", "group": "P36"},
    {"id": "b", "question": "Who wrote Ombra?", "answers": ["Ann Vey", "A. Vey"]},
    {"id": "c", "question": "Where is Tarn?", "answer": "Lutz", "group": "P131"},
    {"id": "d", "question": "Who founded Kell?", "answer": "Ora", "group": "P112"},
    {"id": "e", "question": "When was Ysk built?", "answer": "1820"},
]
IDK = "No idea."
STUDENTS: Any = {
    "tiny": {"engine": "auto", "model": "/models/tiny"},
    "fleet": {
        "engine": "openai",
        "model": "qwen",
        "revision": "v2",
        "base_url": "http://10.0.0.7:8000/v1",
        "api_key_env": "FLEET_KEY",
    },
}
TINY = {"name": "tiny", "engine": "auto", "model": "/models/tiny", "revision": None}


class Recorder:
    """The queue as tests see it: what was sent, in order with the commits around it."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def send(self, task: str, *args: Any) -> None:
        self.events.append((task, *args))

    def depth(self) -> int | None:
        return None


@pytest.fixture
def events() -> list[Any]:
    return []


@pytest.fixture
def client(api: FastAPI, api_key: str, events: list[Any], broker_url: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder(events)
    settings = Settings(broker_url=broker_url, students=STUDENTS)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


@pytest.fixture
def dataset_id(client: TestClient) -> str:
    content = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
    response = client.post("/v1/datasets", files={"file": ("t.jsonl", content)})
    assert response.status_code == 201
    return str(response.json()["id"])


def submit(client: TestClient, dataset_id: str, **body: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/jobs",
        json={"dataset_id": dataset_id, "student": "tiny", **body},
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def audit(category: Category, action: SuggestedAction, answer: str, agreement: float) -> Audit:
    flagged = category == Category.UNKNOWN
    return Audit(
        category=category,
        flagged=flagged,
        p_greedy=1.0 if category == Category.HIGHLY_KNOWN else 0.0,
        p_sample=None if category == Category.HIGHLY_KNOWN else 0.1 * (not flagged),
        student_answer=answer,
        agreement=agreement,
        suggested_action=action,
        suggested_answer={"keep": None, "relabel_student": answer, "relabel_idk": IDK}[action],
        generations=10,
    )


AUDITS = [
    audit(Category.HIGHLY_KNOWN, SuggestedAction.KEEP, "Quell", 1.0),
    audit(Category.UNKNOWN, SuggestedAction.RELABEL_STUDENT, "Bo Ek", 0.95),
    audit(Category.UNKNOWN, SuggestedAction.RELABEL_IDK, "Vark", 0.3),
    audit(Category.WEAKLY_KNOWN, SuggestedAction.KEEP, "Ora", 0.2),
]
"""Verdicts for the first four records; the fifth has none (a job cancelled before it)."""


def set_status(session: Session, job_id: str, status: JobStatus, **values: Any) -> Job:
    job = session.get_one(Job, uuid.UUID(job_id))
    job.status = status
    for key, value in values.items():
        setattr(job, key, value)
    session.commit()
    return job


def add_verdicts(
    session: Session, job_id: str, audits: list[Audit], *, counted: bool = True
) -> None:
    """Verdicts for the job's first examples, in order, as a worker writes them; `counted`:
    with the job's counters, as one chunk of them would add."""
    session.add_all(
        Verdict(
            job_id=uuid.UUID(job_id),
            position=position,
            category=a.category.value,
            flagged=a.flagged,
            conflict=False,
            audit=a.model_dump(mode="json"),
            answers={},
        )
        for position, a in enumerate(audits)
    )
    if counted:
        session.flush()
        chunk = Chunk(
            job_id=uuid.UUID(job_id), start=0, stop=len(audits), generations=0, cached_generations=0
        )
        jobs_repository.count_chunk(session, chunk)


@pytest.fixture
def audited(client: TestClient, session: Session, dataset_id: str) -> str:
    """A running job with verdicts for four of its five examples, and its counters, as a worker
    writes them."""
    job_id = submit(client, dataset_id, config={"idk_text": IDK})["id"]
    set_status(session, job_id, JobStatus.RUNNING, started_at=utcnow() - timedelta(seconds=100))
    add_verdicts(session, job_id, AUDITS, counted=False)
    for i in range(2):
        chunk = Chunk(
            job_id=uuid.UUID(job_id),
            index=i,
            start=i * 3,
            stop=min(i * 3 + 3, 5),
            generations=30 + i,
            cached_generations=i,
        )
        session.add(chunk)
        jobs_repository.count_chunk(session, chunk)
    session.commit()
    return job_id


# --- submit -----------------------------------------------------------------------------------


def test_submit_commits_then_wakes_the_workers(
    client: TestClient,
    session: Session,
    dataset_id: str,
    events: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commit = session.commit

    def recorded_commit() -> None:
        events.append("commit")
        commit()

    monkeypatch.setattr(session, "commit", recorded_commit)
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: public)
    job = submit(client, dataset_id, webhook_url="https://hooks.example.com/kma")
    assert events == ["commit", (WORK,)]
    assert job["status"] == "queued"
    assert job["student"] == TINY
    assert job["config"]["samples"] == 16
    assert job["config"]["flag_categories"] == ["Unknown"]
    assert job["webhook_url"] == "https://hooks.example.com/kma"
    assert job["progress"] == {
        "total": 5,
        "done": 0,
        "categories": {"HighlyKnown": 0, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 0},
        "flagged": 0,
    }
    assert job["generations"] == {"new": 0, "cached": 0}
    assert job["eta_seconds"] is None
    assert job["links"]["export"] == f"/v1/jobs/{job['id']}/export"
    row = session.get_one(Job, uuid.UUID(job["id"]))
    assert (row.status, row.total, row.config["samples"]) == (JobStatus.QUEUED, 5, 16)
    assert row.student == {**TINY, "api_key_set": False}


def test_a_job_shows_and_stores_no_server_and_no_key(
    client: TestClient, session: Session, dataset_id: str
) -> None:
    job = submit(client, dataset_id, student="fleet")
    assert job["student"] == {
        "name": "fleet",
        "engine": "openai",
        "model": "qwen",
        "revision": "v2",
    }
    row = session.get_one(Job, uuid.UUID(job["id"]))
    assert row.student == {**job["student"], "api_key_set": True}


def test_the_registered_students_are_listed(client: TestClient) -> None:
    response = client.get("/v1/students")
    assert response.status_code == 200
    assert response.json() == {
        "items": [
            {"name": "fleet", "engine": "openai", "model": "qwen", "revision": "v2"},
            TINY,
        ]
    }


@pytest.mark.parametrize("name", ["qwen", "/etc/passwd", "../tiny"])
def test_a_student_that_is_not_registered_is_refused(
    client: TestClient, session: Session, dataset_id: str, events: list[Any], name: str
) -> None:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": name})
    assert response.status_code == 422
    detail = json.dumps(response.json()["detail"])
    assert "student" in detail
    assert "10.0.0.7" not in detail and "FLEET_KEY" not in detail and "/models" not in detail
    assert session.scalars(select(Job)).all() == []
    assert events == []


def test_an_unknown_student_is_refused_before_the_dataset_is_looked_up(
    client: TestClient,
) -> None:
    body = {"dataset_id": str(uuid.uuid4()), "student": "qwen"}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "student"]
    assert error["msg"] == "student 'qwen' is not registered (registered students: fleet, tiny)"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"samples": -1}}, ["body", "config", "samples"]),
        ({"config": {"sample": 4}}, ["body", "config", "sample"]),
        ({"config": {"top_k": 0}}, ["body", "config", "top_k"]),
        ({"config": {"top_k": 1001}}, ["body", "config", "top_k"]),
        ({"config": {"seed": 2**63}}, ["body", "config", "seed"]),
        ({"config": {"idk_text": "x" * 1001}}, ["body", "config", "idk_text"]),
        ({"config": {"flag_categories": []}}, ["body", "config", "flag_categories"]),
        (
            {"config": {"flag_categories": ["Unknown", "Unknown"]}},
            ["body", "config", "flag_categories"],
        ),
        (
            {"config": {"prompt": {"query": "Q: {question:>1000000000}\nA:"}}},
            ["body", "config", "prompt", "query"],
        ),
        (
            {"config": {"prompt": {"exemplar": "Q: {question}\nA: {answer}" + " " * 4000}}},
            ["body", "config", "prompt", "exemplar"],
        ),
        ({"student": {"model": "tiny", "engine": "hf"}}, ["body", "student"]),
        ({"student": "tiny", "base_url": "http://attacker:8000/v1"}, ["body", "base_url"]),
        ({"webhook_url": "ftp://example.com"}, ["body", "webhook_url"]),
    ],
)
def test_submit_refuses_bad_options(
    client: TestClient, dataset_id: str, events: list[Any], body: dict[str, Any], field: list[str]
) -> None:
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": "tiny", **body})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [field]
    assert events == []


def test_submit_refuses_a_job_over_the_generation_limit(
    client: TestClient, api: FastAPI, broker_url: str, dataset_id: str, events: list[Any]
) -> None:
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, students=STUDENTS, max_generations_per_job=5 * 10 * 17
    )
    submit(client, dataset_id)  # 5 examples x 10 exemplar sets x (1 + 16): exactly the limit
    events.clear()
    response = client.post(
        "/v1/jobs",
        json={"dataset_id": dataset_id, "student": "tiny", "config": {"samples": 17}},
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "config"]
    assert "900 generations" in error["msg"]
    assert "limit of 850" in error["msg"]
    assert events == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "resolves to a loopback address"),
        ("http://[::1]/hook", "resolves to a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "resolves to a link-local address"),
        ("http://10.0.0.1/", "resolves to a private address"),
        ("http://localhost/", "resolves to a loopback address"),
        ("http://nowhere.invalid/", "does not resolve"),
        ("http://user:pw@hooks.example.com/", "user info"),
    ],
)
def test_submit_refuses_a_webhook_to_a_non_public_address(
    client: TestClient,
    dataset_id: str,
    events: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    reason: str,
) -> None:
    getaddrinfo = socket.getaddrinfo

    def offline(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".invalid"):  # answered here: no DNS query leaves the machine
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    response = client.post(
        "/v1/jobs",
        json={"dataset_id": dataset_id, "student": "tiny", "webhook_url": url},
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"]
    assert reason in error["msg"]
    assert events == []


def test_an_allowed_network_lets_a_webhook_through(
    client: TestClient, api: FastAPI, broker_url: str, dataset_id: str
) -> None:
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, students=STUDENTS, webhook_allow_networks=["127.0.0.0/8"]
    )
    job = submit(client, dataset_id, webhook_url="http://127.0.0.1:9/hook")
    assert job["webhook_url"] == "http://127.0.0.1:9/hook"


def test_a_refusal_matches_the_documented_422(client: TestClient, dataset_id: str) -> None:
    schema = client.get("/openapi.json").json()
    documented = schema["paths"]["/v1/jobs"]["post"]["responses"]["422"]
    assert documented["content"]["application/json"]["schema"]["$ref"].endswith(
        "/HTTPValidationError"
    )
    item = schema["components"]["schemas"]["ValidationError"]
    response = client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "student": "tiny",
            "webhook_url": "http://[::1]/",
        },
    )
    (error,) = response.json()["detail"]
    assert set(item["required"]) <= set(error) <= set(item["properties"])


def test_the_options_schema_says_what_is_refused(client: TestClient) -> None:
    """Repeated flag categories and top_k 0 are refused (see above); the schema says so."""
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    fields = schemas["AuditConfig"]["properties"]
    assert fields["flag_categories"]["uniqueItems"] is True
    assert fields["top_k"]["not"] == {"const": 0}


def test_a_body_that_is_not_utf8_answers_the_documented_400(
    client: TestClient, api: FastAPI, events: list[Any]
) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"student": "\xff"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
    assert_documented(api, "POST /v1/jobs", response)
    assert events == []


def test_submit_to_an_unknown_dataset(client: TestClient, events: list[Any]) -> None:
    response = client.post("/v1/jobs", json={"dataset_id": str(uuid.uuid4()), "student": "tiny"})
    assert response.status_code == 404
    assert "dataset" in response.json()["detail"]
    assert events == []


# --- poll ---------------------------------------------------------------------------------------


def test_progress_is_counted_from_verdicts(client: TestClient, audited: str) -> None:
    job = client.get(f"/v1/jobs/{audited}").json()
    assert job["status"] == "running"
    assert job["progress"] == {
        "total": 5,
        "done": 4,
        "categories": {"HighlyKnown": 1, "MaybeKnown": 0, "WeaklyKnown": 1, "Unknown": 2},
        "flagged": 2,
    }
    assert job["generations"] == {"new": 61, "cached": 1}
    assert job["eta_seconds"] == pytest.approx(25, abs=2)  # 100 s for 4, so 25 s for the last


def test_get_an_unknown_job(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 422


def test_list_newest_first_filtered_and_paginated(
    client: TestClient, session: Session, dataset_id: str
) -> None:
    ids = [submit(client, dataset_id)["id"] for _ in range(3)]
    set_status(session, ids[1], JobStatus.FAILED, error="boom")

    first = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["items"]] == [ids[2], ids[1]]
    assert first["next_cursor"] == ids[1]
    second = client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["id"] == ids[0]

    failed = client.get("/v1/jobs", params={"status": "failed"}).json()["items"]
    assert failed[0]["id"] == ids[1]
    assert failed[0]["error"] == "boom"
    assert all(j["status"] == "failed" for j in failed)

    for params in ({"limit": 0}, {"limit": 201}, {"status": "done"}, {"cursor": "x"}):
        assert client.get("/v1/jobs", params=params).status_code == 422


def test_a_cursor_that_names_no_job_answers_the_documented_422(
    client: TestClient, api: FastAPI
) -> None:
    cursor = str(uuid.uuid4())
    response = client.get("/v1/jobs", params={"cursor": cursor})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "cursor"]
    assert error["msg"] == f"cursor {cursor} names no job"
    assert_documented(api, "GET /v1/jobs", response)


# --- cancel -------------------------------------------------------------------------------------


def test_cancel_keeps_the_verdicts(client: TestClient, audited: str) -> None:
    response = client.post(f"/v1/jobs/{audited}/cancel")
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "cancelled"
    assert job["finished_at"] is not None
    assert job["eta_seconds"] is None
    assert job["progress"]["done"] == 4
    examples = client.get(f"/v1/jobs/{audited}/examples").json()["items"]
    assert len(examples) == 4

    again = client.post(f"/v1/jobs/{audited}/cancel")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]


def test_cancel_a_queued_job_and_not_a_finished_one(
    client: TestClient, session: Session, dataset_id: str
) -> None:
    queued = submit(client, dataset_id)["id"]
    assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
    succeeded = submit(client, dataset_id)["id"]
    set_status(session, succeeded, JobStatus.SUCCEEDED)
    assert client.post(f"/v1/jobs/{succeeded}/cancel").status_code == 409
    assert client.post(f"/v1/jobs/{uuid.uuid4()}/cancel").status_code == 404


# --- examples -----------------------------------------------------------------------------------


def positions(client: TestClient, job_id: str, **params: Any) -> list[int]:
    response = client.get(f"/v1/jobs/{job_id}/examples", params=params)
    assert response.status_code == 200, response.text
    return [item["position"] for item in response.json()["items"]]


def test_examples_carry_record_and_audit(client: TestClient, audited: str) -> None:
    page = client.get(f"/v1/jobs/{audited}/examples").json()
    assert page["next_cursor"] is None
    second = page["items"][1]
    assert second == {
        "position": 1,
        "id": "b",
        "line": 2,
        "group": None,
        "record": RECORDS[1],
        "audit": AUDITS[1].model_dump(mode="json"),
        "review": None,
    }
    assert page["items"][0]["group"] == "P36"


def test_examples_filters(client: TestClient, audited: str) -> None:
    assert positions(client, audited) == [0, 1, 2, 3]
    assert positions(client, audited, category="Unknown") == [1, 2]
    assert positions(client, audited, category="MaybeKnown") == []
    assert positions(client, audited, flagged="true") == [1, 2]
    assert positions(client, audited, flagged="false") == [0, 3]
    assert positions(client, audited, category="Unknown", flagged="false") == []


def test_examples_pages(client: TestClient, audited: str) -> None:
    first = client.get(f"/v1/jobs/{audited}/examples", params={"limit": 3}).json()
    assert [i["position"] for i in first["items"]] == [0, 1, 2]
    assert first["next_cursor"] == "2"
    second = client.get(
        f"/v1/jobs/{audited}/examples", params={"limit": 3, "cursor": first["next_cursor"]}
    ).json()
    assert [i["position"] for i in second["items"]] == [3]
    assert second["next_cursor"] is None
    assert positions(client, audited, flagged="true", limit=1, cursor="1") == [2]


BAD_CURSORS = [{"cursor": c} for c in ("abc", "-1", "2147483648", "9999999999", "1" * 30)]


@pytest.mark.parametrize("params", [{"category": "Known"}, *BAD_CURSORS, {"limit": 0}])
def test_examples_refuse_bad_parameters(
    client: TestClient, audited: str, params: dict[str, str]
) -> None:
    response = client.get(f"/v1/jobs/{audited}/examples", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", *params]


@pytest.mark.parametrize("path", ["examples", "conflicts"])
def test_the_last_position_is_a_cursor(client: TestClient, audited: str, path: str) -> None:
    response = client.get(f"/v1/jobs/{audited}/{path}", params={"cursor": 2**31 - 1})
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


def test_examples_of_an_unknown_job(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/examples").status_code == 404


# --- export -------------------------------------------------------------------------------------


def export(client: TestClient, job_id: str, policy: str | None = None) -> list[dict[str, Any]]:
    params = {"policy": policy} if policy else {}
    response = client.get(f"/v1/jobs/{job_id}/export", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    assert f"kma-{job_id}-{policy or 'suggested'}.jsonl" in response.headers["content-disposition"]
    records = [json.loads(line) for line in response.text.splitlines()]
    assert response.headers["X-Kma-Record-Count"] == str(len(records))  # announced before
    return records


def answered(record: dict[str, Any], answer: str) -> dict[str, Any]:
    key = "answer" if "answer" in record else "answers"
    return {**record, key: answer if key == "answer" else [answer]}


def test_export_every_policy(client: TestClient, session: Session, audited: str) -> None:
    set_status(session, audited, JobStatus.SUCCEEDED, finished_at=utcnow())
    a, b, c, d, e = RECORDS  # b and c are flagged; e has no verdict and passes unchanged
    assert export(client, audited) == [a, answered(b, "Bo Ek"), answered(c, IDK), d, e]
    assert export(client, audited, "suggested") == export(client, audited)
    assert export(client, audited, "drop") == [a, d, e]
    assert export(client, audited, "idk") == [a, answered(b, IDK), answered(c, IDK), d, e]
    assert export(client, audited, "student") == [
        a,
        answered(b, "Bo Ek"),
        answered(c, "Vark"),
        d,
        e,
    ]
    annotated = export(client, audited, "annotate")
    assert annotated[:4] == [
        {**record, "audit": a.model_dump(mode="json")}
        for record, a in zip(RECORDS, AUDITS, strict=False)
    ]
    assert annotated[4] == e


@pytest.mark.parametrize(
    ("policy", "count"),
    [("suggested", 5), ("drop", 3), ("idk", 5), ("student", 5), ("annotate", 5)],
)
def test_export_announces_its_record_count(
    client: TestClient, session: Session, audited: str, policy: str, count: int
) -> None:
    set_status(session, audited, JobStatus.SUCCEEDED, finished_at=utcnow())
    with client.stream("GET", f"/v1/jobs/{audited}/export", params={"policy": policy}) as r:
        assert r.headers["X-Kma-Record-Count"] == str(count)
        assert r.read().count(b"\n") == count


def test_export_failing_part_way_aborts_the_connection(
    api: FastAPI,
    api_key: str,
    session: Session,
    audited: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Through a real uvicorn and the app's middleware: the body never ends cleanly short."""
    set_status(session, audited, JobStatus.SUCCEEDED, finished_at=utcnow())
    many = [({"question": f"Q{i}?", "answer": "A" * 200}, None) for i in range(1000)]

    def records_then_a_fault(*args: Any) -> Iterator[tuple[dict[str, Any], None]]:
        yield from many  # more than one chunk, so the response has started
        raise OSError("the database went away")

    monkeypatch.setattr(jobs_repository, "iter_records", records_then_a_fault)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with (
            pytest.raises(httpx.RemoteProtocolError),  # not a clean, short 200
            httpx.stream(
                "GET", f"{url}/v1/jobs/{audited}/export", headers=bearer(api_key)
            ) as response,
        ):
            assert response.headers["X-Kma-Record-Count"] == "5"
            for _ in response.iter_bytes():
                pass
        dest = tmp_path / "out.jsonl"
        with pytest.raises(IncompleteExport) as raised:
            Client(url, api_key=api_key).download(audited, dest)
        assert raised.value.expected == 5
        assert list(tmp_path.iterdir()) == []
    finally:
        server.should_exit = True
        thread.join(10)
    failures = [r for r in caplog.records if "the export failed" in r.getMessage()]
    assert failures and audited in failures[0].getMessage()


def test_export_of_a_cancelled_job(client: TestClient, audited: str) -> None:
    client.post(f"/v1/jobs/{audited}/cancel")
    assert len(export(client, audited, "drop")) == 3


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
def test_export_needs_a_finished_job(
    client: TestClient, session: Session, audited: str, status: JobStatus
) -> None:
    set_status(session, audited, status)
    response = client.get(f"/v1/jobs/{audited}/export")
    assert response.status_code == 409
    assert status.value in response.json()["detail"]


def test_export_errors(client: TestClient, audited: str) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/export").status_code == 404
    assert client.get(f"/v1/jobs/{audited}/export", params={"policy": "x"}).status_code == 422


# --- report -------------------------------------------------------------------------------------


def test_report_of_a_succeeded_job_is_the_stored_one(
    client: TestClient, session: Session, audited: str
) -> None:
    response = client.get(f"/v1/jobs/{audited}/report")
    assert response.status_code == 409
    assert "running" in response.json()["detail"]
    job = set_status(session, audited, JobStatus.SUCCEEDED, finished_at=utcnow())
    stored = build_report(session, job).model_copy(update={"seconds": 12.5})
    set_status(session, audited, JobStatus.SUCCEEDED, report=stored.model_dump(mode="json"))
    no_reviews = ReviewCounts.of(stored.flagged, {})
    assert client.get(f"/v1/jobs/{audited}/report").json() == stored.model_copy(
        update={"reviews": no_reviews}
    ).model_dump(mode="json")
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/report").status_code == 404


def test_report_of_a_cancelled_job_is_partial(client: TestClient, audited: str) -> None:
    assert client.post(f"/v1/jobs/{audited}/cancel").status_code == 200
    response = client.get(f"/v1/jobs/{audited}/report")
    assert response.status_code == 200
    report = response.json()
    assert report.pop("seconds") == pytest.approx(100, abs=5)
    assert report.pop("config")["idk_text"] == IDK
    assert report == {
        "partial": True,
        "num_examples": 4,
        "total": 5,
        "categories": {"HighlyKnown": 1, "MaybeKnown": 0, "WeaklyKnown": 1, "Unknown": 2},
        "groups": {
            "": {
                "categories": {"HighlyKnown": 0, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 1},
                "flagged": 1,
                "examples": 1,
            },
            "P112": {
                "categories": {"HighlyKnown": 0, "MaybeKnown": 0, "WeaklyKnown": 1, "Unknown": 0},
                "flagged": 0,
                "examples": 1,
            },
            "P131": {
                "categories": {"HighlyKnown": 0, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 1},
                "flagged": 1,
                "examples": 1,
            },
            "P36": {
                "categories": {"HighlyKnown": 1, "MaybeKnown": 0, "WeaklyKnown": 0, "Unknown": 0},
                "flagged": 0,
                "examples": 1,
            },
        },
        "flagged": 2,
        "suggested_actions": {"keep": 2, "relabel_student": 1, "relabel_idk": 1},
        "conflicts": 0,
        "generations": 61,
        "generations_cached": 1,
        "generations_used": 40,
        "mode": "adaptive",
        "student": TINY,
        "reviews": {
            "reviewed": 0,
            "unreviewed": 2,
            "decisions": {"accept": 0, "reject": 0, "override": 0},
        },
    }
    page = client.get(f"/v1/jobs/{audited}/report.html")
    assert page.status_code == 200
    assert "Partial report" in page.text


def test_report_of_a_failed_job_is_partial(
    client: TestClient, session: Session, audited: str
) -> None:
    set_status(session, audited, JobStatus.FAILED, error="boom", finished_at=utcnow())
    report = client.get(f"/v1/jobs/{audited}/report").json()
    assert (report["partial"], report["num_examples"], report["total"]) == (True, 4, 5)


def test_report_of_a_queued_job_is_not_ready(client: TestClient, dataset_id: str) -> None:
    job_id = submit(client, dataset_id)["id"]
    for path in ("report", "report.html"):
        response = client.get(f"/v1/jobs/{job_id}/{path}")
        assert response.status_code == 409
        assert "queued" in response.json()["detail"]


def test_the_report_schema_is_named(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    report = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]
    assert report["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Report"
    }
    conflicts = spec["paths"]["/v1/jobs/{job_id}/conflicts"]["get"]["responses"]["200"]
    assert conflicts["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ConflictPage"
    }
    schemas = spec["components"]["schemas"]
    fields = schemas["Report"]["properties"]
    assert {"partial", "groups", "conflicts", "generations_used", "student", "config"} <= set(
        fields
    )
    assert fields["groups"]["additionalProperties"] == {"$ref": "#/components/schemas/GroupCounts"}
    assert all("description" in field for field in fields.values()), [
        name for name, field in fields.items() if "description" not in field
    ]


# --- conflicts ----------------------------------------------------------------------------------


def mark_conflicts(session: Session, job_id: str, positions: list[int]) -> None:
    session.execute(
        update(Verdict)
        .where(Verdict.job_id == uuid.UUID(job_id), Verdict.position.in_(positions))
        .values(conflict=True)
    )
    session.commit()


def test_conflicts_pages(client: TestClient, session: Session, audited: str) -> None:
    assert client.get(f"/v1/jobs/{audited}/conflicts").json() == {"items": [], "next_cursor": None}
    mark_conflicts(session, audited, [1, 2, 3])
    first = client.get(f"/v1/jobs/{audited}/conflicts", params={"limit": 2}).json()
    assert first["items"][0] == {
        "position": 1,
        "id": "b",
        "question": "Who wrote Ombra?",
        "teacher_answer": "Ann Vey",
        "student_answer": "Bo Ek",
        "agreement": 0.95,
        "category": "Unknown",
    }
    assert [i["position"] for i in first["items"]] == [1, 2]
    assert first["next_cursor"] == "2"
    second = client.get(
        f"/v1/jobs/{audited}/conflicts", params={"limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert [i["id"] for i in second["items"]] == ["d"]
    assert second["next_cursor"] is None
    job = client.get(f"/v1/jobs/{audited}").json()
    assert job["links"]["conflicts"] == f"/v1/jobs/{audited}/conflicts"


@pytest.mark.parametrize("params", [*BAD_CURSORS, {"limit": 0}])
def test_conflicts_refuse_bad_parameters(
    client: TestClient, audited: str, params: dict[str, str]
) -> None:
    response = client.get(f"/v1/jobs/{audited}/conflicts", params=params)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", *params]


def test_conflicts_of_an_unknown_job(client: TestClient) -> None:
    assert client.get(f"/v1/jobs/{uuid.uuid4()}/conflicts").status_code == 404


# --- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/jobs", {"GET", "POST"}),
        (f"/v1/jobs/{uuid.uuid4()}", {"GET", "DELETE"}),
        (f"/v1/jobs/{uuid.uuid4()}/cancel", {"POST"}),
    ],
)
def test_a_method_a_path_does_not_take_answers_405_naming_those_it_does(
    client: TestClient, path: str, allowed: set[str]
) -> None:
    for method in ("PUT", "PATCH", "OPTIONS", "TRACE"):
        response = client.request(method, path)
        assert response.status_code == 405
        assert set(response.headers["Allow"].split(", ")) == allowed
        assert response.json() == {"detail": "Method Not Allowed"}


# --- health -------------------------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_without_the_broker(client: TestClient) -> None:
    app: Any = client.app
    app.dependency_overrides[get_settings] = lambda: Settings(broker_url="redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["broker"] == "unavailable"  # nothing about where it is


def test_readyz_without_the_database(client: TestClient) -> None:
    engine = make_engine("postgresql://kma@127.0.0.1:1/nowhere")

    def unreachable() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    app: Any = client.app
    app.dependency_overrides[session_scope] = unreachable
    response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "unavailable"
    assert checks["broker"] == "ok"
    engine.dispose()


def test_a_job_submitted_while_the_broker_is_down_is_accepted(
    client: TestClient, session: Session, dataset_id: str
) -> None:
    class Down:
        def send(self, task: str, *args: Any) -> None:
            raise QueueUnavailable("connection refused")

    client.app.dependency_overrides[get_queue] = lambda: Down()  # type: ignore[attr-defined]
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": "tiny"})
    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    stored = session.scalars(select(Job).where(Job.dataset_id == uuid.UUID(dataset_id))).all()
    assert [job.status for job in stored] == [JobStatus.QUEUED]


def test_a_retried_submission_with_an_idempotency_key_gives_the_same_job(
    client: TestClient, session: Session, dataset_id: str, events: list[Any]
) -> None:
    body = {"dataset_id": dataset_id, "student": "tiny", "config": {"samples": 4}}
    headers = {"Idempotency-Key": "pipeline-run-42"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"]
    assert events == [(WORK,)]  # the workers are woken once
    stored = session.scalars(select(Job).where(Job.dataset_id == uuid.UUID(dataset_id))).all()
    assert len(stored) == 1

    other = client.post("/v1/jobs", json={**body, "config": {"samples": 8}}, headers=headers)
    assert other.status_code == 409
    assert (
        "Idempotency-Key 'pipeline-run-42' was used for another submission"
        in (other.json()["detail"])
    )
    without_key = client.post("/v1/jobs", json=body)
    assert without_key.json()["id"] != first.json()["id"]
