"""The service path with an instant engine: what one worker costs per generation besides the model.

Usage: .venv/bin/python bench/overhead.py [--examples 30000] [--modes full adaptive]
                                          [--profile DIR [--on-cpu]] [--keep]

Uploads an invented qa dataset ("What is number <i>?", as bench/scale.py writes it) through a
real `kma api` process, then runs one job per mode with the method's default config (10 exemplar
sets of 4 shots, a greedy answer and 16 samples per prompt: 170 generations per example in full
mode) in a real worker process (`python -m bench.instant_worker`: `kma worker` with a student
that answers at once), each mode in a worker of its own and with a seed of its own, so no job
finds another's generations in the cache. Everything but the model is the production path:
PostgreSQL, the generation cache, the runner and its scoring, the verdicts, the report.

Per job it measures the time from the job's start to its success (the database's timestamps),
the worker's busy time (its units of work, timed inside it), the scoring's share of that, the
CPU time of both, generations/s and examples/s over each, and how much the `verdict` table and
the generation cache grew; it checks the report's categories (even numbers HighlyKnown, odd
ones Unknown). `--profile DIR` samples the worker with py-spy during each job and lists the
functions it spent most time in: shares of its wall time, waits for the database included, or
with `--on-cpu` of the samples that found it running (about its CPU time).

PostgreSQL: KMA_DATABASE_URL when set, else a fresh `kma_bench_*` database on the machine's
(dropped at the end), else an embedded one. Redis: KMA_BROKER_URL when set, else db 14 of the
machine's, else an embedded one. The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.schemas import AuditConfig, Mode  # noqa: E402
from app.settings import Settings  # noqa: E402
from bench.instant_worker import TIMINGS_ENV, WorkerTimings  # noqa: E402
from bench.scale import (  # noqa: E402
    build_dataset,
    follow,
    submit,
    table_sizes,
    timeline,
    worker_process,
)
from bench.upload_export import (  # noqa: E402
    MB,
    MemorySampler,
    api_key,
    api_process,
    broker,
    database,
    machine,
    run_in_work_dir,
    upload,
)

REDIS_DB = 14
SEEDS: dict[Mode, int] = {"full": 1, "adaptive": 2}
PY_SPY = Path(sys.executable).parent / "py-spy"
PROFILE_RATE = 250
"""Samples per second py-spy takes of the worker."""
TOP_FRAMES = 30
UNIT_OF_WORK = "work_once (workers/jobs.py"
FRAME_LINE = re.compile(r":\d+\)$")


@dataclass
class Frame:
    function: str
    self_share: float
    """Share of the worker's busy time spent in the function itself."""
    total_share: float
    """Share of them with the function on the stack."""


@dataclass
class Run:
    mode: str
    examples: int
    load_before: float
    load_after: float
    generations: int
    """Completions the engine produced for the job (none came from the cache)."""
    cached_generations: int
    plan_s: float
    job_s: float
    """From the job's start to its success: its chunks, then the finalize step."""
    generations_per_s: float
    examples_per_s: float
    busy_s: float
    """The worker's units of work, timed inside it (the job's planning included)."""
    busy_generations_per_s: float
    busy_examples_per_s: float
    scoring_s: float
    """Of the busy time, the scoring rules (`AnswerKey.any_match`, `judge`)."""
    generations_per_s_without_scoring: float
    """Generations / (busy - scoring): the pace of everything but the scoring rules."""
    busy_cpu_s: float
    """CPU seconds of the worker's thread in its units of work."""
    scoring_cpu_s: float
    generations_per_cpu_s_without_scoring: float
    """Generations / (busy CPU - scoring CPU): as above, counting only the CPU the worker's
    thread got (the database's work is not in it); less swayed by the machine's load."""
    engine_s: float
    """The instant engine's own seconds, summed over the chunks (`chunk.engine_seconds`)."""
    worker_cpu_s: float
    """CPU seconds the worker process used from the job's submission to its success."""
    chunks: int
    chunk_attempts: int
    engine_calls: int
    categories: dict[str, int]
    worker_vm_hwm_mb: float
    verdict_bytes_per_example: float
    """The growth of the `verdict` table (with its indexes and TOAST), by example."""
    generation_bytes_per_example: float
    """The growth of the generation cache, by example."""
    profile: list[Frame] = field(default_factory=list)


@dataclass
class Result:
    examples: int
    config: dict[str, Any]
    chunk_size: int
    upload_s: float
    runs: list[Run]
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def load() -> float:
    return os.getloadavg()[0]


def expected_categories(examples: int) -> dict[str, int]:
    """What the instant student makes of the dataset: even numbers known, odd ones not."""
    return {"HighlyKnown": (examples + 1) // 2, "Unknown": examples // 2}


def check_report(client: httpx.Client, job_id: str, examples: int) -> dict[str, int]:
    response = client.get(f"/v1/jobs/{job_id}/report")
    if response.status_code != 200:
        raise RuntimeError(f"report answered {response.status_code}: {response.text[:2000]}")
    categories = {k: v for k, v in response.json()["categories"].items() if v}
    if categories != expected_categories(examples):
        raise RuntimeError(f"job {job_id}: categories {categories}")
    return categories


def engine_seconds(database_url: str, job_id: str) -> float:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT sum(engine_seconds) FROM chunk WHERE job_id = %s", (job_id,)
        ).fetchone()
    assert row is not None
    return float(row[0])


def start_profiler(pid: int, path: Path, on_cpu: bool) -> subprocess.Popen[bytes]:
    """py-spy sampling the worker's threads, waiting ones too (for the database, for a core)
    unless `on_cpu`, stacks by function, as collapsed stacks."""
    command = [str(PY_SPY), "record", "--pid", str(pid), "--rate", str(PROFILE_RATE)]
    command += [] if on_cpu else ["--idle"]
    command += ["--function", "--format", "raw", "--output", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)  # py-spy writes its file and exits
    profiler.wait(timeout=60)


def top_frames(path: Path, count: int) -> list[Frame]:
    """The functions most often on the stack while the worker did a unit of work (shares of its
    wall time), from py-spy's collapsed stacks (`frame;frame;... samples` a line; a frame is
    `function (file:line)`)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [FRAME_LINE.sub(")", frame) for frame in stack.split(";")]
        busy = next((i for i, f in enumerate(frames) if f.startswith(UNIT_OF_WORK)), None)
        if busy is None:
            continue  # Celery waiting for a task, the sweeper, the lease thread
        frames = frames[busy:]
        samples += int(n)
        own[frames[-1]] += int(n)
        for frame in set(frames):
            total[frame] += int(n)
    return [
        Frame(function, own[function] / samples, on_stack / samples)
        for function, on_stack in total.most_common(count)
    ]


def run_mode(
    client: httpx.Client,
    database_url: str,
    broker_url: str,
    dataset_id: str,
    examples: int,
    mode: Mode,
    work_dir: Path,
    profile_dir: Path | None,
    on_cpu: bool,
    timeout: float,
) -> Run:
    """One job in a worker of its own, from submission to success."""
    timings_path = work_dir / f"timings-{mode}.json"
    with ExitStack() as stack:
        worker = stack.enter_context(
            worker_process(
                database_url,
                broker_url,
                work_dir / f"worker-{mode}.log",
                {TIMINGS_ENV: str(timings_path)},
            )
        )
        sampler = stack.enter_context(MemorySampler(worker.pid))
        profiler = None
        if profile_dir is not None:
            profiler = start_profiler(worker.pid, profile_dir / f"{mode}.txt", on_cpu)
        sizes_before = table_sizes(database_url)
        load_before = load()
        cpu_before = sampler.process.cpu_times()
        config = AuditConfig(mode=mode, seed=SEEDS[mode])
        job_id = submit(client, dataset_id, config)
        follow(client, database_url, job_id, worker, sampler, timeout)
        cpu_after = sampler.process.cpu_times()
        load_after = load()
        if profiler is not None:
            stop_profiler(profiler)
        worker_vm_hwm = sampler.vm_hwm()
    # The worker has stopped: its timings are final.
    timings = WorkerTimings(**json.loads(timings_path.read_text()))
    steps = timeline(database_url, job_id)
    categories = check_report(client, job_id, examples)
    sizes = table_sizes(database_url)
    growth = {table: (sizes[table] - sizes_before[table]) / examples for table in sizes}
    job_s = steps.run_s + steps.finalize_s
    profile = []
    if profile_dir is not None:
        profile = top_frames(profile_dir / f"{mode}.txt", TOP_FRAMES)
    return Run(
        mode=mode,
        examples=examples,
        load_before=load_before,
        load_after=load_after,
        generations=steps.generations,
        cached_generations=steps.cached_generations,
        plan_s=steps.plan_s,
        job_s=job_s,
        generations_per_s=steps.generations / job_s,
        examples_per_s=examples / job_s,
        busy_s=timings.busy_s,
        busy_generations_per_s=steps.generations / timings.busy_s,
        busy_examples_per_s=examples / timings.busy_s,
        scoring_s=timings.scoring_s,
        generations_per_s_without_scoring=steps.generations / (timings.busy_s - timings.scoring_s),
        busy_cpu_s=timings.busy_cpu_s,
        scoring_cpu_s=timings.scoring_cpu_s,
        generations_per_cpu_s_without_scoring=steps.generations
        / (timings.busy_cpu_s - timings.scoring_cpu_s),
        engine_s=engine_seconds(database_url, job_id),
        worker_cpu_s=(cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
        chunks=steps.chunks,
        chunk_attempts=steps.chunk_attempts,
        engine_calls=steps.engine_calls,
        categories=categories,
        worker_vm_hwm_mb=worker_vm_hwm / MB,
        verdict_bytes_per_example=growth["verdict"],
        generation_bytes_per_example=growth["generation"],
        profile=profile,
    )


def run(
    examples: int,
    modes: list[Mode],
    work_dir: Path,
    profile_dir: Path | None,
    on_cpu: bool,
    keep: bool,
    timeout: float,
) -> Result:
    dataset_path = work_dir / f"numbers-{examples}.jsonl"
    build_dataset(dataset_path, examples)
    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir, REDIS_DB))
        print(f"database: {database_source}; broker: {broker_source}", file=sys.stderr)
        _, base_url = stack.enter_context(
            api_process(database_url, broker_url, work_dir / "api.log")
        )
        headers = {"Authorization": f"Bearer {api_key(database_url)}"}
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=None, headers=headers))
        dataset_id, upload_s = upload(client, dataset_path, examples)
        print(f"upload: {examples:,} examples in {upload_s:.1f} s", file=sys.stderr)
        runs = []
        for mode in modes:
            runs.append(
                run_mode(
                    client,
                    database_url,
                    broker_url,
                    dataset_id,
                    examples,
                    mode,
                    work_dir,
                    profile_dir,
                    on_cpu,
                    timeout,
                )
            )
            print(
                f"{mode}: {runs[-1].generations_per_s:,.0f} generations/s ({runs[-1].job_s:.1f} s)",
                file=sys.stderr,
            )
        return Result(
            examples=examples,
            config=AuditConfig().model_dump(
                mode="json", include={"n_exemplar_sets", "shots", "samples"}
            ),
            chunk_size=Settings().chunk_size,
            upload_s=upload_s,
            runs=runs,
            database=database_source,
            broker=broker_source,
            machine=machine(database_url),
        )


def table(result: Result) -> str:
    lines = [
        f"{result.examples:,} examples, chunks of {result.chunk_size}, config "
        f"{json.dumps(result.config)}; one worker",
        "",
        f"{'mode':<9} {'load':>9} {'generations':>12} {'job s':>7} {'gen/s':>9} {'ex/s':>7} "
        f"{'busy s':>7} {'gen/s busy':>10} {'scoring s':>9} {'gen/s -scoring':>14} "
        f"{'busy cpu s':>10} {'scoring cpu s':>13} {'gen/cpu s -scoring':>18} "
        f"{'engine s':>14} {'cpu s':>6} {'verdict B/ex':>12} {'cache B/ex':>10}",
    ]
    for r in result.runs:
        lines.append(
            f"{r.mode:<9} {r.load_before:>4.1f}-{r.load_after:<4.1f} {r.generations:>12,} "
            f"{r.job_s:>7.1f} {r.generations_per_s:>9,.0f} {r.examples_per_s:>7,.0f} "
            f"{r.busy_s:>7.1f} {r.busy_generations_per_s:>10,.0f} {r.scoring_s:>9.1f} "
            f"{r.generations_per_s_without_scoring:>14,.0f} {r.busy_cpu_s:>10.1f} "
            f"{r.scoring_cpu_s:>13.1f} {r.generations_per_cpu_s_without_scoring:>18,.0f} "
            f"{r.engine_s:>14.1f} {r.worker_cpu_s:>6.1f} "
            f"{r.verdict_bytes_per_example:>12,.0f} {r.generation_bytes_per_example:>10,.0f}"
        )
    for r in result.runs:
        if r.profile:
            lines += ["", f"profile of the {r.mode} job (share of samples: own, on the stack)"]
            lines += [
                f"  {f.self_share:>6.1%} {f.total_share:>6.1%}  {f.function}" for f in r.profile
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=30_000, help="records in the dataset")
    parser.add_argument(
        "--modes", nargs="+", choices=("full", "adaptive"), default=["full", "adaptive"]
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="sample the worker with py-spy, files in DIR"
    )
    parser.add_argument(
        "--on-cpu",
        action="store_true",
        help="with --profile: only samples of the worker running, not waiting",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds a job may take (default 1800)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (files, logs) and the database"
    )
    args = parser.parse_args(argv)
    if args.examples < 2:
        parser.error("--examples must be at least 2")
    if args.profile is not None:
        if not PY_SPY.exists():
            parser.error(f"--profile needs py-spy ({PY_SPY}): pip install py-spy")
        args.profile.mkdir(parents=True, exist_ok=True)
    return run_in_work_dir(
        lambda work_dir: run(
            args.examples,
            args.modes,
            work_dir,
            args.profile,
            args.on_cpu,
            args.keep,
            args.timeout,
        ),
        table,
        args.keep,
        ["api.log", *(f"worker-{mode}.log" for mode in args.modes)],
    )


if __name__ == "__main__":
    sys.exit(main())
