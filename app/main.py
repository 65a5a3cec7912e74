"""The HTTP API: `create_app()`, served by `uvicorn app.main:app`."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib.metadata import version

import kombu
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.datasets.domain import DatasetError
from app.datasets.router import router as datasets_router
from app.deps import SessionDep, SettingsDep
from app.errors import HTTPError
from app.jobs.router import router as jobs_router
from app.logs import job_logging
from app.metrics import router as metrics_router

DESCRIPTION = """
Audit a teacher-written QA dataset against a student model before distilling into it.

Upload the dataset, submit a job naming the student, poll the job, then download the dataset
with the answers the student does not know relabelled or dropped.
"""

log = logging.getLogger(__name__)

health = APIRouter(tags=["health"])


@health.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@health.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"description": "The database or the broker does not answer."}},
)
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Whether the database and the broker answer; 503 names the one that does not."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    try:
        with kombu.Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    log.info("%s %s answered %s: %s", request.method, request.url.path, exc.status_code, exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def invalid_dataset(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatasetError)
    invalid = len(exc.errors) + exc.more
    detail = {
        "message": f"invalid dataset: {invalid} invalid line(s); nothing was stored",
        "errors": [asdict(error) for error in exc.errors],
        "more_errors": exc.more,
    }
    return JSONResponse({"detail": detail}, status_code=422)


def create_app() -> FastAPI:
    app = FastAPI(
        title="kma",
        summary="Knowledge-mismatch audit for distillation datasets.",
        description=DESCRIPTION,
        version=version("kma"),
        openapi_tags=[
            {"name": "datasets", "description": "Teacher datasets, uploaded as JSONL."},
            {"name": "jobs", "description": "Audits of a dataset against a student model."},
            {"name": "health", "description": "Liveness and readiness probes."},
        ],
    )
    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(DatasetError, invalid_dataset)
    app.include_router(datasets_router, prefix="/v1")
    app.include_router(jobs_router, prefix="/v1")
    app.include_router(health)
    app.include_router(metrics_router)
    app.middleware("http")(tag_job_logs)
    return app


JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-fA-F-]{36})")


async def tag_job_logs(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Requests about a job log with its id."""
    match = JOB_PATH.match(request.url.path)
    if match is None:
        return await call_next(request)
    with job_logging(match.group(1)):
        return await call_next(request)


app = create_app()
