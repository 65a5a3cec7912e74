"""`GET /metrics` in Prometheus format, read from the database and the broker at each scrape.

Workers write their counts (verdicts, generations, engine time) to PostgreSQL, so the API can
report for every worker without a metrics store of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.deps import SessionDep, SettingsDep
from app.models import Chunk, Job, JobStatus, Verdict
from app.queue import WORK_QUEUE, redis_client

router = APIRouter(tags=["health"])


class KmaCollector(Collector):
    def __init__(self, session: Session, broker_url: str | None) -> None:
        self.session = session
        self.broker_url = broker_url

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("kma_jobs", "Jobs by status.", labels=["status"])
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status))
        by_status = {status: count for status, count in rows}
        for status in JobStatus:
            jobs.add_metric([status.value], by_status.get(status, 0))
        yield jobs

        audited = self.session.scalar(select(func.count()).select_from(Verdict)) or 0
        yield CounterMetricFamily("kma_examples_audited", "Verdicts written.", value=audited)

        new, cached, calls, seconds = self.session.execute(
            select(
                func.coalesce(func.sum(Chunk.generations), 0),
                func.coalesce(func.sum(Chunk.cached_generations), 0),
                func.coalesce(func.sum(Chunk.engine_calls), 0),
                func.coalesce(func.sum(Chunk.engine_seconds), 0.0),
            )
        ).one()
        generations = CounterMetricFamily(
            "kma_generations", "Student completions, by source.", labels=["source"]
        )
        generations.add_metric(["engine"], new)
        generations.add_metric(["cache"], cached)
        yield generations
        yield CounterMetricFamily(
            "kma_engine_calls", "Batched engine calls of finished chunks.", value=calls
        )
        yield CounterMetricFamily(
            "kma_engine_seconds", "Seconds spent in engine calls.", value=seconds
        )

        depth = GaugeMetricFamily("kma_queue_depth", "Work hints waiting in the broker.")
        depth.add_metric([], self.queue_depth())
        yield depth

    def queue_depth(self) -> float:
        if not self.broker_url:
            return float("nan")
        try:
            return float(redis_client(self.broker_url).llen(WORK_QUEUE))
        except redis.RedisError:
            return float("nan")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Jobs by status, examples audited, generations, engine time, queue depth."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KmaCollector(session, settings.broker_url))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
