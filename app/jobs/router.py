"""Job endpoints: submit, poll, cancel, and read the examples, conflicts, export and report."""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from app.audit.domain import ExportPolicy
from app.audit.schemas import Category, Report
from app.db import api_connections, session_scope
from app.deps import (
    CredentialsDep,
    QueueDep,
    SessionDep,
    SettingsDep,
    WorkspaceDep,
    authorize,
    authorize_on_loop,
    overridden,
)
from app.errors import (
    AUTH,
    NOT_FOUND,
    UNAVAILABLE,
    UNPARSABLE,
    ErrorRead,
    Responses,
    as_json,
)
from app.exports import RECORD_COUNT_HEADER
from app.exports.domain import MEDIA_TYPES, ExportFormat
from app.jobs import service
from app.jobs.schemas import (
    ConflictPage,
    ExamplePage,
    ExampleRead,
    JobCreate,
    JobPage,
    JobRead,
    JobRescore,
)
from app.models import POSITION_MAX, JobStatus
from app.queue import SEND_WEBHOOK, WORK, Queue, QueueUnavailable
from app.reviews.domain import Unreviewed
from app.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=AUTH)

Limit = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
PositionCursor = Annotated[
    int | None, Query(ge=0, le=POSITION_MAX, description="`next_cursor` of a page.")
]


def conflict(description: str) -> Responses:
    return {409: {"model": ErrorRead, "description": description}}


@router.post(
    "",
    status_code=202,
    summary="Submit an audit job",
    responses={
        **UNPARSABLE,
        **NOT_FOUND,
        **conflict("The Idempotency-Key was used for another submission."),
    },
)
def create_job(
    session: SessionDep,
    workspace: WorkspaceDep,
    queue: QueueDep,
    settings: SettingsDep,
    job_create: JobCreate,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Retrying a submission with the same key gives the same job back.",
        ),
    ] = None,
) -> JobRead:
    """Queue an audit of the dataset against the student; poll the job it answers.

    `student` names a registered student (`GET /v1/students`); any other answers 422. Every
    option is checked now: an invalid one answers 422 naming its field, as does a job that
    could take more than `KMA_MAX_GENERATIONS_PER_JOB` generations (`config`) or a webhook that
    is not a public http(s) address (`webhook_url`). A stored job always starts, even when the
    broker is down as it is submitted: workers find it then.
    """
    job, created = service.create_job(session, workspace, job_create, settings, idempotency_key)
    session.commit()
    if created:
        wake_workers(queue)
    return job


def wake_workers(queue: Queue) -> None:
    try:
        queue.send(WORK)
    except QueueUnavailable as exc:
        log.warning("the broker took no hint (%s); the workers' sweeper finds the work", exc)


@router.get("", summary="List jobs")
def list_jobs(
    session: SessionDep,
    workspace: WorkspaceDep,
    status: JobStatus | None = None,
    cursor: Annotated[uuid.UUID | None, Query(description="`next_cursor` of a page.")] = None,
    limit: Limit = 50,
) -> JobPage:
    """Jobs, newest first, optionally of one status."""
    return service.list_jobs(session, workspace, status, cursor, limit)


@router.get("/{job_id}", summary="Get a job", response_model=JobRead, responses=NOT_FOUND)
async def get_job(
    request: Request, settings: SettingsDep, credentials: CredentialsDep, job_id: uuid.UUID
) -> Response:
    """The job's status, progress (its verdicts so far, per category), generations and time
    left."""
    if (
        (credentials is not None or not settings.allow_anonymous)
        and settings.database_url
        and overridden(request.app, session_scope) is session_scope
    ):
        connections = api_connections(settings.database_url)
        caller = await authorize_on_loop(connections, settings, credentials)
        job = await service.poll_job(connections, caller.workspace, job_id)
    else:
        job = await run_in_threadpool(
            poll_job_in_session, request.app, settings, credentials, job_id
        )
    return Response(job.model_dump_json(by_alias=True), media_type="application/json")


def poll_job_in_session(
    app: FastAPI,
    settings: Settings,
    credentials: HTTPAuthorizationCredentials | None,
    job_id: uuid.UUID,
) -> JobRead:
    """`get_job` through a session, on one worker thread: for an anonymous request (which may
    make the default workspace) and where the app's sessions are overridden (tests, whose
    requests run in the test's transaction); other polls take no thread (`get_job`)."""
    with contextmanager(overridden(app, session_scope))() as session:
        try:
            workspace = authorize(session, settings, credentials).workspace
            return service.get_job(session, workspace, job_id)
        finally:
            session.rollback()


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    responses={**NOT_FOUND, **conflict("The job has already finished.")},
)
def cancel_job(
    session: SessionDep, workspace: WorkspaceDep, queue: QueueDep, job_id: uuid.UUID
) -> JobRead:
    """Stop a queued or running job. The verdicts written so far stay readable and exportable."""
    job = service.cancel_job(session, workspace, job_id)
    session.commit()
    if job.webhook_url:
        try:
            queue.send(SEND_WEBHOOK, str(job.id))
        except QueueUnavailable as exc:
            log.error("job %s: the webhook could not be queued: %s", job.id, exc)
    return job


@router.delete("/{job_id}", status_code=204, summary="Delete a job", responses=NOT_FOUND)
def delete_job(session: SessionDep, workspace: WorkspaceDep, job_id: uuid.UUID) -> None:
    """Delete the job with its verdicts and report; a job still running is cancelled first."""
    service.delete_job(session, workspace.id, job_id)
    session.commit()


@router.post(
    "/{job_id}/rescore",
    status_code=202,
    summary="Rescore a job with other judging options",
    responses={
        **UNPARSABLE,
        **NOT_FOUND,
        **conflict("The job has not succeeded, or its student is no longer registered as it was."),
    },
)
def rescore_job(
    session: SessionDep,
    workspace: WorkspaceDep,
    queue: QueueDep,
    settings: SettingsDep,
    job_id: uuid.UUID,
    rescore: JobRescore,
) -> JobRead:
    """Queue a new job that judges this succeeded job's stored answers again, with other
    judging options (`matcher`, `f1_threshold`, `flag_categories`,
    `student_answer_min_agreement`, `idk_text`); the options left out keep this job's.

    The new job has its own verdicts, report and exports, and `rescore_of` names this job. Its
    answers come from the generation cache: in full mode it generates nothing. In adaptive mode
    an example the new matcher no longer settles where the old one did gets the samples a fresh
    job would draw, generated and counted in `generations.new`. An option that changes the
    answers themselves (samples, shots, temperature, the prompt, ...) answers 422 at its place.
    When the new job ends, the decisions people made on this job are copied onto it where they
    still apply (`reviews_carried`, `reviews_not_carried`).
    """
    job = service.rescore_job(session, workspace, job_id, rescore, settings)
    session.commit()
    wake_workers(queue)
    return job


@router.get("/{job_id}/examples", summary="List a job's verdicts", responses=NOT_FOUND)
def list_examples(
    session: SessionDep,
    workspace: WorkspaceDep,
    job_id: uuid.UUID,
    category: Category | None = None,
    flagged: bool | None = None,
    cursor: PositionCursor = None,
    limit: Limit = 50,
) -> ExamplePage:
    """The examples audited so far, in upload order, each with its record and audit."""
    return service.list_examples(session, workspace.id, job_id, category, flagged, cursor, limit)


@router.get("/{job_id}/examples/{position}", summary="Get an audited example", responses=NOT_FOUND)
def get_example(
    session: SessionDep,
    workspace: WorkspaceDep,
    job_id: uuid.UUID,
    position: Annotated[int, Path(ge=0, le=POSITION_MAX, description="0-based.")],
) -> ExampleRead:
    """The example at `position`, with its record, audit and review."""
    return service.get_example(session, workspace.id, job_id, position)


@router.get("/{job_id}/conflicts", summary="List a job's conflicts", responses=NOT_FOUND)
def list_conflicts(
    session: SessionDep,
    workspace: WorkspaceDep,
    job_id: uuid.UUID,
    cursor: PositionCursor = None,
    limit: Limit = 50,
) -> ConflictPage:
    """The examples the student answers consistently and differently from the teacher, so far,
    in upload order: there the teacher may be the one that is wrong."""
    return service.list_conflicts(session, workspace.id, job_id, cursor, limit)


@router.get(
    "/{job_id}/export",
    summary="Export the audited dataset",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {media_type: {} for media_type in MEDIA_TYPES.values()},
            "description": "The dataset in upload order, rewritten by the policy: JSONL "
            "streamed as it is read, a Parquet file, or (`hf`) a tar of a folder that "
            "`datasets.load_from_disk` opens. A failure part way aborts the connection: the "
            "body never ends cleanly short.",
            "headers": {
                RECORD_COUNT_HEADER: {
                    "description": "The number of records the body holds: the dataset's "
                    "examples, less those the policy drops. A client keeps the file only when "
                    "it received exactly this many.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            },
        },
        **NOT_FOUND,
        **conflict("The job is neither succeeded nor cancelled."),
    },
)
def export_job(
    session: SessionDep,
    workspace: WorkspaceDep,
    job_id: uuid.UUID,
    policy: ExportPolicy = "suggested",
    export_format: Annotated[
        ExportFormat,
        Query(
            alias="format",
            description="`jsonl` (streamed), `parquet` (one file), or `hf` (a Hugging Face "
            "`datasets` folder, as a tar).",
        ),
    ] = "jsonl",
    unreviewed: Annotated[
        Unreviewed | None,
        Query(
            description="With `reviewed`: what a flagged example no one has decided on "
            "becomes: its suggested relabel (default), dropped, or kept as the teacher wrote it."
        ),
    ] = None,
) -> StreamingResponse:
    """Send the dataset back, each record in its own record format.

    `suggested` replaces flagged answers by the suggested ones, `drop` removes flagged rows,
    `idk` and `student` answer every flagged row with the idk text or the student's answer,
    `annotate` keeps every row and adds its `audit` object, `reviewed` applies people's
    decisions (accept: the suggestion; reject: the teacher's answer; override: the reviewer's).
    The `X-Kma-Record-Count` header announces the number of records.
    """
    export = service.export_job(session, workspace.id, job_id, policy, export_format, unreviewed)
    return export.response()


@router.get(
    "/{job_id}/report",
    summary="Get a job's report",
    responses={**NOT_FOUND, **conflict("The job is queued or running.")},
)
def get_report(session: SessionDep, workspace: WorkspaceDep, job_id: uuid.UUID) -> Report:
    """The summary: counts per category and per group, flagged, suggested actions, conflicts,
    generations.

    A succeeded job's report is the one written when it ended; a cancelled or failed job's is
    counted now over the verdicts it has, with `partial` true.
    """
    return service.get_report(session, workspace.id, job_id)


@router.get(
    "/{job_id}/report.html",
    summary="Get a job's report as a page",
    response_class=HTMLResponse,
    responses=as_json(
        {**AUTH, **NOT_FOUND, **conflict("The job is queued or running."), **UNAVAILABLE}
    ),
)
def get_report_page(
    session: SessionDep,
    settings: SettingsDep,
    job_id: uuid.UUID,
    credentials: CredentialsDep,
    access: Annotated[
        str | None,
        Query(
            max_length=200,
            description="The signed token of the job's `links.report_html`: opens the page in "
            "a browser, which sends no key, for 7 days.",
        ),
    ] = None,
) -> HTMLResponse:
    """The report for people: category and per-group charts, conflicts, flagged examples."""
    if credentials is None and access is not None:
        return HTMLResponse(service.get_report_page_by_link(session, job_id, access))
    workspace = authorize(session, settings, credentials).workspace
    return HTMLResponse(service.get_report_page(session, workspace, job_id))
