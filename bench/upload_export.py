"""Upload a large JSONL dataset to a real `kma api` process, export it back (JSONL with two
policies, Parquet, an hf folder), measure its memory.

Usage: .venv/bin/python bench/upload_export.py [--lines 1000000] [--keep]

The dataset cycles through ../shared/data/entityquestions/{dev,test}.jsonl with unique ids.
PostgreSQL and Redis: KMA_DATABASE_URL / KMA_BROKER_URL when set, else the machine's on their
usual ports (a fresh database, dropped at the end), else embedded ones in a temp dir. No worker
runs: the export reads a job that is created and then cancelled, so every row comes back.
The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]
import psycopg
import redis
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.db import make_engine, migrate  # noqa: E402
from app.embedded import ensure_database, start_postgres, start_redis, stop_redis  # noqa: E402
from app.workspaces.service import create_key  # noqa: E402
from kma.cli.processes import free_port, stop_process, wait_until_ready  # noqa: E402

SOURCE = REPO.parent / "shared" / "data" / "entityquestions"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_REDIS = "redis://127.0.0.1:6379/14"
STUDENT = "bench-student"
"""The student `kma api` registers here: jobs name it; the benchmarks' workers never load it."""
MB = 1_000_000
POLL_SECONDS = 0.1
READY_TIMEOUT = 120.0
EXPORTS: tuple[tuple[str | None, str], ...] = (
    ("annotate", "jsonl"),
    (None, "jsonl"),  # None: the default policy
    (None, "parquet"),
    (None, "hf"),
)
"""(policy, format) of each export measured."""


def build_dataset(path: Path, lines: int) -> int:
    """Write `lines` records cycling through the source files, each with a unique id; its size."""
    records = [
        json.loads(line)
        for name in ("dev.jsonl", "test.jsonl")
        for line in (SOURCE / name).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    with path.open("w", encoding="utf-8") as out:
        for n in range(lines):
            record = records[n % len(records)]
            out.write(json.dumps({**record, "id": f"{record['id']}-{n}"}, ensure_ascii=False))
            out.write("\n")
    return path.stat().st_size


def postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def database_url_in(admin_url: str, database: str) -> str:
    base, _, query = admin_url.partition("?")
    return base.rsplit("/", 1)[0] + f"/{database}" + (f"?{query}" if query else "")


@contextmanager
def database(work_dir: Path, keep: bool) -> Iterator[tuple[str, str]]:
    """A migrated database: (URL, where it comes from)."""
    if url := os.environ.get("KMA_DATABASE_URL"):
        migrate(url)
        yield url, "KMA_DATABASE_URL"
        return
    server = None
    admin_url = LOCAL_POSTGRES
    source = "local PostgreSQL, fresh database"
    if not postgres_answers(admin_url):
        server, admin_url = start_postgres(work_dir / "embedded", database="postgres")
        source = "embedded PostgreSQL"
    name = f"kma_bench_{uuid.uuid4().hex[:12]}"
    try:
        ensure_database(admin_url, name)
        url = database_url_in(admin_url, name)
        migrate(url)
        yield url, f"{source} {name}"
    finally:
        if server is not None:
            server._cleanup()
        elif keep:
            print(f"kept database {name}", file=sys.stderr)
        else:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def broker(work_dir: Path, local_db: int = 14) -> Iterator[tuple[str, str]]:
    """A Redis broker: (URL, where it comes from); the machine's Redis uses db `local_db`."""
    local = LOCAL_REDIS.rsplit("/", 1)[0] + f"/{local_db}"
    if url := os.environ.get("KMA_BROKER_URL"):
        yield url, "KMA_BROKER_URL"
    elif redis_answers(local):
        yield local, f"local Redis db {local_db}"
    else:
        server, url = start_redis(work_dir / "redis")
        try:
            yield url, "embedded Redis"
        finally:
            stop_redis(server)


def purge_job_messages(broker_url: str, job_id: str) -> int:
    """Remove the plan message the API queued for our job (no worker ran to take it)."""
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    removed = 0
    for message in map(str, client.lrange("celery", 0, -1)):  # str already: decode_responses
        if job_id in message:
            removed += int(client.lrem("celery", 0, message))
    return removed


class MemorySampler:
    """Polls a process's RSS in a thread and keeps the maximum seen in each phase."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.phase = "start-up"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        rss: int = self.process.memory_info().rss
        return rss

    def vm_hwm(self) -> int:
        """Peak RSS since the process started, in bytes (VmHWM in /proc/PID/status)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        return int(kib) * 1024

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            with contextlib.suppress(psutil.Error):
                rss = self.rss()
                self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def api_key(database_url: str) -> str:
    """A new key of the default workspace, for the benchmark's requests."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = create_key(session, "benchmark")[1]
            session.commit()
            return key
    finally:
        engine.dispose()


@contextmanager
def api_process(
    database_url: str, broker_url: str, log_path: Path, options: Sequence[str] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`kma api [options]` as its own process, ready; yields it and its base URL, stops it on
    exit."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "KMA_DATABASE_URL": database_url, "KMA_BROKER_URL": broker_url}
    env["KMA_STUDENTS"] = json.dumps({STUDENT: {"engine": "hf", "model": STUDENT}})
    command = [sys.executable, "-m", "kma.cli", "api", "--host", "127.0.0.1", "--port"]
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [*command, str(port), *options], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until_ready(f"{base_url}/readyz", server, READY_TIMEOUT)
        yield server, base_url
    finally:
        stop_process(server)


@dataclass
class Export:
    policy: str
    format: str
    lines: int
    mb: float
    seconds: float
    rows_per_s: float
    first_byte_s: float


@dataclass
class Result:
    lines: int
    file_mb: float
    upload_s: float
    upload_rows_per_s: float
    upload_mb_per_s: float
    exports: list[Export]
    api_baseline_rss_mb: float
    api_peak_rss_mb_polled: dict[str, float]
    api_vm_hwm_mb_after_upload: float
    api_vm_hwm_mb: float
    api_rss_mb_at_end: float
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def upload(client: httpx.Client, path: Path, lines: int) -> tuple[str, float]:
    """Stream the file as a multipart upload; the dataset id and the seconds it took."""
    with path.open("rb") as fh:
        started = time.perf_counter()
        response = client.post(
            "/v1/datasets",
            files={"file": (path.name, fh, "application/x-ndjson")},
            data={"name": f"bench {lines} lines"},
        )
        seconds = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"upload answered {response.status_code}: {response.text[:2000]}")
    dataset = response.json()
    if dataset["num_examples"] != lines:
        raise RuntimeError(f"stored {dataset['num_examples']} examples, sent {lines}")
    return str(dataset["id"]), seconds


def cancelled_job(client: httpx.Client, dataset_id: str) -> str:
    """A job over the dataset, cancelled at once: exportable, every row without a verdict."""
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": STUDENT})
    if response.status_code != 202:
        raise RuntimeError(f"job submission answered {response.status_code}: {response.text}")
    job_id = str(response.json()["id"])
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    if response.status_code != 200 or response.json()["status"] != "cancelled":
        raise RuntimeError(f"cancel answered {response.status_code}: {response.text}")
    return job_id


def export(
    client: httpx.Client, job_id: str, policy: str | None, export_format: str, expected: int
) -> Export:
    """Stream the export, counting bytes, and lines for JSONL; checks the announced count, and
    for JSONL the lines and the end ids. A Parquet or hf export's first byte comes once the
    file is written."""
    label = policy or "default"
    params = {"policy": policy, "format": export_format} if policy else {"format": export_format}
    lines = size = 0
    first_byte = 0.0
    head = tail = b""
    started = time.perf_counter()
    with client.stream("GET", f"/v1/jobs/{job_id}/export", params=params) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"export answered {response.status_code}: {response.text}")
        announced = int(response.headers["X-Kma-Record-Count"])
        if announced != expected:
            raise RuntimeError(f"export {label}: {announced} records announced, {expected} sent")
        for chunk in response.iter_bytes():
            if not size:
                first_byte = time.perf_counter() - started
                head = chunk[: chunk.find(b"\n")]
            lines += chunk.count(b"\n")
            size += len(chunk)
            tail = (tail + chunk)[-4096:]
    seconds = time.perf_counter() - started
    if export_format != "jsonl":
        return Export(
            label, export_format, expected, size / MB, seconds, expected / seconds, first_byte
        )
    if lines != expected:
        raise RuntimeError(f"export {label}: {lines} lines, uploaded {expected}")
    first, last = json.loads(head), json.loads(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    if not first["id"].endswith("-0") or not last["id"].endswith(f"-{expected - 1}"):
        raise RuntimeError(f"export {label}: rows out of order ({first['id']}, {last['id']})")
    return Export(label, export_format, lines, size / MB, seconds, lines / seconds, first_byte)


def machine(database_url: str) -> dict[str, Any]:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "postgresql": row[0] if row else None,
        "date": datetime.now(UTC).date().isoformat(),
    }


def run(lines: int, work_dir: Path, keep: bool) -> Result:
    path = work_dir / f"entityquestions-{lines}.jsonl"
    started = time.perf_counter()
    file_bytes = build_dataset(path, lines)
    print(
        f"dataset: {path} {lines} lines, {file_bytes / MB:.1f} MB "
        f"(built in {time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir))
        print(f"database: {database_source}; broker: {broker_source}", file=sys.stderr)
        server, base_url = stack.enter_context(
            api_process(database_url, broker_url, work_dir / "api.log")
        )
        sampler = stack.enter_context(MemorySampler(server.pid))
        baseline = sampler.rss()
        headers = {"Authorization": f"Bearer {api_key(database_url)}"}
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=None, headers=headers))

        sampler.phase = "upload"
        dataset_id, upload_s = upload(client, path, lines)
        hwm_after_upload = sampler.vm_hwm()
        print(f"upload: {upload_s:.1f} s, {lines / upload_s:,.0f} rows/s", file=sys.stderr)

        sampler.phase = "export"
        job_id = cancelled_job(client, dataset_id)
        exports = []
        for policy, export_format in EXPORTS:
            exports.append(export(client, job_id, policy, export_format, lines))
            done = exports[-1]
            print(f"export {done.policy} {done.format}: {done.seconds:.1f} s", file=sys.stderr)
        time.sleep(2 * POLL_SECONDS)
        sampler.phase = "idle"
        if broker_url.startswith(("redis://", "rediss://")):  # the embedded one goes away
            removed = purge_job_messages(broker_url, job_id)
            print(f"removed {removed} queued message(s) of job {job_id}", file=sys.stderr)
        return Result(
            lines=lines,
            file_mb=file_bytes / MB,
            upload_s=upload_s,
            upload_rows_per_s=lines / upload_s,
            upload_mb_per_s=file_bytes / MB / upload_s,
            exports=exports,
            api_baseline_rss_mb=baseline / MB,
            api_peak_rss_mb_polled={k: v / MB for k, v in sampler.peaks.items()},
            api_vm_hwm_mb_after_upload=hwm_after_upload / MB,
            api_vm_hwm_mb=sampler.vm_hwm() / MB,
            api_rss_mb_at_end=sampler.rss() / MB,
            database=database_source,
            broker=broker_source,
            machine=machine(database_url),
        )


def table(result: Result) -> str:
    rows = [
        ("lines", f"{result.lines:,}"),
        ("file", f"{result.file_mb:.1f} MB"),
        (
            "upload",
            f"{result.upload_s:.1f} s, {result.upload_rows_per_s:,.0f} rows/s, "
            f"{result.upload_mb_per_s:.1f} MB/s",
        ),
    ]
    for e in result.exports:
        rows.append(
            (
                f"export {e.policy} {e.format}",
                f"{e.seconds:.1f} s, {e.rows_per_s:,.0f} rows/s, {e.mb:.1f} MB, "
                f"first byte {e.first_byte_s * 1000:.0f} ms",
            )
        )
    polled = ", ".join(f"{k} {v:.0f}" for k, v in result.api_peak_rss_mb_polled.items())
    rows += [
        ("API RSS after start-up", f"{result.api_baseline_rss_mb:.0f} MB"),
        ("API peak RSS, polled", f"{polled} (MB)"),
        ("API VmHWM after upload", f"{result.api_vm_hwm_mb_after_upload:.0f} MB"),
        ("API VmHWM at end", f"{result.api_vm_hwm_mb:.0f} MB"),
        ("API RSS at end", f"{result.api_rss_mb_at_end:.0f} MB"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=1_000_000, help="records in the dataset")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (dataset, API log) and the database"
    )
    args = parser.parse_args(argv)
    if args.lines < 1:
        parser.error("--lines must be at least 1")
    return run_in_work_dir(
        lambda work_dir: run(args.lines, work_dir, args.keep), table, args.keep, ["api.log"]
    )


def run_in_work_dir(
    run: Callable[[Path], Any], table: Callable[[Any], str], keep: bool, logs: Sequence[str]
) -> int:
    """Run a benchmark in a temp dir of its own: the tails of its `logs` if it fails, else its
    table, then its result (a dataclass) as JSON on the last line of stdout."""
    work_dir = Path(tempfile.mkdtemp(prefix="kma-bench-"))
    try:
        result = run(work_dir)
    except Exception:
        for name in logs:
            log = work_dir / name
            if log.exists():
                print(f"--- {log} (tail) ---", file=sys.stderr)
                print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    finally:
        if keep:
            print(f"kept {work_dir}", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(table(result))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
