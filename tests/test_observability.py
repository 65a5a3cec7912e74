"""`/metrics` on a real database and broker, and the JSON log lines."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from app.logs import JsonFormatter, job_logging
from app.models import Chunk, ChunkStatus, Dataset, Job, JobStatus
from app.settings import Settings, get_settings
from tests.conftest import bearer, new_workspace


@pytest.fixture
def client(api: FastAPI, api_key: str, broker_url: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_settings] = lambda: Settings(broker_url=broker_url)
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics(client: TestClient, session: Session) -> None:
    before = samples(client.get("/metrics").text)
    workspace_id = new_workspace(session)
    dataset = Dataset(workspace_id=workspace_id, name="d", format="qa", num_examples=3)
    session.add(dataset)
    session.flush()
    job = Job(
        workspace_id=workspace_id,
        dataset_id=dataset.id,
        student={"name": "m", "engine": "hf", "model": "m"},
        config={},
        total=3,
    )
    job.status = JobStatus.RUNNING
    session.add(job)
    session.flush()
    session.add(
        Chunk(
            job_id=job.id, index=0, start=0, stop=3, status=ChunkStatus.DONE,
            generations=30, cached_generations=4, engine_calls=2, engine_seconds=1.5,
        )
    )  # fmt: skip
    session.commit()

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def grew(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[(name, labels)] - before[(name, labels)]

    assert grew("kma_jobs", (("status", "running"),)) == 1
    assert grew("kma_jobs", (("status", "queued"),)) == 0
    assert grew("kma_generations_total", (("source", "engine"),)) == 30
    assert grew("kma_generations_total", (("source", "cache"),)) == 4
    assert grew("kma_engine_calls_total") == 2
    assert grew("kma_engine_seconds_total") == 1.5
    assert after[("kma_queue_depth", ())] >= 0
    assert ("kma_examples_audited_total", ()) in after


def test_log_lines_are_json_with_the_job_id() -> None:
    formatter = JsonFormatter()
    logger = logging.getLogger("kma.test")
    job_id = str(uuid.uuid4())

    def line(message: str) -> dict[str, str]:
        record = logger.makeRecord("kma.test", logging.INFO, __file__, 1, message, (), None)
        return dict(json.loads(formatter.format(record)))

    with job_logging(job_id):
        tagged = line("chunk 3 done")
    untagged = line("started")
    assert tagged["job_id"] == job_id
    assert tagged["message"] == "chunk 3 done"
    assert tagged["level"] == "info"
    assert "job_id" not in untagged


def test_requests_about_a_job_log_with_its_id(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = str(uuid.uuid4())
    logging.getLogger("app.test").info("outside")
    with caplog.at_level(logging.INFO):
        assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    lines = [JsonFormatter().format(r) for r in caplog.records]
    assert any(json.loads(line).get("job_id") == job_id for line in lines), lines
