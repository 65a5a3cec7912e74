"""Comparison use cases: succeeded jobs of different students on one dataset, side by side."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.audit.schemas import Audit, Category
from app.comparisons import page, repository
from app.comparisons.domain import KNOWN, Selection, selection, transition
from app.comparisons.schemas import (
    Agreement,
    ComparedExample,
    ComparedExamplePage,
    ComparedJob,
    Comparison,
    ComparisonLinks,
    StudentVerdict,
)
from app.datasets import service as datasets_service
from app.datasets.domain import parse_record
from app.errors import Conflict, InvalidFields, InvalidQuery, Unauthorized
from app.exports import Export, jsonl_chunks
from app.jobs import repository as jobs_repository
from app.jobs import service as jobs_service
from app.jobs.schemas import JobRead
from app.models import Example, JobStatus, Workspace
from app.workspaces.domain import page_link_opens, page_link_token

MAX_JOBS = 10
"""The most jobs one comparison takes: 45 pairs of them."""
PAGE_ROWS = 2000
"""Examples the students disagree on that the page lists; the rest are a link away."""


def parse_job_ids(jobs: str) -> list[uuid.UUID]:
    """The `jobs` parameter: 2 to `MAX_JOBS` job ids, separated by commas, none twice."""
    job_ids = []
    for part in jobs.split(","):
        try:
            job_ids.append(uuid.UUID(part.strip()))
        except ValueError:
            raise InvalidQuery("jobs", f"{part.strip()!r} is not a job id") from None
    if not 2 <= len(job_ids) <= MAX_JOBS:
        raise InvalidQuery(
            "jobs", f"name 2 to {MAX_JOBS} jobs, separated by commas ({len(job_ids)} named)"
        )
    for job_id in job_ids:
        if job_ids.count(job_id) > 1:
            raise InvalidQuery("jobs", f"job {job_id} is named twice")
    return job_ids


def parse_selection(
    job_ids: Sequence[uuid.UUID],
    known_by: Sequence[uuid.UUID],
    unknown_by: Sequence[uuid.UUID],
    categories: Sequence[str],
    disagree: bool,
) -> Selection:
    """The filters of a listing or an export; each job they name must be one compared."""
    for name, named in (("known_by", known_by), ("unknown_by", unknown_by)):
        for job_id in named:
            if job_id not in job_ids:
                raise InvalidQuery(name, f"job {job_id} is not one of the jobs compared")
    return selection(
        known_by, unknown_by, [_job_categories(job_ids, value) for value in categories], disagree
    )


def _job_categories(
    job_ids: Sequence[uuid.UUID], value: str
) -> tuple[uuid.UUID, frozenset[Category]]:
    """`JOB:Category[,Category...]`: the job's verdict is in one of these categories."""
    job, _, names = value.partition(":")
    try:
        job_id = uuid.UUID(job)
    except ValueError:
        raise InvalidQuery(
            "category",
            f"{value!r} is not JOB:CATEGORY[,CATEGORY...] (a job id, a colon, categories)",
        ) from None
    if job_id not in job_ids:
        raise InvalidQuery("category", f"job {job_id} is not one of the jobs compared")
    try:
        return job_id, frozenset(Category(name) for name in names.split(","))
    except ValueError:
        choices = ", ".join(c.value for c in Category)
        raise InvalidQuery(
            "category", f"{names!r} names a category that does not exist (categories: {choices})"
        ) from None


def _jobs(session: Session, workspace_id: uuid.UUID, job_ids: Sequence[uuid.UUID]) -> list[JobRead]:
    """The workspace's jobs (404 for any other), all of one dataset (422), succeeded (409)."""
    workspace = session.get_one(Workspace, workspace_id)
    jobs = [jobs_service.get_job(session, workspace, job_id) for job_id in job_ids]
    first = jobs[0]
    for job in jobs[1:]:
        if job.dataset_id != first.dataset_id:
            raise InvalidQuery(
                "jobs",
                f"job {job.id} audits dataset {job.dataset_id} and job {first.id} dataset "
                f"{first.dataset_id}: the jobs compared must audit one dataset",
            )
    for job in jobs:
        if job.status != JobStatus.SUCCEEDED:
            raise Conflict(f"job {job.id} is {job.status.value}: only succeeded jobs are compared")
    return jobs


def _compared(job: JobRead) -> ComparedJob:
    categories = job.progress.categories
    return ComparedJob(
        id=job.id,
        student=job.student,
        mode=job.config.mode,
        finished_at=job.finished_at,
        categories=categories,
        known=sum(n for category, n in categories.items() if category in KNOWN),
        report_html=job.links.report_html,
    )


def _page_name(job_ids: Sequence[uuid.UUID]) -> str:
    """What a link to the comparison's page is signed for."""
    return "comparison:" + ",".join(str(job_id) for job_id in job_ids)


def _links(
    session: Session, workspace_id: uuid.UUID, job_ids: Sequence[uuid.UUID]
) -> ComparisonLinks:
    jobs = ",".join(str(job_id) for job_id in job_ids)
    secret = session.get_one(Workspace, workspace_id).webhook_secret
    access = page_link_token(secret, _page_name(job_ids), time.time())
    return ComparisonLinks(
        self_=f"/v1/comparisons?jobs={jobs}",
        examples=f"/v1/comparisons/examples?jobs={jobs}",
        export=f"/v1/comparisons/export?jobs={jobs}",
        report_html=f"/v1/comparisons/report.html?jobs={jobs}&access={access}",
    )


def get_comparison(
    session: Session, workspace_id: uuid.UUID, job_ids: Sequence[uuid.UUID]
) -> Comparison:
    """The jobs' categories, the transition table of every pair, how many examples all, none
    or only some of the students know: all counted in the database, in one pass."""
    jobs = _jobs(session, workspace_id, job_ids)
    dataset = datasets_service.get_dataset(session, workspace_id, jobs[0].dataset_id)
    counts = repository.comparison_counts(session, job_ids)
    return Comparison(
        dataset_id=dataset.id,
        num_examples=dataset.num_examples,
        jobs=[_compared(job) for job in jobs],
        agreement=Agreement(
            known_by_all=counts.known_by_all,
            known_by_none=counts.known_by_none,
            disagree=counts.examples - counts.known_by_all - counts.known_by_none,
        ),
        transitions=[
            transition(job_ids[i], job_ids[j], cells) for (i, j), cells in counts.cells.items()
        ],
        links=_links(session, workspace_id, job_ids),
    )


def list_examples(
    session: Session,
    workspace_id: uuid.UUID,
    job_ids: Sequence[uuid.UUID],
    chosen: Selection,
    cursor: int | None,
    limit: int,
) -> ComparedExamplePage:
    """The chosen examples, by position, each with every job's verdict; `cursor` is the
    previous page's last position."""
    jobs = _jobs(session, workspace_id, job_ids)
    record_format = datasets_service.record_format(session, jobs[0].dataset_id)
    rows = repository.list_examples(session, jobs[0].dataset_id, job_ids, chosen, cursor, limit + 1)
    items = [_compared_example(record_format, job_ids, row) for row in rows[:limit]]
    next_cursor = str(items[-1].position) if len(rows) > limit else None
    return ComparedExamplePage(items=items, next_cursor=next_cursor)


def _compared_example(
    record_format: str, job_ids: Sequence[uuid.UUID], row: Sequence[Any]
) -> ComparedExample:
    example: Example = row[0]
    teacher = parse_record(record_format, example.raw, example.line)
    verdicts = []
    for job_id, stored in zip(job_ids, row[1:], strict=True):
        audit = Audit.model_validate(stored)
        verdicts.append(
            StudentVerdict(
                job_id=job_id,
                category=audit.category,
                student_answer=audit.student_answer,
                agreement=audit.agreement,
            )
        )
    return ComparedExample(
        position=example.position,
        id=example.record_id,
        line=example.line,
        group=example.group,
        question=teacher.question,
        teacher_answer=teacher.answer,
        verdicts=verdicts,
    )


def export_examples(
    session: Session, workspace_id: uuid.UUID, job_ids: Sequence[uuid.UUID], chosen: Selection
) -> Export:
    """The chosen examples' records, as uploaded, in upload order; counted now, read as the
    chunks are taken."""
    jobs = _jobs(session, workspace_id, job_ids)
    count = repository.count_examples(session, job_ids, chosen)
    records = repository.iter_records(session, jobs[0].dataset_id, job_ids, chosen)
    return Export(
        count, jsonl_chunks(f"comparison {_page_name(job_ids)}", records), "kma-comparison.jsonl"
    )


def get_page(session: Session, workspace_id: uuid.UUID, job_ids: Sequence[uuid.UUID]) -> str:
    """The comparison as an HTML page, with the first examples the students disagree on."""
    comparison = get_comparison(session, workspace_id, job_ids)
    dataset = datasets_service.get_dataset(session, workspace_id, comparison.dataset_id)
    rows = repository.list_examples(
        session, dataset.id, job_ids, Selection(disagree=True), None, PAGE_ROWS
    )
    return page.render(
        page.ComparisonPage(
            dataset_name=dataset.name,
            comparison=comparison,
            disagreements=[_compared_example(dataset.format, job_ids, row) for row in rows],
        )
    )


def get_page_by_link(session: Session, jobs: str, access: str) -> str:
    """The page for a browser, which has no key: the link's token stands for it. A link that
    does not open this comparison's page (its `jobs` unreadable, its token forged, expired or
    another page's) answers 401, as a request without a key does."""
    with contextlib.suppress(InvalidFields):
        job_ids = parse_job_ids(jobs)
        job = jobs_repository.get_job(session, job_ids[0])
        if job is not None:
            secret = session.get_one(Workspace, job.workspace_id).webhook_secret
            if page_link_opens(secret, _page_name(job_ids), access, time.time()):
                return get_page(session, job.workspace_id, job_ids)
    raise Unauthorized("the link is invalid or has expired")
