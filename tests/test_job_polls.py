"""A job's poll on the event loop (`AsyncConnections`, an asyncio Redis client): the same answer
as through a session, the same key checks, rate limit and 503s.

Here the app's sessions are not overridden, so polls take that path, on committed rows of
workspaces of their own, deleted after each test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, delete, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import AsyncConnections, DatabaseBusy, plain_url
from app.jobs import lifecycle, service
from app.main import create_app
from app.models import Dataset, Job, Workspace
from app.settings import Settings, get_settings
from app.workspaces.service import create_key, ensure_workspace
from tests.conftest import bearer

UNREACHABLE = "postgresql://kma@127.0.0.1:1/nowhere"


@pytest.fixture
def committed(db_engine: Engine) -> Iterator[dict[str, Any]]:
    """Two workspaces, each with a key; the first with a running job. Committed, then deleted."""
    sessions = sessionmaker(db_engine, expire_on_commit=False)
    names = [f"polls-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with sessions.begin() as session:
        keys = [create_key(session, "poller", name)[1] for name in names]
        workspace = ensure_workspace(session, names[0])
        dataset = Dataset(workspace_id=workspace.id, name="d", format="qa", num_examples=10)
        session.add(dataset)
        session.flush()
        job = Job(
            workspace_id=workspace.id,
            dataset_id=dataset.id,
            student={"name": "m", "engine": "hf", "model": "m"},
            config={},
            total=10,
            done=4,
            unknown=1,
            highly_known=3,
            flagged=1,
        )
        session.add(job)
        session.flush()
        lifecycle.start(job)
    yield {"keys": keys, "job_id": job.id, "workspace": names[0], "sessions": sessions}
    with sessions.begin() as session:
        session.execute(delete(Workspace).where(Workspace.name.in_(names)))


def client_for(database_url: str, broker_url: str, **settings: Any) -> TestClient:
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: Settings(
        database_url=database_url, broker_url=broker_url, **settings
    )
    return TestClient(app)


def test_a_poll_answers_as_a_read_through_a_session(
    committed: dict[str, Any], database_url: str, broker_url: str
) -> None:
    with client_for(database_url, broker_url) as client:
        response = client.get(
            f"/v1/jobs/{committed['job_id']}", headers=bearer(committed["keys"][0])
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    with committed["sessions"]() as session:
        workspace = ensure_workspace(session, committed["workspace"])
        expected = service.get_job(session, workspace, committed["job_id"])
    polled = response.json()
    assert polled.pop("eta_seconds") == pytest.approx(expected.eta_seconds, abs=1)
    assert polled == expected.model_dump(mode="json", by_alias=True, exclude={"eta_seconds"})
    assert polled["links"]["self"] == f"/v1/jobs/{committed['job_id']}"
    assert polled["progress"]["done"] == 4 and polled["status"] == "running"


def test_a_poll_needs_a_key_of_the_job_s_workspace(
    committed: dict[str, Any], database_url: str, broker_url: str
) -> None:
    path = f"/v1/jobs/{committed['job_id']}"
    with client_for(database_url, broker_url) as client:
        for headers in ({}, bearer("kma_not-a-key"), bearer(committed["keys"][0] + "x")):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
        other = client.get(path, headers=bearer(committed["keys"][1]))
        assert other.status_code == 404  # another workspace's job does not exist for it
        assert (
            client.get(f"/v1/jobs/{uuid.uuid4()}", headers=bearer(committed["keys"][0]))
            .json()["detail"]
            .endswith("not found")
        )


def test_polls_past_the_rate_limit_answer_429_with_retry_after(
    committed: dict[str, Any],
    database_url: str,
    broker_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("app.ratelimit.time.time", lambda: 1_800_000_030.0)  # one window
    key = committed["keys"][0]
    with client_for(database_url, broker_url, rate_limit_per_minute=3) as client:
        answers = [
            client.get(f"/v1/jobs/{committed['job_id']}", headers=bearer(key)) for _ in range(5)
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    assert answers[-1].headers["Retry-After"] == "30"


def test_a_poll_on_an_unreachable_database_answers_503_quickly(broker_url: str) -> None:
    with client_for(UNREACHABLE, broker_url) as client:
        started = time.monotonic()
        response = client.get(f"/v1/jobs/{uuid.uuid4()}", headers=bearer("kma_some-key"))
        seconds = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    assert "retry later" in response.json()["detail"]
    assert "127.0.0.1" not in response.json()["detail"]
    assert seconds < 2


def test_a_busy_pool_raises_database_busy_after_its_wait(database_url: str) -> None:
    async def scenario() -> float:
        pool = AsyncConnections(plain_url(database_url), 1, 0.3, 0)
        try:
            slow = asyncio.create_task(pool.fetch("SELECT pg_sleep(1)", {}))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            with pytest.raises(DatabaseBusy):
                await pool.fetch("SELECT 1", {})
            waited = time.monotonic() - started
            await slow
            assert await pool.fetch("SELECT 1", {}) == [(1,)]  # free again
            return waited
        finally:
            await pool.close()

    assert 0.25 < asyncio.run(scenario()) < 1


def test_a_connection_the_server_closed_while_idle_is_replaced_unseen(
    database_url: str, db_engine: Engine
) -> None:
    async def scenario() -> None:
        pool = AsyncConnections(plain_url(database_url), 2, 1, 0)
        try:
            [(pid,)] = await pool.fetch("SELECT pg_backend_pid()", {})
            with Session(db_engine) as session:  # as a restart of PostgreSQL would
                session.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                session.commit()
            await asyncio.sleep(0.1)
            [(other,)] = await pool.fetch("SELECT pg_backend_pid()", {})
            assert other != pid
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_statement_past_the_timeout_is_cancelled(database_url: str) -> None:
    async def scenario() -> None:
        pool = AsyncConnections(plain_url(database_url), 1, 1, 0.2)
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                await pool.fetch("SELECT pg_sleep(2)", {})
            assert await pool.fetch("SELECT 1", {}) == [(1,)]
        finally:
            await pool.close()

    asyncio.run(scenario())
