"""The HTTP API: `create_app()`, served by `uvicorn app.main:app`."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from importlib.metadata import version

import kombu
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.types import ASGIApp, Receive, Scope, Send

from app.datasets.domain import DatasetError
from app.datasets.router import router as datasets_router
from app.deps import SessionDep, SettingsDep
from app.errors import HTTPError
from app.jobs.router import router as jobs_router
from app.logs import job_logging
from app.metrics import router as metrics_router
from app.students.router import router as students_router

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
            {"name": "students", "description": "The student models jobs may name."},
            {"name": "health", "description": "Liveness and readiness probes."},
        ],
    )
    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(DatasetError, invalid_dataset)
    app.include_router(datasets_router, prefix="/v1")
    app.include_router(jobs_router, prefix="/v1")
    app.include_router(students_router, prefix="/v1")
    app.include_router(health)
    app.include_router(metrics_router)
    app.add_middleware(JobLogging)
    return app


JOB_PATH = re.compile(r"^/v1/jobs/([0-9a-fA-F-]{36})")


class JobLogging:
    """Requests about a job log with its id.

    A plain ASGI middleware: Starlette's `BaseHTTPMiddleware` (`app.middleware("http")`) ends a
    streamed body cleanly when the app raises part way, which would make a broken export look
    whole; this one lets the error reach the server, which then aborts the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = JOB_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        with job_logging(match.group(1)):
            await self.app(scope, receive, send)


app = create_app()
