"""The `kma` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.audit.schemas import AuditConfig, Category, Report, Student
from app.datasets.domain import AUTO, RECORD_FORMATS, DatasetError
from app.logs import configure_logging
from app.settings import Settings, get_settings
from workers.client_commands import add_client_commands, follow

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as a dict; values are read as JSON when they parse, else as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def format_validation_error(exc: ValidationError) -> str:
    return "\n  ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )


def cmd_audit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.engines import load_engine, resolve_engine_name
    from workers.local_audit import OUTPUT_FILES, audit_file, read_dataset

    try:
        config = AuditConfig(**parse_options(args.config))
    except ValueError as exc:  # ValidationError is a ValueError
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        print(f"kma audit: invalid --config:\n  {message}", file=sys.stderr)
        return EXIT_USAGE
    try:
        records = read_dataset(Path(args.file), args.format)
    except OSError as exc:
        print(f"kma audit: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except DatasetError as exc:
        print(f"kma audit: {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    engine_name = resolve_engine_name(args.engine)
    try:
        student = Student.model_validate(
            {
                "model": args.student,
                "engine": engine_name,
                "revision": args.revision,
                "base_url": args.base_url,
            }
        )
    except ValidationError as exc:
        print(f"kma audit: invalid student:\n  {format_validation_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    print(f"loading {args.student} on the {engine_name} engine", file=sys.stderr)
    try:
        engine = load_engine(
            engine_name,
            args.student,
            revision=args.revision,
            **({"base_url": args.base_url} if args.base_url else {}),
        )
    except ValueError as exc:  # a base URL missing for openai, or given to another engine
        print(f"kma audit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with tqdm(total=len(records), unit="ex", desc="auditing", file=sys.stderr) as bar:
            report = audit_file(
                records,
                engine,
                config,
                Path(args.out),
                student=student,
                chunk_size=args.chunk_size,
                on_progress=bar.update,
            )
    finally:
        engine.close()
    print(format_categories(report), file=sys.stderr)
    print(f"wrote {', '.join(OUTPUT_FILES)} into {args.out}", file=sys.stderr)
    return EXIT_OK


def format_categories(report: Report) -> str:
    total = report.num_examples or 1
    rows = [f"{'category':<12} {'examples':>9} {'share':>7}"]
    for category in Category:
        count = report.categories.get(category, 0)
        rows.append(f"{category.value:<12} {count:>9} {count / total:>7.1%}")
    rows.append(f"{'flagged':<12} {report.flagged:>9} {report.flagged / total:>7.1%}")
    rows.append(f"conflicts (student consistent, teacher different): {report.conflicts}")
    rows.append(
        f"generations: {report.generations} new, {report.generations_cached} from the cache"
    )
    if report.partial:
        rows.append(f"partial: {report.num_examples} of {report.total} examples audited")
    return "\n".join(rows)


@contextmanager
def services(settings: Settings) -> Iterator[tuple[str, str]]:
    """The configured PostgreSQL and Redis, or embedded ones under the data folder."""
    if settings.database_url and settings.broker_url:
        yield settings.database_url, settings.broker_url
        return
    from app.embedded import embedded_services

    with embedded_services(settings.data_dir) as (database_url, broker_url):
        yield settings.database_url or database_url, settings.broker_url or broker_url


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db import migrate

    settings = get_settings()
    with services(settings) as (database_url, broker_url):
        os.environ.update(KMA_DATABASE_URL=database_url, KMA_BROKER_URL=broker_url)
        get_settings.cache_clear()
        migrate(database_url)
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "worker"], preexec_fn=die_with_parent
        )
        # uvicorn ends by raising the signal that stopped it again; for SIGTERM that would kill
        # this process before the cleanup below, leaving the worker and the embedded servers.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        try:
            uvicorn.run("app.main:app", host=args.host, port=args.port, log_config=None)
        finally:
            stop_process(worker)
    return EXIT_OK


def die_with_parent() -> None:
    """In a child process: have Linux end it if its parent dies, even by SIGKILL."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6").prctl(pr_set_pdeathsig, signal.SIGTERM)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(
        "app.main:app", host=args.host, port=args.port, workers=args.workers, log_config=None
    )
    return EXIT_OK


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.tasks import celery

    celery.worker_main(
        ["worker", "--pool=solo", "--concurrency=1", f"--loglevel={args.loglevel}"]
        + (["--hostname", args.hostname] if args.hostname else [])
    )
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from app.db import migrate

    url = get_settings().database_url
    if not url:
        print("kma migrate: set KMA_DATABASE_URL", file=sys.stderr)
        return EXIT_USAGE
    migrate(url)
    return EXIT_OK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_ready(probe_url: str, server: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll `probe_url` until it answers 200, failing early if the server process exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{probe_url} did not answer 200 within {timeout:.0f} s")


def stop_process(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny student, start the embedded service, audit a demo dataset over HTTP."""
    from app.client import Client
    from workers.tiny_student import ensure_student, write_dataset

    settings = get_settings()
    demo_dir = settings.data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    print("1/4 the student: a tiny model that knows some invented facts", file=sys.stderr)
    student = ensure_student(settings.data_dir / "models" / "tiny-student-v1")
    dataset_path = demo_dir / "teacher.jsonl"
    write_dataset(dataset_path, n_trained=60, n_unseen=40)

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = demo_dir / "serve.log"
    print(f"2/4 starting kma serve on {url} (log: {log_path})", file=sys.stderr)
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Small chunks, so the progress bar moves on a 100-example demo.
            env={**os.environ, "KMA_CHUNK_SIZE": os.environ.get("KMA_CHUNK_SIZE", "10")},
        )
    try:
        wait_until_ready(f"{url}/readyz", server, timeout=180)
        client = Client(url)
        dataset = client.upload_dataset(dataset_path, name="demo teacher dataset")
        print(f"3/4 uploaded {dataset['num_examples']} examples; auditing", file=sys.stderr)
        job = client.create_job(dataset["id"], student={"model": str(student), "engine": "hf"})
        job = follow(client, job, poll_seconds=0.5)
        if job["status"] != "succeeded":
            print(f"the job ended {job['status']}: {job.get('error')}", file=sys.stderr)
            return EXIT_FAILED
        report = client.report(job["id"])
        filtered = demo_dir / "filtered.jsonl"
        client.download(job["id"], filtered)
        print("4/4 done\n", file=sys.stderr)
        print(format_categories(report))
        print(f"\nfiltered dataset: {filtered}")
        print("download it again (with `kma serve` running):")
        print(f"  curl -o filtered.jsonl '{url.rsplit(':', 1)[0]}:8000/v1/jobs/{job['id']}/export'")
        return EXIT_OK
    finally:
        stop_process(server, timeout=60)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kma", description="Knowledge-mismatch audit for distillation datasets."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    audit = commands.add_parser(
        "audit",
        help="audit one dataset locally, no server",
        description="Audit a teacher dataset against a student in this process. Writes "
        "annotated.jsonl, filtered.jsonl, report.json and conflicts.jsonl into --out.",
    )
    audit.add_argument("file", help="teacher dataset, JSONL")
    audit.add_argument(
        "--format",
        choices=[AUTO, *RECORD_FORMATS],
        default=AUTO,
        help="record format (default: auto, the first record's format, expected on every line);"
        " the outputs are written in the same format",
    )
    audit.add_argument("--student", required=True, help="model name or Hugging Face folder")
    audit.add_argument("--revision", help="model revision")
    audit.add_argument("--engine", choices=["auto", "hf", "vllm", "openai"], default="auto")
    audit.add_argument(
        "--base-url",
        help="the OpenAI-compatible server of --engine openai, e.g. http://host:8000/v1"
        " (default: KMA_OPENAI_BASE_URL)",
    )
    audit.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. samples=8 or mode=full (repeatable)",
    )
    audit.add_argument("--out", required=True, help="folder for the three output files")
    audit.add_argument("--chunk-size", type=int, default=512, help="examples per batch")
    audit.set_defaults(run=cmd_audit)

    serve = commands.add_parser(
        "serve",
        help="the API and a worker; embedded PostgreSQL and Redis unless KMA_* name servers",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=cmd_serve)

    api = commands.add_parser("api", help="the API alone (production)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="uvicorn processes")
    api.set_defaults(run=cmd_api)

    worker = commands.add_parser(
        "worker", help="one audit worker (run one per GPU, e.g. with CUDA_VISIBLE_DEVICES)"
    )
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--hostname", help="Celery node name, unique per worker")
    worker.set_defaults(run=cmd_worker)

    migrate = commands.add_parser("migrate", help="bring KMA_DATABASE_URL to the newest schema")
    migrate.set_defaults(run=cmd_migrate)

    demo = commands.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--port", type=int, help="port for the demo server (default: a free one)")
    demo.set_defaults(run=cmd_demo)

    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "api", "worker", "migrate"):
        configure_logging(os.environ.get("KMA_LOG_LEVEL", "INFO"))
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
