"""The task queue as the API sees it: Celery over Redis, tasks addressed by name.

The API enqueues only after its transaction commits, so a worker never finds a job that is not
there yet. `workers/` registers the tasks on the same app.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

from celery import Celery
from kombu.exceptions import OperationalError

from app.settings import get_settings

PLAN_JOB = "jobs.plan"
RUN_CHUNK = "jobs.run_chunk"
SEND_WEBHOOK = "jobs.send_webhook"


def make_celery(broker_url: str) -> Celery:
    celery = Celery("kma", broker=broker_url)
    celery.conf.update(
        # A task is acknowledged when it ends, and handed out again if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": get_settings().task_visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return celery


class QueueUnavailable(RuntimeError):
    """The broker could not take the task."""


class Queue(Protocol):
    def send(self, task: str, *args: Any) -> None: ...


class CeleryQueue:
    def __init__(self, celery: Celery) -> None:
        self.celery = celery

    def send(self, task: str, *args: Any) -> None:
        try:
            self.celery.send_task(task, args=args, retry_policy={"max_retries": 2})
        except OperationalError as exc:
            raise QueueUnavailable(str(exc)) from exc


@lru_cache
def get_queue() -> Queue:
    broker_url = get_settings().broker_url
    if not broker_url:
        raise RuntimeError("KMA_BROKER_URL is not set (kma serve sets it for the embedded one)")
    return CeleryQueue(make_celery(broker_url))
