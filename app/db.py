"""Database engine, sessions and migrations."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL with the psycopg 3 driver named."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(
    url: str, *, statement_timeout_seconds: float = 0, keep_overflow: bool = False
) -> Engine:
    """An engine whose pool the settings size.

    Getting a connection, from the pool or a new one, fails after `db_pool_timeout_seconds`
    (libpq waits at least 2 s for a new one): a request on a saturated or unreachable database
    gets an error the API answers with 503, instead of holding its thread for 30 s. Statements
    run at most `statement_timeout_seconds` (0: no limit). With `keep_overflow`, connections
    opened beyond `db_pool_size` are kept too, instead of being closed as they come back.
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
        pool_size=settings.db_pool_size + (settings.db_max_overflow if keep_overflow else 0),
        max_overflow=0 if keep_overflow else settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_args=connect_args,
    )


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
    """Sessions of API requests, whose statements time out (`db_statement_timeout_seconds`).

    The pool keeps its overflow: `app.main.RequestSlots` runs as many requests at once as
    pool and overflow have connections, so under load the overflow is in use all the time, and
    closing a connection each time one comes back, to open another a moment later, would cost
    PostgreSQL a new process each time.
    """
    settings = get_settings()
    engine = make_engine(
        _database_url(),
        statement_timeout_seconds=settings.db_statement_timeout_seconds,
        keep_overflow=True,
    )
    return sessionmaker(engine, expire_on_commit=False)


def session_scope() -> Iterator[Session]:
    """A session for one request; the caller commits."""
    with get_api_sessionmaker()() as session:
        yield session


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database to the newest schema (or to `revision`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    command.upgrade(config, revision)
