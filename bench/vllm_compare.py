"""Against bare vLLM: the same SliCK work through `vllm.LLM.generate`, `kma audit` and the service.

Usage: .venv/bin/python bench/vllm_compare.py [--examples 80] [--unseen N] [--chunk-size N]
                                              [--service-only] [--keep]

One run, the tiny student on vLLM (on this machine's CPU), a world of invented facts
(`kma.tiny_student.write_dataset`: `--unseen` of the facts unseen, default half, the rest trained):

- **bare**: one `LLM.generate` call over exactly the prompts and sampling parameters kma sends in
  full mode (its own prompt builder and options: a greedy answer and `samples` samples of each of
  the `n_exemplar_sets` prompts per question), on the engine `workers.engines.vllm` loads;
- **kma audit** (`workers.local_audit.audit_file`), full and adaptive, on that same engine;
- **the service**: a real `kma api` and a real `kma worker` (Celery, PostgreSQL, the generation
  cache, leases, the verdict writes, the report) with the student registered on the vllm engine,
  full and adaptive. A warm-up job loads the model in the worker (while this process loads its
  own); its time is left out.

Bare vLLM runs both ways: all in one call, and in two calls (the greedy answers, then the
samples, as kma's runner steps). The runs are interleaved (bare one call, bare two calls, audit
full, service full, audit adaptive, service adaptive, bare two calls, bare one call; the ratios
take the mean of each bare way's two runs) so that a shared machine's changing load
weighs on each path alike; the load average is recorded around each run.

Full-mode runs share one seed (the same prompts), adaptive runs another; vLLM's prefix cache is
emptied before each in-process run, and the service's database is fresh, so no run finds another's
generations. The service's figures are the job's own timestamps (submission to success), and its
engine busy share is the model's seconds (the chunks' `engine_seconds`: the engine's calls, the
generation cache's reads and writes left out) over that wall time.

PostgreSQL and Redis as in bench/overhead.py (KMA_DATABASE_URL / KMA_BROKER_URL, else the
machine's, else embedded). The last line of stdout is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.domain import build_prompts, draw_exemplar_sets  # noqa: E402
from app.audit.schemas import AuditConfig, Mode  # noqa: E402
from app.datasets.domain import Example  # noqa: E402
from app.students.schemas import Student  # noqa: E402
from bench.upload_export import (  # noqa: E402
    READY_TIMEOUT,
    api_key,
    broker,
    database,
    machine,
    run_in_work_dir,
    upload,
)
from kma.cli.processes import free_port, stop_process, wait_until_ready  # noqa: E402
from kma.tiny_student import write_dataset  # noqa: E402
from workers.engines.vllm import VLLMEngine  # noqa: E402
from workers.local_audit import audit_file, read_dataset  # noqa: E402
from workers.runner import greedy_options, sample_options  # noqa: E402

STUDENT_NAME = "tiny"
STUDENT_PATH = REPO / ".cache" / "tiny-student"
REDIS_DB = 11
SEEDS: dict[Mode, int] = {"full": 101, "adaptive": 202}
MODES: tuple[Mode, ...] = ("full", "adaptive")
WARM_UP_SEED = 303
JOB_TIMEOUT = 1800.0
BARE = {1: "bare", 2: "bare 2 calls"}
POLL_SECONDS = 0.5


@dataclass
class Run:
    path: str
    """`bare`, `kma audit` or `service`."""
    mode: Mode
    seconds: float
    generations: int
    load_before: float
    load_after: float
    categories: dict[str, int] = field(default_factory=dict)
    engine_seconds: float | None = None
    """The model's own seconds, where kma measures them (the service's chunks)."""
    busy_share: float | None = None
    """`engine_seconds` over `seconds`."""
    cached_generations: int | None = None
    chunks: int | None = None
    queued_s: float | None = None
    """The service: submission to the job's start (planning included)."""


@dataclass
class Result:
    examples: int
    unseen: int
    config: dict[str, Any]
    runs: list[Run]
    ratios: dict[str, float]
    engine_load_s: dict[str, float]
    database: str
    broker: str
    machine: dict[str, Any] = field(default_factory=dict)


def load() -> float:
    return os.getloadavg()[0]


def the_student() -> Student:
    return Student(name=STUDENT_NAME, engine="vllm", model=str(STUDENT_PATH))


def bare_run(engine: VLLMEngine, examples: list[Example], calls: int) -> Run:
    """Every prompt and option kma sends in full mode, in one `LLM.generate` call, or in two
    (the greedy answers, then the samples), as kma's runner steps."""
    from vllm import SamplingParams

    config = AuditConfig(mode="full", seed=SEEDS["full"])
    prompts = [
        p
        for per in build_prompts(examples, draw_exemplar_sets(examples, config), config)
        for p in per
    ]
    options = [greedy_options(config), sample_options(config, config.samples)]
    params = [
        SamplingParams(
            n=o.n,
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            max_tokens=o.max_tokens,
            stop=list(o.stop),
            min_p=0.0,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
        for o in options
    ]
    batches = [(prompts, [params[0]] * len(prompts)), (prompts, [params[1]] * len(prompts))]
    if calls == 1:
        batches = [(prompts * 2, batches[0][1] + batches[1][1])]
    engine.llm.reset_prefix_cache()
    before = load()
    started = time.perf_counter()
    generations = 0
    for texts, each in batches:
        outputs = engine.llm.generate(texts, each, use_tqdm=False)
        generations += sum(len(out.outputs) for out in outputs)
    seconds = time.perf_counter() - started
    return Run(BARE[calls], "full", seconds, generations, before, load())


def local_run(engine: VLLMEngine, path: Path, mode: Mode, work_dir: Path) -> Run:
    records = read_dataset(path)
    engine.llm.reset_prefix_cache()
    before = load()
    started = time.perf_counter()
    report = audit_file(
        records,
        engine,
        AuditConfig(mode=mode, seed=SEEDS[mode]),
        work_dir / f"audit-{mode}",
        student=the_student(),
    )
    seconds = time.perf_counter() - started
    categories = {str(k): v for k, v in report.categories.items() if v}
    return Run("kma audit", mode, seconds, report.generations, before, load(), categories)


def service_env(database_url: str, broker_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "KMA_DATABASE_URL": database_url,
        "KMA_BROKER_URL": broker_url,
        "KMA_STUDENTS": json.dumps({STUDENT_NAME: {"engine": "vllm", "model": str(STUDENT_PATH)}}),
    }


@contextmanager
def api(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`kma api` with the student registered; yields its base URL."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kma.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(f"{base_url}/readyz", server, READY_TIMEOUT)
        yield base_url
    finally:
        stop_process(server)


@contextmanager
def worker(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`kma worker`, ready for tasks (the model loads with its first job)."""
    command = [sys.executable, "-m", "kma.cli", "worker", "--hostname", "vllm-compare@%h"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while " ready." not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("the worker was not ready in time")
            time.sleep(0.2)
        yield process
    finally:
        stop_process(process, timeout=120)


def submit(client: httpx.Client, dataset_id: str, config: AuditConfig) -> str:
    response = client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset_id,
            "student": STUDENT_NAME,
            "config": config.model_dump(mode="json"),
        },
    )
    if response.status_code != 202:
        raise RuntimeError(f"job submission answered {response.status_code}: {response.text}")
    return str(response.json()["id"])


def wait(client: httpx.Client, process: subprocess.Popen[bytes], job_id: str) -> None:
    """Until the job succeeds; its times are the database's, so a slow poll costs nothing."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "succeeded":
            return
        if job["status"] not in ("queued", "running"):
            raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}")
        time.sleep(POLL_SECONDS)


def service_run(
    client: httpx.Client, database_url: str, job_id: str, mode: Mode, load_before: float
) -> Run:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            """
            SELECT extract(epoch FROM j.finished_at - j.created_at),
                   extract(epoch FROM j.started_at - j.created_at),
                   sum(c.engine_seconds), count(*), sum(c.generations),
                   sum(c.cached_generations)
            FROM job j JOIN chunk c ON c.job_id = j.id WHERE j.id = %s GROUP BY j.id
            """,
            (job_id,),
        ).fetchone()
    assert row is not None
    seconds, queued_s, engine_s = float(row[0]), float(row[1]), float(row[2])
    report = client.get(f"/v1/jobs/{job_id}/report").json()
    categories = {k: v for k, v in report["categories"].items() if v}
    return Run(
        "service",
        mode,
        seconds,
        int(row[4]),
        load_before,
        load(),
        categories,
        engine_seconds=engine_s,
        busy_share=engine_s / seconds,
        cached_generations=int(row[5]),
        chunks=int(row[3]),
        queued_s=queued_s,
    )


def run(
    examples: int,
    unseen: int,
    chunk_size: int | None,
    service_only: bool,
    work_dir: Path,
    keep: bool,
) -> Result:
    dataset = work_dir / "facts.jsonl"
    write_dataset(dataset, n_trained=examples - unseen, n_unseen=unseen)
    warm_up = work_dir / "warm-up.jsonl"
    write_dataset(warm_up, n_trained=2, n_unseen=2, seed=1)
    examples_list = [r.example for r in read_dataset(dataset)]
    runs: list[Run] = []
    loads: dict[str, float] = {}

    with ExitStack() as stack:
        database_url, database_source = stack.enter_context(database(work_dir, keep))
        broker_url, broker_source = stack.enter_context(broker(work_dir, REDIS_DB))
        env = service_env(database_url, broker_url)
        if chunk_size is not None:
            env["KMA_CHUNK_SIZE"] = str(chunk_size)
        base_url = stack.enter_context(api(env, work_dir / "api.log"))
        headers = {"Authorization": f"Bearer {api_key(database_url)}"}
        client = stack.enter_context(httpx.Client(base_url=base_url, timeout=60, headers=headers))
        process = stack.enter_context(worker(env, work_dir / "worker.log"))
        dataset_id, _ = upload(client, dataset, examples)
        warm_up_id, _ = upload(client, warm_up, 4)
        # The worker loads its model with the warm-up job while this process loads its own.
        started = time.perf_counter()
        warm_up_job = submit(client, warm_up_id, AuditConfig(mode="adaptive", seed=WARM_UP_SEED))
        engine = None
        if not service_only:
            engine = VLLMEngine(str(STUDENT_PATH))
            stack.callback(engine.close)
            loads["in process"] = time.perf_counter() - started
        wait(client, process, warm_up_job)
        loads["service worker (warm-up job)"] = time.perf_counter() - started
        print(f"engines loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)

        # Interleaved, so that the machine's changing load weighs on each path alike.
        if engine is not None:
            runs += [bare_run(engine, examples_list, calls) for calls in (1, 2)]
        for mode in MODES:
            if engine is not None:
                runs.append(local_run(engine, dataset, mode, work_dir))
            before = load()
            job_id = submit(client, dataset_id, AuditConfig(mode=mode, seed=SEEDS[mode]))
            wait(client, process, job_id)
            runs.append(service_run(client, database_url, job_id, mode, before))
            print(f"{mode}: {[f'{r.path} {r.seconds:.1f} s' for r in runs]}", file=sys.stderr)
        if engine is not None:
            runs += [bare_run(engine, examples_list, calls) for calls in (2, 1)]
        found = machine(database_url)

    ratios: dict[str, float] = {}
    if engine is not None:
        by = {(r.path, r.mode): r.seconds for r in runs if r.path not in BARE.values()}
        for name in BARE.values():
            bare = statistics.mean(r.seconds for r in runs if r.path == name)
            ratios |= {
                f"{name} / kma audit full": bare / by[("kma audit", "full")],
                f"{name} / service full": bare / by[("service", "full")],
                f"{name} full / kma audit adaptive": bare / by[("kma audit", "adaptive")],
                f"{name} full / service adaptive": bare / by[("service", "adaptive")],
            }
    return Result(
        examples=examples,
        unseen=unseen,
        config=AuditConfig().model_dump(
            mode="json", include={"n_exemplar_sets", "shots", "samples", "max_new_tokens"}
        ),
        runs=runs,
        ratios=ratios,
        engine_load_s=loads,
        database=database_source,
        broker=broker_source,
        machine=found,
    )


def table(result: Result) -> str:
    lines = [
        f"{result.examples} questions ({result.unseen} unseen) of the tiny student on vLLM (CPU)",
        f"{'path':<12} {'mode':<9} {'s':>7} {'gens':>6} {'gen/s':>7} {'busy':>6} {'load':>11}",
    ]
    for r in result.runs:
        busy = f"{r.busy_share:.1%}" if r.busy_share is not None else "-"
        lines.append(
            f"{r.path:<12} {r.mode:<9} {r.seconds:>7.1f} {r.generations:>6} "
            f"{r.generations / r.seconds:>7.0f} {busy:>6} "
            f"{r.load_before:>5.1f}-{r.load_after:<5.1f}"
        )
    lines += [f"{name}: {ratio:.3f}" for name, ratio in result.ratios.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--examples", type=int, default=80)
    parser.add_argument("--unseen", type=int, help="facts the student never saw (default: half)")
    parser.add_argument("--chunk-size", type=int, help="the worker's KMA_CHUNK_SIZE")
    parser.add_argument(
        "--service-only", action="store_true", help="the service's runs alone, no bare vLLM"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir and database")
    args = parser.parse_args(argv)
    return run_in_work_dir(
        lambda work_dir: run(
            args.examples,
            args.examples // 2 if args.unseen is None else args.unseen,
            args.chunk_size,
            args.service_only,
            work_dir,
            args.keep,
        ),
        table,
        args.keep,
        ["api.log", "worker.log"],
    )


if __name__ == "__main__":
    sys.exit(main())
