"""A busy or unreachable database answers 503 with Retry-After, quickly, never 500 or a hang."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.db import make_engine, session_scope
from app.errors import ErrorRead
from app.main import create_app
from app.settings import Settings, get_settings

UNREACHABLE = "postgresql://kma@127.0.0.1:1/nowhere"


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A pool of one connection that a request waits half a second for."""
    monkeypatch.setenv("KMA_DB_POOL_SIZE", "1")
    monkeypatch.setenv("KMA_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("KMA_DB_POOL_TIMEOUT_SECONDS", "0.5")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def app_on(engine: Engine, broker_url: str) -> FastAPI:
    def request_session() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    app = create_app()
    app.dependency_overrides[session_scope] = request_session
    # Without a key a request would be refused before it needs the database; as anyone (the
    # default workspace) it reads the database first thing, as a keyed request does.
    app.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, allow_anonymous=True
    )
    return app


def assert_unavailable(response: Any, seconds: float) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    detail = ErrorRead.model_validate(response.json()).detail
    assert "retry later" in detail
    assert "SELECT" not in detail and "127.0.0.1" not in detail
    assert seconds < 2


def get(client: TestClient, path: str) -> tuple[Any, float]:
    started = time.monotonic()
    response = client.get(path)
    return response, time.monotonic() - started


@pytest.mark.usefixtures("settings")
def test_an_exhausted_pool_answers_503_with_retry_after(database_url: str, broker_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as held, TestClient(app_on(engine, broker_url)) as client:
            held.execute(text("SELECT 1"))
            response, seconds = get(client, f"/v1/jobs/{uuid.uuid4()}")
            assert_unavailable(response, seconds)
            assert "busy" in response.json()["detail"]
            assert seconds >= 0.5  # it waited for the pool, then gave up
        response, _ = get(client, f"/v1/jobs/{uuid.uuid4()}")
        assert response.status_code == 404  # the connection is back: the API answers again
    finally:
        engine.dispose()


@pytest.mark.usefixtures("settings")
def test_an_unreachable_database_answers_503_with_retry_after(broker_url: str) -> None:
    engine = make_engine(UNREACHABLE)
    try:
        with TestClient(app_on(engine, broker_url)) as client:
            for path in (f"/v1/jobs/{uuid.uuid4()}", "/v1/jobs", f"/v1/datasets/{uuid.uuid4()}"):
                response, seconds = get(client, path)
                assert_unavailable(response, seconds)
                assert "unavailable" in response.json()["detail"]
            response, seconds = get(client, "/readyz")
            assert response.status_code == 503
            assert response.json()["checks"]["database"] == "unavailable"
            assert seconds < 2
    finally:
        engine.dispose()


def test_a_statement_past_the_timeout_answers_503(database_url: str, broker_url: str) -> None:
    """A request blocked on a lock gives its connection back at the statement timeout."""
    engine = make_engine(database_url, statement_timeout_seconds=0.3)
    try:
        with (
            psycopg.connect(database_url) as locker,
            TestClient(app_on(engine, broker_url)) as client,
        ):
            locker.execute("LOCK TABLE job IN ACCESS EXCLUSIVE MODE")
            response, seconds = get(client, f"/v1/jobs/{uuid.uuid4()}")
            assert_unavailable(response, seconds)
            locker.rollback()
            response, _ = get(client, f"/v1/jobs/{uuid.uuid4()}")
            assert response.status_code == 404
    finally:
        engine.dispose()


@pytest.mark.usefixtures("settings")
def test_requests_past_the_pool_size_wait_their_turn_then_answer_503(
    database_url: str, broker_url: str
) -> None:
    """With one connection, one request at a time: another waits half a second for its turn,
    then answers 503; `/healthz` never waits."""
    engine = make_engine(database_url)
    try:
        with (
            psycopg.connect(database_url) as locker,
            TestClient(app_on(engine, broker_url)) as client,
        ):
            locker.execute("LOCK TABLE job IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(1) as pool:
                blocked = pool.submit(client.get, f"/v1/jobs/{uuid.uuid4()}")
                time.sleep(0.3)
                response, seconds = get(client, f"/v1/jobs/{uuid.uuid4()}")
                assert_unavailable(response, seconds)
                assert response.json()["detail"] == "the API is busy; retry later"
                assert get(client, "/healthz")[0].status_code == 200
                locker.rollback()
                assert blocked.result(timeout=10).status_code == 404
            assert get(client, f"/v1/jobs/{uuid.uuid4()}")[0].status_code == 404
    finally:
        engine.dispose()
