"""Celery tasks and the worker's life: thin wrappers over the steps in `workers.jobs`.

Run a worker with `kma worker` (one process per GPU, solo pool). Besides its tasks, each worker
runs the sweeper in a thread of its own, and writes each chunk's verdicts from a writer thread
while its next task generates (`jobs.Writes`).
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import httpx
from celery.signals import worker_ready, worker_shutdown

from app.db import get_sessionmaker
from app.jobs import service as jobs_service
from app.logs import job_logging
from app.queue import SEND_WEBHOOK, WORK, get_queue, make_celery
from app.settings import get_settings
from app.students.schemas import Student
from app.webhooks import IPNetwork, WebhookRefused, WebhookUnresolved, check_url, pinned_request
from workers import jobs
from workers.engines import load_student
from workers.engines.base import Engine

log = logging.getLogger(__name__)

celery = make_celery(get_settings().broker_url or "redis://")

_loaded: dict[tuple[str, str], Engine] = {}


def engine_for(student: dict[str, Any]) -> Engine:
    """The job's student as this worker's registry declares it, loaded once per worker process;
    one model held at a time. The job names the student; the registry says what that loads."""
    wanted = Student.model_validate(student)
    registered = get_settings().students.get(wanted.name)
    if registered is None:
        raise jobs.PermanentError(f"the student {wanted.name!r} is not registered on the worker")
    if not registered.loads(wanted):
        raise jobs.PermanentError(
            f"the student {wanted.name!r} is registered on the worker with another engine, "
            "model or revision than when the job was submitted"
        )
    key = (wanted.name, registered.model_dump_json())
    if key not in _loaded:
        close_engines()
        log.info("loading student %s (%s on engine %s)", wanted.name, wanted.model, wanted.engine)
        _loaded[key] = load_student(registered)
    return _loaded[key]


model_id_for = jobs.student_model_id
"""What `engine_for`'s engines are cached under; replaced along with it (bench/instant_worker)."""


def close_engines() -> None:
    for engine in _loaded.values():
        engine.close()
    _loaded.clear()


@lru_cache
def this_worker() -> jobs.Worker:
    """This process as a worker: its name is what its leases are held under."""
    return jobs.Worker(
        name=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        sessions=get_sessionmaker(),
        engine_for=engine_for,
        model_id_for=model_id_for,
        queue=get_queue(),
        settings=get_settings(),
        # The engine generates the next chunk while the last one's verdicts are written.
        writes=jobs.Writes(pipelined=True),
    )


_stop_sweeping = threading.Event()
_working = threading.Lock()
"""Held while this worker does a unit of work, from a task or from the sweeper's thread."""
_last_task_at = time.monotonic()


def sweep_forever() -> None:
    """Sweep, and work without the broker when it has sent this worker nothing for a while.

    A Celery consumer can stay stalled after its broker restarts; the database still says what
    is to be done, so a worker whose tasks stopped coming claims work itself.
    """
    interval = get_settings().sweep_seconds
    while not _stop_sweeping.wait(interval):
        try:
            jobs.sweep(this_worker())
            if not tasks_stopped(interval) or not _working.acquire(blocking=False):
                continue
            try:  # until a task comes again, or no work is left
                while tasks_stopped(interval) and jobs.work_once(this_worker()):
                    log.info("did a unit of work the broker did not hand out")
            finally:
                _working.release()
        except Exception as exc:  # the database or broker is away: the next round tries again
            log.warning("sweep failed: %s", exc)


def tasks_stopped(interval: float) -> bool:
    return not _stop_sweeping.is_set() and time.monotonic() - _last_task_at > 2 * interval


GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's: a young collection every 10,000 new objects instead of Python's 700. A
chunk makes and drops a few hundred thousand lists (answers, tallies, requests); at the default
the collections took half of the worker's CPU time besides the model."""


@worker_ready.connect
def start_sweeper(**_: Any) -> None:
    # What start-up loaded stays for the worker's life: no collection need look at it again.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    this_worker()  # named before the sweeper thread and the tasks use it
    threading.Thread(target=sweep_forever, name="sweeper", daemon=True).start()


@worker_shutdown.connect
def shut_down(**_: Any) -> None:
    _stop_sweeping.set()
    # The chunk being written is still this worker's: its leases go back once it is done.
    if not this_worker().writes.drain(timeout=get_settings().lease_seconds):
        log.warning("a chunk write outlasted the shutdown's wait; its lease expires")
    try:
        jobs.release_leases(this_worker())
    except Exception as exc:
        log.warning("could not release this worker's leases (%s); they expire", exc)
    close_engines()


@celery.task(name=WORK)
def work() -> None:
    """Claim one unit of work (a job to plan or a chunk to run) and do it."""
    global _last_task_at
    _last_task_at = time.monotonic()
    with _working:
        jobs.work_once(this_worker())


@celery.task(name=SEND_WEBHOOK, bind=True)
def send_webhook(task: Any, job_id: str) -> None:
    """POST the job's JSON to its webhook, signed; retried with doubling waits.

    A URL that now resolves to an address webhooks may not reach is not called, nor retried.
    """
    settings = get_settings()
    with job_logging(job_id):
        with get_sessionmaker()() as session:
            webhook = jobs_service.webhook_of(session, uuid.UUID(job_id))
        if webhook is None:
            return
        try:
            deliver_webhook(
                webhook.url, webhook.body, webhook.secret, settings.webhook_allow_networks
            )
            log.info("webhook delivered to %s", webhook.url)
        except (httpx.HTTPError, WebhookUnresolved) as exc:
            attempt = task.request.retries + 1
            if attempt >= settings.webhook_attempts:
                log.error("webhook gave up after %s attempts: %s", attempt, exc)
                return
            wait = min(settings.webhook_backoff_seconds * 2**task.request.retries, 300)
            log.warning("webhook attempt %s failed (%s); again in %.1f s", attempt, exc, wait)
            raise task.retry(countdown=wait, max_retries=settings.webhook_attempts) from exc
        except WebhookRefused as exc:
            log.error("webhook not sent: %s %s", webhook.url, exc)


def deliver_webhook(
    url: str,
    body: bytes,
    secret: str,
    allow_networks: Sequence[IPNetwork] = (),
    transport: httpx.BaseTransport | None = None,
) -> None:
    """POST once, to the address the URL's host resolves to now, if that one is allowed.

    Checked again here because a name's addresses can change after submission (DNS rebinding);
    the request goes to the address checked, not to a second lookup. A redirect is not followed:
    it fails the delivery like any answer other than 2xx.
    """
    checked, addresses = check_url(url, allow_networks)
    request = pinned_request(checked, addresses[0], body, secret)
    with httpx.Client(transport=transport, timeout=10, follow_redirects=False) as client:
        client.send(request).raise_for_status()
