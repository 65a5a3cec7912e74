"""`kma serve`, `api`, `worker`, `migrate` and `demo`: running the service."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.settings import Settings, get_settings
from app.students.schemas import RegisteredStudent, Registry, dump_registry
from app.workspaces import service as workspaces
from app.workspaces.domain import KEY_FILE
from kma.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, format_categories
from kma.cli.processes import die_with_parent, free_port, stop_process, wait_until_ready
from kma.cli.remote import follow
from kma.client import Client
from kma.tiny_student import ensure_student, student_dir_in, write_dataset

TINY_STUDENT = "tiny-student"
"""The name `kma serve` registers the tiny student under when the operator declares none."""


@contextmanager
def services(settings: Settings) -> Iterator[tuple[str, str]]:
    """The configured PostgreSQL and Redis, or embedded ones under the data folder."""
    if settings.database_url and settings.broker_url:
        yield settings.database_url, settings.broker_url
        return
    from app.embedded import embedded_services

    with embedded_services(settings.data_dir) as (database_url, broker_url):
        yield settings.database_url or database_url, settings.broker_url or broker_url


def default_students(data_dir: Path) -> Registry:
    """The registry of `kma serve` when the operator declares none: the tiny student, so that
    `kma demo` needs no set-up."""
    return {TINY_STUDENT: RegisteredStudent(engine="hf", model=str(student_dir_in(data_dir)))}


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.db import migrate

    settings = get_settings()
    with services(settings) as (database_url, broker_url):
        os.environ.update(KMA_DATABASE_URL=database_url, KMA_BROKER_URL=broker_url)
        if not settings.students:
            os.environ["KMA_STUDENTS"] = dump_registry(default_students(settings.data_dir))
        get_settings.cache_clear()
        migrate(database_url)
        save_first_key(database_url, settings.data_dir / KEY_FILE)
        worker = subprocess.Popen(
            [sys.executable, "-m", "kma.cli", "worker"], preexec_fn=die_with_parent
        )
        # uvicorn ends by raising the signal that stopped it again; for SIGTERM that would kill
        # this process before the cleanup below, leaving the worker and the embedded servers.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        try:
            uvicorn.run("app.main:app", host=args.host, port=args.port, log_config=None)
        finally:
            stop_process(worker)
    return EXIT_OK


def save_first_key(database_url: str, path: Path) -> None:
    """On the very first start, make a key for the default workspace and keep it in `path`
    (readable by this user alone), where the local commands find it."""
    from app.db import make_engine

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            key = workspaces.first_key(session)
            if key is None:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(key + "\n")
            session.commit()
    finally:
        engine.dispose()
    print(f"created the first API key; it is in {path}", file=sys.stderr)


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    get_settings()  # a bad setting (the student registry's, say) stops it here, not per request
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the tiny student, start the embedded service, audit a demo dataset over HTTP."""
    settings = get_settings()
    demo_dir = settings.data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    print("1/4 the student: a tiny model that knows some invented facts", file=sys.stderr)
    ensure_student(student_dir_in(settings.data_dir))
    dataset_path = demo_dir / "teacher.jsonl"
    write_dataset(dataset_path, n_trained=60, n_unseen=40)

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = demo_dir / "serve.log"
    print(f"2/4 starting kma serve on {url} (log: {log_path})", file=sys.stderr)
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "kma.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={
                **{k: v for k, v in os.environ.items() if k != "KMA_STUDENTS_FILE"},
                # Small chunks, so the progress bar moves on a 100-example demo.
                "KMA_CHUNK_SIZE": os.environ.get("KMA_CHUNK_SIZE", "10"),
                # The tiny student, whatever students this shell declares.
                "KMA_STUDENTS": dump_registry(default_students(settings.data_dir)),
            },
        )
    try:
        wait_until_ready(f"{url}/readyz", server, timeout=180)
        client = Client(url)
        dataset = client.upload_dataset(dataset_path, name="demo teacher dataset")
        print(f"3/4 uploaded {dataset['num_examples']} examples; auditing", file=sys.stderr)
        job = client.create_job(dataset["id"], student=TINY_STUDENT)
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
        key_file = settings.data_dir / KEY_FILE
        print(
            f'  curl -H "Authorization: Bearer $(cat {key_file})" -o filtered.jsonl '
            f"'{url.rsplit(':', 1)[0]}:8000/v1/jobs/{job['id']}/export'"
        )
        return EXIT_OK
    finally:
        stop_process(server, timeout=60)


def add_server_commands(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="the API and a worker; embedded PostgreSQL and Redis unless KMA_* name servers",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=cmd_serve)

    api = commands.add_parser("api", help="the API alone (production)")
    api.add_argument("--host", default="127.0.0.1", help="e.g. 0.0.0.0 to listen on every address")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument(
        "--workers",
        type=int,
        default=1,
        help="uvicorn processes, at most one per core; each has its own database pool",
    )
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
