"""Many clients polling one job on a real `kma api` process: latency, throughput and errors.

Usage: .venv/bin/python bench/pollers.py [--clients 200] [--seconds 30] [--interval 1]
                                         [--examples 1000] [--api-workers 1] [--path P]
                                         [--keep]

Starts `python -m kma.cli api` on a fresh, migrated database (as bench/upload_export.py does),
uploads a qa dataset of `--examples` lines, submits a job over it and writes what a worker would
have written so far (the job running, a verdict for every example, one chunk done and counted
into the job). No worker runs. Then `--clients` clients, each on its own connection, poll
`GET /v1/jobs/{id}` for `--seconds`: once every `--interval` seconds, each with a random phase,
or with `--interval 0` one request after another as fast as the server answers (closed loop, to
show saturation). A request that gets no answer within `--timeout` seconds counts as a
timeout, at that latency.

PostgreSQL: KMA_DATABASE_URL when set, else the machine's on 127.0.0.1:5432 (a fresh
`kma_bench_*` database, dropped at the end), else an embedded one. Redis: KMA_BROKER_URL when
set, else db 7 of the machine's, else an embedded one; the job's work hint is taken back off the
queue. Other KMA_* settings (the pool sizes, timeouts) reach the API from the environment.
Prints the latency percentiles, requests/s, the answers by status and the CPU time per request
of the API, of PostgreSQL and of the clients (which the load of other work on the machine
changes less than it changes latency); the last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil  # type: ignore[import-untyped]
import redis
from sqlalchemy import make_url, text
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.db import make_engine  # noqa: E402
from app.jobs import lifecycle  # noqa: E402
from app.jobs.repository import count_chunk  # noqa: E402
from app.models import Chunk, ChunkStatus, Job, utcnow  # noqa: E402
from app.queue import WORK, WORK_QUEUE  # noqa: E402
from app.workspaces.service import create_key  # noqa: E402
from bench.stalls import cpu_times, steal_share  # noqa: E402
from bench.upload_export import (  # noqa: E402
    STUDENT,
    api_process,
    broker,
    database,
    machine,
    run_in_work_dir,
    upload,
)

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def build_dataset(path: Path, examples: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(examples):
            record = {"id": f"q{i}", "question": f"What is number {i}?", "answer": str(i)}
            out.write(json.dumps(record) + "\n")


def running_job(client: httpx.Client, database_url: str, broker_url: str, dataset_id: str) -> str:
    """A job submitted over HTTP, then running with a verdict for every example and its
    counters, as a worker would have left it."""
    response = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": STUDENT})
    if response.status_code != 202:
        raise RuntimeError(f"job submission answered {response.status_code}: {response.text}")
    job_id = uuid.UUID(response.json()["id"])
    take_back_work_hints(broker_url)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            job = session.get_one(Job, job_id)
            lifecycle.start(job)
            chunk = Chunk(
                job_id=job.id, index=0, start=0, stop=job.total, status=ChunkStatus.DONE,
                attempts=1, failures=0, generations=17 * job.total, cached_generations=0,
                engine_calls=2, engine_seconds=1.0, seconds=2.0, finished_at=utcnow(),
            )  # fmt: skip
            session.add(chunk)
            session.execute(
                text(
                    "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, "
                    "answers) SELECT :job_id, i, (CAST(:categories AS text[]))[1 + i % 4], "
                    "i % 4 = 3, false, '{}'::jsonb, '{}'::jsonb "
                    "FROM generate_series(0, :total - 1) AS i"
                ),
                {"job_id": job.id, "categories": list(CATEGORIES), "total": job.total},
            )
            count_chunk(session, chunk)
            session.commit()
            session.execute(text("ANALYZE verdict"))
            session.commit()
    finally:
        engine.dispose()
    return str(job_id)


def take_back_work_hints(broker_url: str) -> None:
    """No worker runs: remove the hint the submission queued, so none other takes it."""
    client = redis.Redis.from_url(broker_url, decode_responses=True)
    for message in map(str, client.lrange(WORK_QUEUE, 0, -1)):
        if WORK in message:
            client.lrem(WORK_QUEUE, 1, message)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)


class Poller:
    """One client's HTTP/1.1 connection, kept alive, with a key of its own, as pipelines each
    have: a request written by hand and its answer read by asyncio's streams. httpx took 1.5 to
    3 ms of CPU a request, taken from the API on this 2-core machine; this takes a fraction."""

    def __init__(self, base_url: str, key: str, timeout: float) -> None:
        address = urlsplit(base_url)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self.key = key
        self.timeout = timeout
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        """The status of `GET path`; raises TimeoutError past `timeout`, OSError or
        IncompleteReadError when the connection fails (the next request opens another)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._get(path)
        except BaseException:
            self.close()
            raise

    async def _get(self, path: str) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {self.key}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.lower().split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line[15:])
            elif line.startswith(b"connection:") and b"close" in line:
                close = True
        await reader.readexactly(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def api_keys(database_url: str, count: int) -> list[str]:
    """`count` keys of the default workspace."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            keys = [create_key(session, f"poller {i}")[1] for i in range(count)]
            session.commit()
            return keys
    finally:
        engine.dispose()


async def poll(client: Poller, path: str, interval: float, started: float, until: float) -> Tally:
    """One client: a GET every `interval` s from a random phase, or back to back when
    `interval` is 0, until `until`."""
    tally = Tally()
    next_at = started + random.uniform(0, interval)
    while True:
        now = time.perf_counter()
        if next_at > now:
            await asyncio.sleep(next_at - now)
        sent = time.perf_counter()
        if sent >= until:
            client.close()
            return tally
        try:
            tally.statuses[str(await client.get(path))] += 1
        except TimeoutError:
            tally.statuses["timeout"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            tally.statuses[type(exc).__name__] += 1
        tally.latencies.append(time.perf_counter() - sent)
        next_at = max(next_at + interval, time.perf_counter()) if interval else 0.0


async def poll_all(
    base_url: str, path: str, keys: list[str], interval: float, seconds: float, timeout: float
) -> tuple[Tally, float]:
    made = [Poller(base_url, key, timeout) for key in keys]
    started = time.perf_counter()
    until = started + seconds
    tallies = await asyncio.gather(
        *(poll(client, path, interval, started, until) for client in made)
    )
    total = Tally()
    for tally in tallies:
        total.latencies += tally.latencies
        total.statuses.update(tally.statuses)
    return total, time.perf_counter() - started


def processes_of(api_pid: int, database_url: str) -> dict[str, list[psutil.Process]]:
    """The API's processes (with `--workers`, its children too), PostgreSQL's backends serving
    the benchmark's database (their titles name it; none for a remote server), and this one,
    the clients'."""
    api = psutil.Process(api_pid)
    database = f" {make_url(database_url).database} "
    backends = [
        process
        for process in psutil.process_iter(["cmdline"])
        if database in " ".join(process.info["cmdline"] or []) + " "
    ]
    api_processes = [api, *api.children(recursive=True)]
    return {"api": api_processes, "database": backends, "clients": [psutil.Process()]}


def cpu_seconds(processes: list[psutil.Process]) -> dict[int, float]:
    """User and system CPU seconds of each process still running, by pid."""
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two readings; a process that started in between counts in full."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


@dataclass
class Result:
    path: str
    clients: int
    interval_s: float
    seconds: float
    examples: int
    api_workers: int
    requests: int
    requests_per_s: float
    ok: int
    statuses: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    api_cpu_ms_per_request: float
    """CPU time of the API processes per request: what the load average cannot blur."""
    database_cpu_ms_per_request: float
    """CPU time of PostgreSQL's backends for the benchmark's database, per request."""
    clients_cpu_ms_per_request: float
    """CPU time of the clients (this process), which share the machine, per request."""
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    steal_share: float | None
    """The share of the machine's CPU time its hypervisor gave to others while they polled."""
    database: str
    broker: str
    settings: dict[str, str]
    machine: dict[str, Any] = field(default_factory=dict)


def run(args: argparse.Namespace, work_dir: Path) -> Result:
    path = work_dir / "dataset.jsonl"
    build_dataset(path, args.examples)
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, args.keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir, local_db=7))
        print(f"database: {database_source}; broker: {broker_source}", file=sys.stderr)
        api, base_url = stack.enter_context(
            api_process(
                database_url,
                broker_url,
                work_dir / "api.log",
                ["--workers", str(args.api_workers)],
            )
        )
        keys = api_keys(database_url, args.clients)
        with httpx.Client(
            base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {keys[0]}"}
        ) as client:
            dataset_id, _ = upload(client, path, args.examples)
            job_id = running_job(client, database_url, broker_url, dataset_id)
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["progress"]["done"] == args.examples, job
        load_before = os.getloadavg()
        ticks_before = cpu_times()
        processes = processes_of(api.pid, database_url)
        cpu_before = {role: cpu_seconds(found) for role, found in processes.items()}
        mode = f"every {args.interval} s" if args.interval else "closed loop"
        print(
            f"{args.clients} clients polling job {job_id} ({mode}) for {args.seconds} s; "
            f"load average {load_before[0]:.2f}",
            file=sys.stderr,
        )
        tally, elapsed = asyncio.run(
            poll_all(
                base_url,
                args.path or f"/v1/jobs/{job_id}",
                keys,
                args.interval,
                args.seconds,
                args.timeout,
            )
        )
        load_after = os.getloadavg()
        steal = steal_share(ticks_before, cpu_times())
        processes = processes_of(api.pid, database_url)
        cpu = {role: cpu_used(cpu_before[role], cpu_seconds(processes[role])) for role in processes}
        requests = len(tally.latencies)
        return Result(
            path=args.path or "/v1/jobs/{id}",
            clients=args.clients,
            interval_s=args.interval,
            seconds=round(elapsed, 1),
            examples=args.examples,
            api_workers=args.api_workers,
            requests=requests,
            requests_per_s=round(requests / elapsed, 1),
            ok=tally.statuses["200"],
            statuses=dict(sorted(tally.statuses.items())),
            p50_ms=round(percentile(tally.latencies, 50) * 1000, 1),
            p90_ms=round(percentile(tally.latencies, 90) * 1000, 1),
            p99_ms=round(percentile(tally.latencies, 99) * 1000, 1),
            max_ms=round(max(tally.latencies, default=0.0) * 1000, 1),
            api_cpu_ms_per_request=round(cpu["api"] / max(requests, 1) * 1000, 2),
            database_cpu_ms_per_request=round(cpu["database"] / max(requests, 1) * 1000, 2),
            clients_cpu_ms_per_request=round(cpu["clients"] / max(requests, 1) * 1000, 2),
            load_average_before=load_before,
            load_average_after=load_after,
            steal_share=steal,
            database=database_source,
            broker=broker_source,
            settings={k: v for k, v in sorted(os.environ.items()) if k.startswith("KMA_DB_")},
            machine=machine(database_url),
        )


def table(result: Result) -> str:
    rows = [
        ("clients", f"{result.clients}, polling every {result.interval_s} s"),
        ("requests", f"{result.requests} in {result.seconds} s, {result.requests_per_s}/s"),
        ("answers", ", ".join(f"{k}: {v}" for k, v in result.statuses.items())),
        (
            "latency ms",
            f"p50 {result.p50_ms}, p90 {result.p90_ms}, p99 {result.p99_ms}, max {result.max_ms}",
        ),
        (
            "CPU ms/request",
            f"API {result.api_cpu_ms_per_request}, "
            f"PostgreSQL {result.database_cpu_ms_per_request}, "
            f"clients {result.clients_cpu_ms_per_request}",
        ),
        (
            "load average",
            f"{result.load_average_before[0]:.2f} before, {result.load_average_after[0]:.2f} after",
        ),
        ("CPU stolen", f"{result.steal_share} (by the hypervisor)"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--clients", type=int, default=200, help="concurrent pollers")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long they poll")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between a client's polls; 0: none"
    )
    parser.add_argument(
        "--timeout", type=float, default=35.0, help="seconds a request waits for its answer"
    )
    parser.add_argument("--examples", type=int, default=1000, help="the job's examples/verdicts")
    parser.add_argument("--api-workers", type=int, default=1, help="`kma api --workers`")
    parser.add_argument(
        "--path", help="poll this path instead of the job's (`/healthz`: the server's floor)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (API log) and the database"
    )
    args = parser.parse_args(argv)
    if args.clients < 1 or args.examples < 1 or args.seconds <= 0 or args.interval < 0:
        parser.error("--clients and --examples at least 1, --seconds > 0, --interval >= 0")
    return run_in_work_dir(lambda work_dir: run(args, work_dir), table, args.keep, ["api.log"])


if __name__ == "__main__":
    sys.exit(main())
