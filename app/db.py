"""Database engine, sessions and migrations."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the psycopg 3 driver named."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, statement_timeout_seconds: float = 0) -> Engine:
    """An engine whose pool the settings size.

    Getting a connection, from the pool or a new one, fails after `db_pool_timeout_seconds`
    (libpq waits at least 2 s for a new one): a request on a saturated or unreachable database
    gets an error the API answers with 503, instead of holding its thread for 30 s. Statements
    run at most `statement_timeout_seconds` (0: no limit).
    """
    settings = get_settings()
    connect_args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(settings.db_pool_timeout_seconds))
    }
    if statement_timeout_seconds:
        milliseconds = max(1, round(statement_timeout_seconds * 1000))
        connect_args["options"] = f"-c statement_timeout={milliseconds}"
    return create_engine(
        sqlalchemy_url(url),
        pool_pre_ping=True,  # a connection PostgreSQL closed (restarted) is replaced unseen
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_args=connect_args,
    )


@contextmanager
def autocommit_connection(sessions: sessionmaker[Session]) -> Iterator[Connection]:
    """A connection of the sessions' pool on which each statement commits by itself. Held through
    a chunk's engine calls, it spares each cache read and write a connection check-out (and its
    ping) and a transaction, and leaves no transaction open while the engine generates; the pool
    takes it back in its usual mode."""
    with sessions() as session:
        yield session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def driver_connection(connection: Connection) -> psycopg.Connection[Any]:
    """The psycopg connection under a SQLAlchemy one, in its transaction (if it has one): for
    what SQLAlchemy has no words for, such as COPY."""
    return cast("psycopg.Connection[Any]", connection.connection.driver_connection)


def _database_url() -> str:
    url = get_settings().database_url
    if not url:
        raise RuntimeError("KMA_DATABASE_URL is not set (kma serve sets it for the embedded one)")
    return url


@lru_cache
def get_engine() -> Engine:
    """The workers' engine: no statement timeout."""
    return make_engine(_database_url())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@lru_cache
def get_api_sessionmaker() -> sessionmaker[Session]:
    """Sessions of API requests, whose statements time out (`db_statement_timeout_seconds`)."""
    settings = get_settings()
    engine = make_engine(
        _database_url(), statement_timeout_seconds=settings.db_statement_timeout_seconds
    )
    return sessionmaker(engine, expire_on_commit=False)


def session_scope() -> Iterator[Session]:
    """A session for one request; the caller commits."""
    with get_api_sessionmaker()() as session:
        yield session


def alembic_config(url: str) -> Config:
    """Alembic's configuration for the database at `url`, with this project's migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database to the newest schema, or to `revision`."""
    command.upgrade(alembic_config(url), revision)
