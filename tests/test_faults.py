"""Fault trials through real processes: the API and two workers on a PostgreSQL and a Redis of
the test's own, with the default settings but a small chunk size, auditing with the tiny student.

Workers are SIGKILLed at random moments, PostgreSQL and Redis restart mid-job, Redis is down at
submission, a running job is cancelled. After each: the job succeeded (or stayed cancelled),
every example has exactly one verdict, the export is complete. The recovery times are written to
tests/artifacts/faults.json (their worst is quoted in BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.db import migrate
from app.settings import Settings
from kma.cli.processes import free_port, stop_process, wait_until_ready
from kma.client import Client
from kma.tiny_student import write_dataset
from tests.servers import OwnPostgres, OwnRedis, clean_env, kill, make_key, query, start_kma

pytestmark = pytest.mark.slow

LEASE = Settings().lease_seconds
"""The default lease: recovery from any fault must take less than two."""
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@dataclass
class Stack:
    root: Path
    postgres: OwnPostgres
    redis: OwnRedis
    database_url: str
    env: dict[str, str]
    url: str
    student: str
    dataset_id: str
    key: str = ""
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0
    seeds: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    def start_worker(self) -> subprocess.Popen[bytes]:
        self.started += 1
        log = self.root / f"worker{self.started}.log"
        worker = start_kma(["worker", "--hostname", f"w{self.started}@%h"], self.env, log)
        self.workers.append(worker)
        return worker

    def submit(self, client: Client, **config: Any) -> str:
        job = client.create_job(self.dataset_id, self.student, config=self.fresh(config))
        return str(job["id"])

    def fresh(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config with a seed of its own: other exemplar sets, so other prompts, so a job
        the generation cache cannot answer at once (it would leave no fault to recover from)."""
        self.seeds += 1
        return {"seed": self.seeds, **config}

    def done(self, job_ids: list[str]) -> int | None:
        """Verdicts written for these jobs; None while the database is away."""
        try:
            rows = query(
                self.database_url,
                "SELECT count(*) FROM verdict WHERE job_id = ANY(%s::uuid[])",
                job_ids,
            )
        except psycopg.OperationalError:
            return None
        return int(rows[0][0])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, student_dir: Path) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("faults")
    postgres = OwnPostgres(root / "pg")
    redis_server = OwnRedis(root / "redis")
    database_url = postgres.database("kma")
    migrate(database_url)
    env = clean_env(
        KMA_DATABASE_URL=database_url,
        KMA_BROKER_URL=redis_server.url,
        KMA_CHUNK_SIZE="4",
        KMA_DATA_DIR=str(root),
        OMP_NUM_THREADS="1",  # two workers share two cores
        KMA_STUDENTS=json.dumps({"tiny": {"engine": "hf", "model": str(student_dir)}}),
    )
    port = free_port()
    dataset = root / "teacher.jsonl"
    write_dataset(dataset, n_trained=24, n_unseen=16)
    stack = Stack(
        root=root,
        postgres=postgres,
        redis=redis_server,
        database_url=database_url,
        env=env,
        url=f"http://127.0.0.1:{port}",
        student="tiny",
        dataset_id="",
    )
    stack.key = make_key(database_url)
    stack.api = start_kma(
        ["api", "--host", "127.0.0.1", "--port", str(port)], env, root / "api.log"
    )
    try:
        wait_until_ready(f"{stack.url}/readyz", stack.api, timeout=60)
        stack.dataset_id = str(Client(stack.url, api_key=stack.key).upload_dataset(dataset)["id"])
        stack.start_worker()
        stack.start_worker()
        yield stack
    finally:
        for process in [*stack.workers, stack.api]:
            stop_process(process, timeout=30)
        redis_server.stop()
        postgres.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "faults.json").write_text(json.dumps(stack.results, indent=2) + "\n")
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-2000:]}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` holds; fails the test past `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - started


def seconds_to_progress(stack: Stack, job_ids: list[str], timeout: float = 2 * LEASE) -> float:
    """From now until these jobs gain a verdict over what they have now."""
    before = None
    while before is None:
        before = stack.done(job_ids)
    return wait_for(
        lambda: (stack.done(job_ids) or 0) > before, timeout, "progress after the fault"
    )


def assert_complete(stack: Stack, client: Client, job_id: str, tmp_path: Path) -> None:
    """Succeeded, one verdict per example, and an export with every record."""
    job = client.wait(job_id, poll_seconds=0.5, timeout=600)
    assert job["status"] == "succeeded", job
    total = job["progress"]["total"]
    rows = query(
        stack.database_url,
        "SELECT count(*), count(DISTINCT position), min(position), max(position)"
        " FROM verdict WHERE job_id = %s",
        job_id,
    )
    assert rows[0] == (total, total, 0, total - 1)
    out = tmp_path / f"{job_id}.jsonl"
    assert client.download(job_id, out, policy="annotate") == total
    assert len(out.read_text().splitlines()) == total


class ChunkWatch:
    """Who holds each chunk, seen every quarter second: when a killed worker's chunk came back."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.seen: dict[tuple[str, int], list[tuple[float, str | None, str]]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            with contextlib.suppress(psycopg.OperationalError):
                rows = query(
                    self.database_url,
                    "SELECT job_id::text, index, claimed_by, status::text,"
                    " extract(epoch FROM clock_timestamp()) FROM chunk",
                )
                for job_id, index, claimed_by, status, at in rows:
                    history = self.seen.setdefault((job_id, index), [])
                    if not history or history[-1][1:] != (claimed_by, status):
                        history.append((float(at), claimed_by, status))

    def taken_up(self, chunk: tuple[str, int], dead: str, after: float) -> float:
        """When, after `after`, the chunk was claimed by another worker than `dead`, or done."""
        for at, claimed_by, status in self.seen.get(chunk, []):
            if at > after and (status == "done" or (claimed_by and dead not in claimed_by)):
                return at
        raise AssertionError(f"chunk {chunk} was never taken up after its worker died")


def test_workers_killed_at_random_moments(stack: Stack, tmp_path: Path) -> None:
    client = Client(stack.url, api_key=stack.key)
    rng = random.Random(7)
    watch = ChunkWatch(stack.database_url)
    job_ids = [stack.submit(client) for _ in range(3)]
    kills: list[tuple[float, str, list[tuple[str, int]]]] = []
    while len(kills) < 20:
        time.sleep(rng.uniform(3.0, 9.0))
        if stack.done(job_ids) == 40 * len(job_ids):  # all done: more work to kill into
            job_ids.append(stack.submit(client, mode=rng.choice(["full", "adaptive"])))
        victim = rng.choice(stack.workers)
        dead = f":{victim.pid}:"
        held = query(
            stack.database_url,
            "SELECT job_id::text, index FROM chunk WHERE claimed_by LIKE %s AND status = 'pending'",
            f"%{dead}%",
        )
        kill(victim)
        killed_at = query(stack.database_url, "SELECT extract(epoch FROM clock_timestamp())")
        stack.workers.remove(victim)
        stack.start_worker()
        kills.append((float(killed_at[0][0]), dead, [(j, i) for j, i in held]))

    for job_id in job_ids:
        assert_complete(stack, client, job_id, tmp_path)
    watch.stop.set()
    watch.thread.join()
    # Every chunk a killed worker held was taken up by another within two leases.
    recoveries = [
        watch.taken_up(chunk, dead, at) - at for at, dead, held in kills for chunk in held
    ]
    stack.results["sigkill"] = {
        "kills": len(kills),
        "jobs": len(job_ids),
        "chunks_held_by_killed_workers": len(recoveries),
        "seconds_until_taken_up": [round(r, 1) for r in recoveries],
        "worst_recovery_seconds": round(max(recoveries, default=0.0), 1),
    }
    assert recoveries, "no kill caught a worker holding a chunk"
    assert max(recoveries) < 2 * LEASE


def test_a_postgres_restart_mid_job(stack: Stack, tmp_path: Path) -> None:
    client = Client(stack.url, api_key=stack.key)
    job_id = stack.submit(client)
    wait_for(lambda: (stack.done([job_id]) or 0) >= 8, 300, "first verdicts")
    stack.postgres.restart()
    waited = seconds_to_progress(stack, [job_id])
    assert_complete(stack, client, job_id, tmp_path)
    stack.results["postgres_restart"] = {"seconds_to_progress": round(waited, 1)}


def test_a_redis_restart_mid_job(stack: Stack, tmp_path: Path) -> None:
    client = Client(stack.url, api_key=stack.key)
    job_id = stack.submit(client)
    wait_for(lambda: (stack.done([job_id]) or 0) >= 8, 300, "first verdicts")
    stack.redis.stop()
    time.sleep(1.0)
    stack.redis.start()
    waited = seconds_to_progress(stack, [job_id])
    assert_complete(stack, client, job_id, tmp_path)
    stack.results["redis_restart"] = {"seconds_to_progress": round(waited, 1)}


def test_redis_down_at_submission(stack: Stack, tmp_path: Path) -> None:
    """The job is stored and answered 202, a retry with its key gives it back, and it runs with
    Redis still down: the workers find it in the database (their sweeper claims work itself
    when the broker hands them nothing)."""
    stack.redis.stop()
    try:
        body = {"dataset_id": stack.dataset_id, "student": stack.student, "config": stack.fresh({})}
        headers = {"Idempotency-Key": "faults-redis-down", "Authorization": f"Bearer {stack.key}"}
        first = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=headers, timeout=30)
        assert first.status_code == 202, first.text
        retried = httpx.post(f"{stack.url}/v1/jobs", json=body, headers=headers, timeout=30)
        assert retried.status_code == 202, retried.text
        assert retried.json()["id"] == first.json()["id"]  # the retry gave the same job
        job_id = first.json()["id"]
        waited = wait_for(lambda: bool(stack.done([job_id])), 2 * LEASE, "a verdict, Redis down")
    finally:
        stack.redis.start()
    client = Client(stack.url, api_key=stack.key)
    assert_complete(stack, client, job_id, tmp_path)
    stack.results["redis_down_at_submission"] = {
        "seconds_from_submission_to_progress_with_redis_down": round(waited, 1)
    }


def test_a_cancel_stops_writing_and_frees_the_workers(stack: Stack) -> None:
    client = Client(stack.url, api_key=stack.key)
    job_id = stack.submit(client, mode="full")
    wait_for(lambda: (stack.done([job_id]) or 0) >= 4, 300, "first verdicts")
    cancelled = client.cancel(job_id)
    assert cancelled["status"] == "cancelled"
    at_cancel = stack.done([job_id])
    cancelled_at = time.monotonic()
    next_job = stack.submit(client)
    free_after = wait_for(
        lambda: client.get_job(next_job)["status"] != "queued", 60, "the next job starts"
    )
    time.sleep(max(0.0, 10 - (time.monotonic() - cancelled_at)))
    assert stack.done([job_id]) == at_cancel  # no verdict after the cancel committed
    stack.results["cancel"] = {
        "verdicts_at_cancel": at_cancel,
        "seconds_until_a_worker_took_the_next_job": round(free_after, 1),
    }
    assert free_after < 10
    assert client.wait(next_job, timeout=600)["status"] == "succeeded"
