"""API keys and workspaces: every `/v1` call needs a key, and a workspace sees only its own."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import ApiKey, Dataset, Job, JobStatus, Review, Verdict
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.workspaces import service as workspaces
from app.workspaces.domain import KEY_FILE, hash_key
from kma.cli.server import save_first_key
from tests.conftest import bearer, fresh_database
from tests.test_api_jobs import AUDITS, RECORDS, STUDENTS, Recorder, add_verdicts, set_status

JSONL = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)


def make_client(api: FastAPI, key: str | None) -> TestClient:
    return TestClient(api, headers=bearer(key) if key else None)


@pytest.fixture
def keys(session: Session) -> tuple[str, str]:
    """Keys of two workspaces, "red" and "blue"."""
    red = workspaces.create_key(session, "ci", "red")[1]
    blue = workspaces.create_key(session, "ci", "blue")[1]
    session.commit()
    return red, blue


@pytest.fixture
def app_(api: FastAPI, broker_url: str) -> FastAPI:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, students=STUDENTS
    )
    return api


@pytest.fixture
def red_job(app_: FastAPI, session: Session, keys: tuple[str, str]) -> Iterator[dict[str, Any]]:
    """A dataset and a job of the red workspace, the job finished with verdicts."""
    with make_client(app_, keys[0]) as red:
        dataset = red.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)}).json()
        body = {"dataset_id": dataset["id"], "student": "tiny"}
        job = red.post("/v1/jobs", json=body).json()
        add_verdicts(session, job["id"], AUDITS)
        set_status(session, job["id"], JobStatus.CANCELLED)
        yield {"dataset": dataset["id"], "job": job["id"]}


@pytest.fixture
def red_jobs(app_: FastAPI, keys: tuple[str, str], red_job: dict[str, Any]) -> dict[str, Any]:
    """The red job and a second one on its dataset, as a comparison names them."""
    with make_client(app_, keys[0]) as red:
        body = {"dataset_id": red_job["dataset"], "student": "tiny"}
        return {**red_job, "second_job": red.post("/v1/jobs", json=body).json()["id"]}


def every_call(
    dataset_id: str, job_id: str, second_job_id: str
) -> list[tuple[str, str, dict[str, Any]]]:
    """Each `/v1` operation that names an id, as (method, path, request options)."""
    job = f"/v1/jobs/{job_id}"
    compared = f"jobs={job_id},{second_job_id}"
    return [
        ("GET", f"/v1/datasets/{dataset_id}", {}),
        ("DELETE", f"/v1/datasets/{dataset_id}", {}),
        ("POST", "/v1/jobs", {"json": {"dataset_id": dataset_id, "student": "tiny"}}),
        ("POST", "/v1/estimates", {"json": {"dataset_id": dataset_id, "student": "tiny"}}),
        ("GET", f"/v1/comparisons?{compared}", {}),
        ("GET", f"/v1/comparisons/examples?{compared}", {}),
        ("GET", f"/v1/comparisons/export?{compared}", {}),
        ("GET", f"/v1/comparisons/report.html?{compared}", {}),
        ("GET", job, {}),
        ("POST", f"{job}/cancel", {}),
        ("DELETE", job, {}),
        ("GET", f"{job}/examples", {}),
        ("GET", f"{job}/examples/1", {}),
        ("PATCH", f"{job}/examples/1", {"json": {"decision": "accept"}}),
        ("PATCH", f"{job}/examples", {"json": {"items": [{"position": 1, "decision": "reject"}]}}),
        ("GET", f"{job}/conflicts", {}),
        ("GET", f"{job}/export", {}),
        ("GET", f"{job}/export", {"params": {"policy": "reviewed", "format": "parquet"}}),
        ("GET", f"{job}/export", {"params": {"format": "hf"}}),
        ("GET", f"{job}/report", {}),
        ("GET", f"{job}/report.html", {}),
    ]


def _ids_in(path: str, options: dict[str, Any]) -> tuple[str, ...]:
    found = re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", path)
    body = options.get("json") or {}
    return tuple(found + ([body["dataset_id"]] if "dataset_id" in body else []))


def _without(detail: str, ids: tuple[str, ...]) -> str:
    for value in ids:
        detail = detail.replace(value, "ID")
    return detail


def counts(session: Session) -> tuple[int, int, int, int]:
    return tuple(  # type: ignore[return-value]
        session.scalar(select(func.count()).select_from(model)) or 0
        for model in (Dataset, Job, Verdict, Review)
    )


def test_another_workspace_sees_nothing_and_changes_nothing(
    app_: FastAPI, session: Session, keys: tuple[str, str], red_jobs: dict[str, Any]
) -> None:
    before = counts(session)
    nobody = every_call(str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4()))
    with make_client(app_, keys[1]) as blue:
        for (method, path, options), (_, path_of_nothing, nothing_options) in zip(
            every_call(red_jobs["dataset"], red_jobs["job"], red_jobs["second_job"]),
            nobody,
            strict=True,
        ):
            response = blue.request(method, path, **options)
            assert response.status_code == 404, (method, path, response.text)
            # Word for word what an id that exists nowhere gets: nothing tells them apart.
            missing = blue.request(method, path_of_nothing, **nothing_options)
            ids = (red_jobs["dataset"], red_jobs["job"], red_jobs["second_job"])
            assert _without(response.json()["detail"], ids) == _without(
                missing.json()["detail"], _ids_in(path_of_nothing, nothing_options)
            )
        assert blue.get("/v1/jobs").json()["items"] == []
        assert blue.get("/v1/datasets").json()["items"] == []
    assert counts(session) == before
    with make_client(app_, keys[0]) as red:  # red still has it all
        assert red.get(f"/v1/jobs/{red_jobs['job']}").json()["status"] == "cancelled"
        assert [d["id"] for d in red.get("/v1/datasets").json()["items"]] == [red_jobs["dataset"]]
        assert len(red.get(f"/v1/jobs/{red_jobs['job']}/examples").json()["items"]) == 4


def test_every_call_needs_a_valid_key(
    app_: FastAPI, session: Session, keys: tuple[str, str], red_jobs: dict[str, Any]
) -> None:
    calls = every_call(red_jobs["dataset"], red_jobs["job"], red_jobs["second_job"])
    calls += [("GET", "/v1/jobs", {}), ("GET", "/v1/datasets", {}), ("GET", "/v1/workspace", {})]
    calls += [("GET", "/v1/students", {})]
    calls += [("POST", "/v1/datasets", {"files": {"file": ("t.jsonl", JSONL)}})]
    before = counts(session)
    for key in (None, "kma_not-a-key", keys[0] + "x"):
        with make_client(app_, key) as anyone:
            for method, path, options in calls:
                response = anyone.request(method, path, **options)
                assert response.status_code == 401, (key, method, path)
                assert response.headers["WWW-Authenticate"] == "Bearer"
    assert counts(session) == before
    with make_client(app_, None) as anyone:  # the probes stay open
        assert anyone.get("/healthz").status_code == 200
        assert anyone.get("/metrics").status_code == 200
        assert anyone.get("/readyz").status_code == 200


def test_a_revoked_key_is_refused_at_once(
    app_: FastAPI, session: Session, keys: tuple[str, str]
) -> None:
    red_key = keys[0]
    with make_client(app_, red_key) as red:
        assert red.get("/v1/jobs").status_code == 200
        key_id = session.scalars(select(ApiKey.id).where(ApiKey.key_hash == hash_key(red_key)))
        workspaces.revoke_key(session, str(key_id.one()))
        session.commit()
        assert red.get("/v1/jobs").status_code == 401
    listed = {k.prefix: k for k in workspaces.list_keys(session)}
    assert listed[red_key[:10]].revoked_at is not None
    assert listed[keys[1][:10]].revoked_at is None


def test_a_key_revoked_by_another_process_is_refused_within_seconds(
    app_: FastAPI, session: Session, keys: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workspaces.active_keys, "seconds", 2.0)
    red_key = keys[0]
    with make_client(app_, red_key) as red:
        assert red.get("/v1/workspace").json()["name"] == "red"  # looked up, and remembered
        session.execute(  # as `kma keys revoke` does in its own process
            update(ApiKey).where(ApiKey.key_hash == hash_key(red_key)).values(revoked_at=func.now())
        )
        session.commit()
        assert red.get("/v1/workspace").json()["name"] == "red"  # no lookup yet
        time.sleep(2.1)
        assert red.get("/v1/workspace").status_code == 401


def test_keys_are_stored_hashed(session: Session, keys: tuple[str, str]) -> None:
    stored = session.scalars(select(ApiKey)).all()
    for key in keys:
        assert all(key.encode() not in row.key_hash for row in stored)
        assert any(row.key_hash == hash_key(key) for row in stored)


def test_deleting_a_dataset_removes_what_came_of_it(
    app_: FastAPI, session: Session, keys: tuple[str, str], red_job: dict[str, Any]
) -> None:
    with make_client(app_, keys[0]) as red:
        body = {"dataset_id": red_job["dataset"], "student": "tiny"}
        running = red.post("/v1/jobs", json=body).json()["id"]
        set_status(session, running, JobStatus.RUNNING)
        assert red.delete(f"/v1/datasets/{red_job['dataset']}").status_code == 204
        assert red.get(f"/v1/datasets/{red_job['dataset']}").status_code == 404
        assert red.get(f"/v1/jobs/{running}").status_code == 404
    assert counts(session) == (0, 0, 0, 0)


def test_deleting_a_job_keeps_its_dataset(
    app_: FastAPI, session: Session, keys: tuple[str, str], red_job: dict[str, Any]
) -> None:
    with make_client(app_, keys[0]) as red:
        assert red.delete(f"/v1/jobs/{red_job['job']}").status_code == 204
        assert red.get(f"/v1/jobs/{red_job['job']}").status_code == 404
        assert red.get(f"/v1/datasets/{red_job['dataset']}").status_code == 200
    assert counts(session) == (1, 0, 0, 0)


def test_idempotency_keys_belong_to_their_workspace(
    app_: FastAPI, keys: tuple[str, str], red_job: dict[str, Any]
) -> None:
    headers = {"Idempotency-Key": "nightly"}
    with make_client(app_, keys[1]) as blue:
        dataset = blue.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)}).json()["id"]
        body = {"dataset_id": dataset, "student": "tiny"}
        blue_job = blue.post("/v1/jobs", json=body, headers=headers)
    with make_client(app_, keys[0]) as red:
        body = {"dataset_id": red_job["dataset"], "student": "tiny"}
        red_job_again = red.post("/v1/jobs", json=body, headers=headers)
    assert blue_job.status_code == red_job_again.status_code == 202
    assert blue_job.json()["id"] != red_job_again.json()["id"]


def test_too_many_requests_answer_429_with_retry_after(
    api: FastAPI, keys: tuple[str, str], broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, rate_limit_per_minute=5
    )
    monkeypatch.setattr("app.ratelimit.time.time", lambda: 1_800_000_030.0)  # one window
    with make_client(api, keys[1]) as blue:
        answers = [blue.get("/v1/jobs").status_code for _ in range(8)]
        over = blue.get("/v1/jobs")
    assert answers[:5] == [200] * 5
    assert set(answers[5:]) == {429}
    assert over.headers["Retry-After"] == "30"
    assert "5 requests a minute" in over.json()["detail"]


def test_anonymous_access_only_when_turned_on(api: FastAPI, broker_url: str) -> None:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, allow_anonymous=True
    )
    with make_client(api, None) as anyone:
        response = anyone.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)})
        assert response.status_code == 201
        assert anyone.get("/v1/workspace").json()["name"] == "default"


def test_the_workspace_shows_its_webhook_secret(app_: FastAPI, keys: tuple[str, str]) -> None:
    with make_client(app_, keys[0]) as red, make_client(app_, keys[1]) as blue:
        red_ws, blue_ws = red.get("/v1/workspace").json(), blue.get("/v1/workspace").json()
    assert (red_ws["name"], blue_ws["name"]) == ("red", "blue")
    assert len(red_ws["webhook_secret"]) >= 32
    assert red_ws["webhook_secret"] != blue_ws["webhook_secret"]


def test_the_first_start_saves_a_key_once(postgres_admin_url: str, tmp_path: Path) -> None:
    """`kma serve` keeps its first key in the data folder; later starts make none."""
    path = tmp_path / KEY_FILE
    with fresh_database(postgres_admin_url) as url:
        save_first_key(url, path)
        key = path.read_text().strip()
        assert key.startswith("kma_")
        assert path.stat().st_mode & 0o777 == 0o600
        path.unlink()
        save_first_key(url, path)  # a database with a key: no second one
        assert not path.exists()
        engine = make_engine(url)
        with Session(engine) as session:
            found = workspaces.authenticate(session, key)
            assert found is not None and found.workspace.name == "default"
            assert session.scalar(select(func.count()).select_from(ApiKey)) == 1
        engine.dispose()


def test_kma_keys_create_list_revoke(database_url: str, tmp_path: Path) -> None:
    env = {"KMA_DATABASE_URL": database_url, "KMA_BROKER_URL": "redis://127.0.0.1:1/0"}

    def kma(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kma.cli", "keys", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env, "KMA_DATA_DIR": str(tmp_path)},
        )

    created = kma("create", "--name", "ci-pipeline", "--workspace", f"w-{uuid.uuid4().hex[:6]}")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("kma_") and "\n" not in key  # the key alone on stdout
    listed = kma("list")
    assert listed.returncode == 0
    line = next(line for line in listed.stdout.splitlines() if key[:10] in line)
    assert "ci-pipeline" in line and "active" in line and key not in listed.stdout
    revoked = kma("revoke", key[:10])
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in next(ln for ln in kma("list").stdout.splitlines() if key[:10] in ln)
    assert kma("revoke", "kma_nothing").returncode == 2


async def post_upload(
    app: FastAPI, key: str | None, body: bytes | None = None, declared: int | None = None
) -> tuple[int, int]:
    """POST /v1/datasets straight to the app: `body`, or an endless stream of bytes when None,
    with `declared` as its Content-Length if given. The status answered and the bytes read."""
    read = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = (body if body is not None else b"x" * 65536)[read:][:65536]
        read += len(chunk)
        more = body is None or read < len(body)
        return {"type": "http.request", "body": chunk, "more_body": more}

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    headers = [(b"content-type", b"multipart/form-data; boundary=kma")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    if key is not None:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/datasets",
        "raw_path": b"/v1/datasets",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return statuses[0], read


def test_an_upload_is_refused_before_its_body_is_read(
    api: FastAPI,
    session: Session,
    keys: tuple[str, str],
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, rate_limit_per_minute=2, max_upload_bytes=1 << 20
    )
    monkeypatch.setattr("app.ratelimit.time.time", lambda: 1_800_000_030.0)  # one window
    red, blue = keys
    workspaces.revoke_key(session, red[:10])
    session.commit()
    before = counts(session)
    for key in (None, "kma_not-a-key", red):
        assert anyio.run(post_upload, api, key) == (401, 0)
        assert anyio.run(post_upload, api, key, None, 1 << 40) == (401, 0)
    with make_client(api, blue) as client:
        assert client.get("/v1/jobs").status_code == 200
    assert anyio.run(post_upload, api, blue, None, 1 << 40) == (413, 0)  # the second request
    assert anyio.run(post_upload, api, blue) == (429, 0)
    assert counts(session) == before


def test_an_upload_with_a_good_key_is_read_whole(
    api: FastAPI, session: Session, keys: tuple[str, str]
) -> None:
    part = b'--kma\r\nContent-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n'
    body = part + JSONL + b"\r\n--kma--\r\n"
    before = counts(session)
    assert anyio.run(post_upload, api, keys[0], body) == (201, len(body))
    assert counts(session)[0] == before[0] + 1
