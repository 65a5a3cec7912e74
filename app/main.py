"""The HTTP API: `create_app()`, served by `uvicorn app.main:app`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib.metadata import version
from typing import Any

import anyio
import kombu
import psycopg
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sqlalchemy_errors
from sqlalchemy import text
from starlette.datastructures import Headers
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.comparisons.router import router as comparisons_router
from app.datasets.domain import DatasetError
from app.datasets.router import router as datasets_router
from app.db import DatabaseBusy, close_api_connections
from app.deps import UPLOAD_CALLER, SessionDep, SettingsDep, authorize_early, overridden
from app.errors import UNAVAILABLE, HTTPError
from app.estimates.router import router as estimates_router
from app.jobs.router import router as jobs_router
from app.logs import job_logging
from app.metrics import router as metrics_router
from app.ratelimit import close_async_rate_limiters
from app.reviews.router import router as reviews_router
from app.settings import get_settings
from app.students.router import router as students_router
from app.workspaces.router import router as workspace_router

DESCRIPTION = """
Audit a teacher-written QA dataset against a student model before distilling into it.

Upload the dataset, submit a job naming the student, poll the job, then download the dataset
with the answers the student does not know relabelled or dropped.
"""

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
"""What a 503 for a busy or unreachable database asks the client to wait."""

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
        log.warning("readiness: the database does not answer: %s", exc)
        checks["database"] = "unavailable"
    try:
        with kombu.Connection(settings.broker_url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:
        log.warning("readiness: the broker does not answer: %s", exc)
        checks["broker"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPError)
    log.info("%s %s answered %s: %s", request.method, request.url.path, exc.status_code, exc.detail)
    return JSONResponse(exc.content(), status_code=exc.status_code, headers=exc.headers)


class EscapedJSONResponse(JSONResponse):
    """JSON with every character beyond ASCII escaped: a lone surrogate echoed from a request
    cannot be written as UTF-8, and would turn the answer into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's validation error without the `input` it echoes, which may be a NaN (not JSON),
    a lone surrogate (not UTF-8) or megabytes."""
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in error.items() if k != "input"} for error in exc.errors()]
    return EscapedJSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """No connection was free in time (the pool's `TimeoutError`, `DatabaseBusy`) or the
    database did not answer or cancelled the statement (`OperationalError`, SQLAlchemy's or
    psycopg's): 503, try again soon. The details, SQL and addresses, go to the log only."""
    if isinstance(exc, sqlalchemy_errors.TimeoutError | DatabaseBusy):
        detail = "the database is busy: no connection was free in time; retry later"
    else:
        detail = "the database is unavailable; retry later"
    log.warning("%s %s answered 503: %s", request.method, request.url.path, exc)
    return unavailable(detail)


def method_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    """405 naming in `Allow` every method the path takes: FastAPI makes a route per method, and
    Starlette names only those of the first route on the path."""
    methods = {
        method
        for route in request.app.router.routes
        if isinstance(route, Route) and route.matches(request.scope)[0] != Match.NONE
        for method in route.methods or ()
    }
    return JSONResponse(
        {"detail": "Method Not Allowed"},
        status_code=405,
        headers={"Allow": ", ".join(sorted(methods))},
    )


def unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)}
    )


def invalid_dataset(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DatasetError)
    invalid = len(exc.errors) + exc.more
    detail = {
        "message": f"invalid dataset: {invalid} invalid line(s); nothing was stored",
        "errors": [asdict(error) for error in exc.errors],
        "more_errors": exc.more,
    }
    return JSONResponse({"detail": detail}, status_code=422)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Close the connections that requests opened on the event loop."""
    yield
    await close_api_connections()
    await close_async_rate_limiters()


def create_app() -> FastAPI:
    settings = get_settings()
    app = FastAPI(
        title="kma",
        summary="Knowledge-mismatch audit for distillation datasets.",
        description=DESCRIPTION,
        version=version("kma"),
        openapi_tags=[
            {"name": "datasets", "description": "Teacher datasets, uploaded as JSONL."},
            {"name": "jobs", "description": "Audits of a dataset against a student model."},
            {
                "name": "reviews",
                "description": "A person's decisions on flagged examples, before training.",
            },
            {"name": "estimates", "description": "What a job would take, before submitting it."},
            {"name": "comparisons", "description": "Students audited on one dataset, compared."},
            {"name": "students", "description": "The student models jobs may name."},
            {"name": "workspace", "description": "The workspace of the request's API key."},
            {"name": "health", "description": "Liveness, readiness and metrics; no key needed."},
        ],
        responses=UNAVAILABLE,
        lifespan=lifespan,
    )
    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(sqlalchemy_errors.TimeoutError, database_unavailable)
    app.add_exception_handler(sqlalchemy_errors.OperationalError, database_unavailable)
    app.add_exception_handler(DatabaseBusy, database_unavailable)
    app.add_exception_handler(psycopg.OperationalError, database_unavailable)
    app.add_exception_handler(DatasetError, invalid_dataset)
    app.add_exception_handler(405, method_not_allowed)
    app.include_router(datasets_router, prefix="/v1")
    app.include_router(jobs_router, prefix="/v1")
    app.include_router(reviews_router, prefix="/v1")
    app.include_router(estimates_router, prefix="/v1")
    app.include_router(comparisons_router, prefix="/v1")
    app.include_router(workspace_router, prefix="/v1")
    app.include_router(students_router, prefix="/v1")
    app.include_router(health)
    app.include_router(metrics_router)
    app.add_middleware(UploadGuard)  # within RequestSlots: it may take a database connection
    app.add_middleware(
        RequestSlots,
        slots=settings.db_pool_size + settings.db_max_overflow,
        wait_seconds=settings.db_pool_timeout_seconds,
    )
    app.add_middleware(JobLogging)
    return app


UPLOAD_PATH = "/v1/datasets"


class UploadGuard:
    """An upload is refused before any of its body is read when its key is missing, unknown,
    revoked or over its rate limit (401, 429); its body is held to `max_upload_bytes` (413).

    A middleware, because FastAPI parses the form (spooling its file to disk) before any
    dependency runs. The key is checked by `app.deps.authorize_early`, the check every route
    makes, and the caller it finds is left to the route (counted once). A Content-Length
    over the limit is refused before reading; a body that declares none, or more than it said,
    is stopped as soon as the bytes counted pass the limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != UPLOAD_PATH:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        settings = overridden(request.app, get_settings)()
        try:
            caller = await authorize_early(request, settings)
        except HTTPError as exc:
            await http_error(request, exc)(scope, receive, send)
            return
        except (sqlalchemy_errors.TimeoutError, sqlalchemy_errors.OperationalError) as exc:
            await database_unavailable(request, exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[UPLOAD_CALLER] = caller
        limit = settings.max_upload_bytes
        detail = f"the upload is larger than {limit} bytes, the most this server takes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised in the route's body parsing, which passes an HTTPException on.
                raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)


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


class RequestSlots:
    """At most `slots` requests under way, as many as the pool has database connections; the
    others wait their turn, and answer 503 with Retry-After if it takes `wait_seconds`.

    A request holds its connection until its response is sent, and FastAPI serializes a sync
    endpoint's response in the threadpool. With more requests under way than connections,
    threads waiting for a connection can take every thread that the serializations, which
    would give the connections back, are waiting for: the API stalls until the pool times out.
    `/healthz` never waits: liveness does not depend on the database.
    """

    def __init__(self, app: ASGIApp, slots: int, wait_seconds: float) -> None:
        self.app = app
        self.slots = anyio.Semaphore(slots)
        self.wait_seconds = wait_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        try:
            self.slots.acquire_nowait()
        except anyio.WouldBlock:  # a timer only for those that wait: it costs more than a slot
            try:
                with anyio.fail_after(self.wait_seconds):
                    await self.slots.acquire()
            except TimeoutError:
                log.warning("%s %s answered 503: no request slot", scope["method"], scope["path"])
                await unavailable("the API is busy; retry later")(scope, receive, send)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            self.slots.release()


app = create_app()
