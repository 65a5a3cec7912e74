"""Comparison endpoints: jobs of different students on one dataset, their transition tables,
their examples side by side, exported, and as a page."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from app.comparisons import service
from app.comparisons.domain import Selection
from app.comparisons.schemas import ComparedExamplePage, Comparison
from app.deps import SessionDep, SettingsDep, WorkspaceDep, authorize, bearer
from app.errors import AUTH, NOT_FOUND, UNAVAILABLE, ErrorRead, Responses, as_json
from app.exports import RECORD_COUNT_HEADER
from app.jobs.router import Limit, PositionCursor

router = APIRouter(prefix="/comparisons", tags=["comparisons"], responses=AUTH)

REFUSED: Responses = {
    **NOT_FOUND,
    409: {"model": ErrorRead, "description": "A job has not succeeded; the detail names it."},
}


Jobs = Annotated[
    str,
    Query(
        max_length=400,
        description="2 to 10 job ids, separated by commas: succeeded jobs of the workspace "
        "on one dataset, each of another student.",
    ),
]


def job_ids(jobs: Jobs) -> list[uuid.UUID]:
    return service.parse_job_ids(jobs)


JobIds = Annotated[list[uuid.UUID], Depends(job_ids)]


def chosen(
    job_ids: JobIds,
    known_by: Annotated[
        list[uuid.UUID] | None,
        Query(description="Only examples this job knows (any category but Unknown)."),
    ] = None,
    unknown_by: Annotated[
        list[uuid.UUID] | None,
        Query(description="Only examples this job does not know (Unknown)."),
    ] = None,
    category: Annotated[
        list[str] | None,
        Query(
            max_length=400,
            description="`JOB:CATEGORY[,CATEGORY...]`: only examples this job put in one of "
            "these categories.",
        ),
    ] = None,
    disagree: Annotated[
        bool, Query(description="Only examples some jobs know and others do not.")
    ] = False,
) -> Selection:
    """The examples meeting every filter given; each may repeat."""
    return service.parse_selection(
        job_ids, known_by or [], unknown_by or [], category or [], disagree
    )


Chosen = Annotated[Selection, Depends(chosen)]


@router.get("", summary="Compare students on one dataset", responses=REFUSED)
def get_comparison(session: SessionDep, workspace: WorkspaceDep, job_ids: JobIds) -> Comparison:
    """Each job's categories, and for each pair of jobs the transition table: how many examples
    are in each category for the first and each category for the second (e.g. Unknown for a
    small student, HighlyKnown for a big one), with who knows what. Counted in the database:
    memory does not grow with the dataset."""
    return service.get_comparison(session, workspace.id, job_ids)


@router.get("/examples", summary="List the examples side by side", responses=REFUSED)
def list_examples(
    session: SessionDep,
    workspace: WorkspaceDep,
    job_ids: JobIds,
    selection: Chosen,
    cursor: PositionCursor = None,
    limit: Limit = 50,
) -> ComparedExamplePage:
    """The examples, in upload order, each with every job's category and student answer;
    filtered by `known_by`, `unknown_by`, `category` and `disagree`."""
    return service.list_examples(session, workspace.id, job_ids, selection, cursor, limit)


@router.get(
    "/export",
    summary="Export the examples the filters keep",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/x-ndjson": {}},
            "description": "The records as uploaded, in upload order. "
            f"`{RECORD_COUNT_HEADER}` announces how many; a failure part way aborts the "
            "connection.",
        },
        **REFUSED,
    },
)
def export_examples(
    session: SessionDep, workspace: WorkspaceDep, job_ids: JobIds, selection: Chosen
) -> StreamingResponse:
    """The examples the filters keep (e.g. `known_by=A&unknown_by=B`: what student A knows and
    B does not) as JSONL, each record as it was uploaded, in the dataset's own format."""
    export = service.export_examples(session, workspace.id, job_ids, selection)
    return export.response()


@router.get(
    "/report.html",
    summary="Get the comparison as a page",
    response_class=HTMLResponse,
    responses=as_json({**AUTH, **REFUSED, **UNAVAILABLE}),
)
def get_page(
    session: SessionDep,
    settings: SettingsDep,
    jobs: Jobs,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    access: Annotated[
        str | None,
        Query(
            max_length=200,
            description="The signed token of the comparison's `links.report_html`: opens the "
            "page in a browser, which sends no key, for 7 days.",
        ),
    ] = None,
) -> HTMLResponse:
    """The comparison for people: the students' categories, the transition tables, the examples
    they disagree on."""
    if credentials is None and access is not None:
        return HTMLResponse(service.get_page_by_link(session, jobs, access))
    workspace = authorize(session, settings, credentials).workspace
    return HTMLResponse(service.get_page(session, workspace.id, service.parse_job_ids(jobs)))
