"""The task queue as the API sees it: Celery over Redis, tasks addressed by name.

The database says what work there is; a `jobs.work` message only wakes a worker to claim some.
The API sends one after its transaction commits, and a lost one costs nothing: the workers'
sweeper tops the queue up to the work waiting (see `workers.jobs.sweep`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol

import redis
from celery import Celery
from kombu import Queue as BrokerQueue
from kombu.exceptions import OperationalError

from app.settings import get_settings

WORK = "jobs.work"
SEND_WEBHOOK = "jobs.send_webhook"

WORK_QUEUE = "celery"
"""Holds only work hints, so its length is the hints waiting."""
WEBHOOK_QUEUE = "webhooks"


def make_celery(broker_url: str) -> Celery:
    celery = Celery("kma", broker=broker_url)
    celery.conf.update(
        # A hint is acknowledged as it is taken: the work it points to is claimed in the
        # database, so a worker that dies needs no redelivery from the broker.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        task_queues=[BrokerQueue(WORK_QUEUE), BrokerQueue(WEBHOOK_QUEUE)],
        task_routes={SEND_WEBHOOK: {"queue": WEBHOOK_QUEUE}},
        task_default_queue=WORK_QUEUE,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a worker waits out a broker restart
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    return celery


class QueueUnavailable(RuntimeError):
    """The broker could not take the task."""


class Queue(Protocol):
    def send(self, task: str, *args: Any) -> None: ...

    def depth(self) -> int | None:
        """Work hints waiting in the broker; None when it cannot be asked."""
        ...


def redis_url(broker_url: str) -> str:
    """The broker URL as Redis clients take it (Celery's `redis+socket://` is `unix://`)."""
    return broker_url.replace("redis+socket://", "unix://")


def redis_client(broker_url: str) -> redis.Redis:
    """A Redis client for the broker URL."""
    return redis.Redis.from_url(redis_url(broker_url), socket_timeout=2, socket_connect_timeout=2)


class CeleryQueue:
    def __init__(self, celery: Celery, broker_url: str) -> None:
        self.celery = celery
        self.redis = redis_client(broker_url)

    def send(self, task: str, *args: Any) -> None:
        try:
            self.celery.send_task(
                task, args=args, retry_policy={"max_retries": 1, "interval_start": 0.2}
            )
        except (OperationalError, redis.RedisError) as exc:
            raise QueueUnavailable(str(exc)) from exc

    def depth(self) -> int | None:
        try:
            return int(self.redis.llen(WORK_QUEUE))
        except redis.RedisError:
            return None


@lru_cache
def get_queue() -> Queue:
    broker_url = get_settings().broker_url
    if not broker_url:
        raise RuntimeError("KMA_BROKER_URL is not set (kma serve sets it for the embedded one)")
    return CeleryQueue(make_celery(broker_url), broker_url)
