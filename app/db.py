"""Database engine, sessions and migrations."""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import ClauseElement, Connection, Engine, create_engine
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg as psycopg_dialect
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


class DatabaseBusy(Exception):
    """No connection of an `AsyncConnections` pool was free in time."""


class AsyncConnections:
    """A few psycopg connections for reads that run on the event loop (a job's poll): no worker
    thread to hop to, no ping before each use and no transaction around it (autocommit), where a
    read through a session takes a thread and four round trips to the database (ping, BEGIN,
    SELECT, ROLLBACK).

    At most `size` connections; a read waits `wait_seconds` for one, then raises `DatabaseBusy`.
    A connection that fails is closed; one the server closed while it sat idle (a restart) is
    replaced unseen, as `pool_pre_ping` does for the engine's. Statements time out after
    `statement_timeout_seconds` (0: no limit). Bound to the event loop that made it.
    """

    def __init__(
        self, url: str, size: int, wait_seconds: float, statement_timeout_seconds: float
    ) -> None:
        self.url = url
        self.wait_seconds = wait_seconds
        self.connect_args: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(wait_seconds)),
        }
        if statement_timeout_seconds:
            milliseconds = max(1, round(statement_timeout_seconds * 1000))
            self.connect_args["options"] = f"-c statement_timeout={milliseconds}"
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    async def fetch(self, query: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement, in a transaction of its own."""
        if self._slots.locked():  # a timer only for those that wait: it costs more than a slot
            try:
                await asyncio.wait_for(self._slots.acquire(), self.wait_seconds)
            except TimeoutError:
                raise DatabaseBusy("no connection was free in time") from None
        else:
            await self._slots.acquire()
        try:
            while self._idle:
                connection = self._idle.pop()
                try:
                    return await self._fetch_on(connection, query, params)
                except psycopg.errors.QueryCanceled:
                    raise
                except psycopg.OperationalError:  # closed while idle: try another, or a new one
                    continue
            connection = await psycopg.AsyncConnection.connect(self.url, **self.connect_args)
            return await self._fetch_on(connection, query, params)
        finally:
            self._slots.release()

    async def _fetch_on(
        self, connection: psycopg.AsyncConnection[Any], query: str, params: Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        try:
            cursor = await connection.execute(query, params, prepare=True)
            rows = await cursor.fetchall()
        except BaseException:  # its state is unknown (a cancelled statement, a lost server)
            await connection.close()
            raise
        self._idle.append(connection)
        return rows

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()


_loop_connections: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[str, AsyncConnections]
] = weakref.WeakKeyDictionary()


def api_connections(url: str) -> AsyncConnections:
    """The running event loop's pool for API reads of the database at `url`, sized by the
    settings as the API's engine is (`db_pool_size`, `db_pool_timeout_seconds`,
    `db_statement_timeout_seconds`)."""
    pools = _loop_connections.setdefault(asyncio.get_running_loop(), {})
    pool = pools.get(url)
    if pool is None:
        settings = get_settings()
        pool = pools[url] = AsyncConnections(
            plain_url(url),
            settings.db_pool_size,
            settings.db_pool_timeout_seconds,
            settings.db_statement_timeout_seconds,
        )
    return pool


async def close_api_connections() -> None:
    """Close the running event loop's pools (the API's shutdown)."""
    for pool in _loop_connections.pop(asyncio.get_running_loop(), {}).values():
        await pool.close()


def plain_url(url: str) -> str:
    """A PostgreSQL URL as libpq takes it: without SQLAlchemy's driver name."""
    scheme, separator, rest = url.partition("://")
    return "postgresql://" + rest if separator and scheme.startswith("postgres") else url


def compiled(statement: ClauseElement) -> str:
    """A SQLAlchemy statement as psycopg's SQL text, with `%(name)s` for its `bindparam`s:
    compiled once, at import, for `AsyncConnections.fetch`."""
    return str(statement.compile(dialect=psycopg_dialect()))  # type: ignore[no-untyped-call]
