"""Shared fixtures: a real PostgreSQL (fresh database, real migrations), a real Redis, the student.

PostgreSQL and Redis are the machine's when they answer on their usual ports (or the servers
`KMA_TEST_DATABASE_URL` / `KMA_TEST_BROKER_URL` name), else the embedded ones.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest
import schemathesis
from fastapi import FastAPI
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, migrate
from app.embedded import ensure_database, start_postgres, start_redis, stop_redis

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
CACHE = REPO / ".cache"


def answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("KMA_TEST_DATABASE_URL"):
        yield url
    elif answers("127.0.0.1", 5432):
        yield "postgresql://postgres@127.0.0.1:5432/postgres"
    else:
        server, url = start_postgres(tmp_path_factory.mktemp("embedded"), database="postgres")
        yield url
        server._cleanup()


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new database with the real migrations applied, dropped on exit."""
    name = f"kma_test_{uuid.uuid4().hex[:12]}"
    ensure_database(admin_url, name)
    base, _, query = admin_url.partition("?")
    url = base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")
    migrate(url)
    try:
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh database for the session's API and service tests."""
    with fresh_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def worker_engine(postgres_admin_url: str) -> Iterator[Engine]:
    """A database of its own for worker tests, which commit and look at every job."""
    with fresh_database(postgres_admin_url) as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


@pytest.fixture
def sessions(worker_engine: Engine) -> sessionmaker[Session]:
    """Sessions that really commit, on tables emptied before the test."""
    with worker_engine.begin() as connection:
        connection.execute(text("TRUNCATE dataset, job, generation CASCADE"))
    return sessionmaker(worker_engine, expire_on_commit=False)


@pytest.fixture(scope="session")
def db_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(db_engine: Engine) -> Iterator[Session]:
    """A session whose commits are savepoints, all rolled back after the test."""
    with db_engine.connect() as connection:
        transaction = connection.begin()
        with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
            yield session
        transaction.rollback()


@pytest.fixture
def api(session: Session) -> Iterator[FastAPI]:
    """The app, its requests running in the test's `session`; tests add their own overrides."""
    from app.db import session_scope
    from app.main import create_app

    def request_session() -> Iterator[Session]:
        try:
            yield session
        finally:
            session.rollback()  # what closing a request's session does to what it did not commit

    app = create_app()
    app.dependency_overrides[session_scope] = request_session
    yield app


@pytest.fixture
def api_key(session: Session) -> str:
    """A key of a workspace of the test's own ("tests"), in the test's session."""
    from app.workspaces.service import create_key

    key = create_key(session, "tests", TEST_WORKSPACE)[1]
    session.commit()  # a savepoint: the test's transaction is rolled back at its end
    return key


TEST_WORKSPACE = "tests"
"""The workspace of the `api_key` fixture's key."""


def new_workspace(session: Session, name: str | None = None) -> uuid.UUID:
    """The workspace named so (made if new), or one of its own, for rows a test writes."""
    from app.workspaces.service import ensure_workspace

    return ensure_workspace(session, name or f"tests-{uuid.uuid4().hex[:8]}").id


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_documented(app: FastAPI, operation: str, response: httpx.Response) -> None:
    """The answer is one the app's published schema documents for the operation (such as
    `GET /v1/jobs/{job_id}`): its status code, its content type, and a body that matches."""
    method, path = operation.split(" ")
    spec = app.openapi()
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(response.status_code) in responses, f"{operation} does not document {response}"
    content_type = response.headers["content-type"].split(";")[0]
    assert content_type in responses[str(response.status_code)]["content"]
    schemathesis.openapi.from_dict(spec)[path][method].validate_response(response)


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if url := os.environ.get("KMA_TEST_BROKER_URL"):
        yield url
    elif answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/15"
    else:
        server, url = start_redis(tmp_path_factory.mktemp("redis"))
        yield url
        stop_redis(server)


@pytest.fixture(scope="session")
def student_dir() -> Path:
    """The tiny student, built once and cached under .cache/ between runs."""
    from kma.tiny_student import ensure_student

    return ensure_student(CACHE / "tiny-student")
