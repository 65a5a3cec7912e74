"""Job use cases: submit, follow and cancel a job; read its examples, export and report."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import HttpUrl, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.audit.domain import (
    ExportPolicy,
    conflict_item,
    export_record,
    summarize_tallies,
    worst_case_generations,
)
from app.audit.schemas import Audit, AuditConfig, Category, ConflictRead, Report
from app.datasets import service as datasets_service
from app.datasets.domain import parse_record
from app.db import AsyncConnections
from app.errors import (
    Conflict,
    InvalidField,
    InvalidFields,
    InvalidQuery,
    NotFound,
    Unauthorized,
    Unprocessable,
)
from app.exports import Export, jsonl_chunks
from app.exports.domain import MEDIA_TYPES, SUFFIXES, ExportFormat, UnwritableRecords
from app.jobs import lifecycle, report_page, repository
from app.jobs.repository import PolledJob
from app.jobs.schemas import (
    ConflictPage,
    ExamplePage,
    ExampleRead,
    GenerationCounts,
    JobCreate,
    JobLinks,
    JobPage,
    JobRead,
    JobRescore,
    Progress,
)
from app.models import Dataset, Decision, Job, JobStatus, Review, Verdict, Workspace, utcnow
from app.models import Example as ExampleRow
from app.reviews import repository as reviews_repository
from app.reviews.domain import DEFAULT_UNREVIEWED, Unreviewed
from app.reviews.schemas import ReviewCounts, ReviewRead
from app.settings import Settings
from app.students import service as students_service
from app.students.schemas import RegisteredStudent, Student
from app.webhooks import WebhookRefused, check_url
from app.workspaces.domain import page_link_opens, page_link_token

log = logging.getLogger(__name__)

EXPORTABLE = (JobStatus.SUCCEEDED, JobStatus.CANCELLED)
REPORT_PAGE_ROWS = 5000
"""Flagged examples the report page lists; the rest are a link away."""
REPORT_PAGE_CONFLICTS = 1000
"""Conflicts the report page lists; the rest are on `/conflicts`."""


def _get(
    session: Session, workspace_id: uuid.UUID, job_id: uuid.UUID, *, lock: bool = False
) -> Job:
    """The workspace's job; another workspace's answers as if it did not exist."""
    job = repository.get_job(session, job_id, lock=lock)
    if job is None or job.workspace_id != workspace_id:
        raise NotFound(f"job {job_id} not found")
    return job


find_job = _get
"""The workspace's job, for the use cases of other packages."""


def _eta_seconds(job: Job | PolledJob, now: datetime) -> float | None:
    """Time left at the pace so far; unknown until the job runs and has a verdict."""
    if job.status != JobStatus.RUNNING or job.started_at is None or job.done == 0:
        return None
    elapsed = (now - job.started_at).total_seconds()
    return round(elapsed / job.done * max(job.total - job.done, 0), 1)


def _links(job: Job | PolledJob, secret: str) -> JobLinks:
    """The job's addresses; the report page's is signed with `secret`, its workspace's."""
    path = f"/v1/jobs/{job.id}"
    return JobLinks(
        self_=path,
        examples=f"{path}/examples",
        conflicts=f"{path}/conflicts",
        export=f"{path}/export",
        report=f"{path}/report",
        report_html=_page_link(job.id, secret),
    )


def _page_link(job_id: uuid.UUID, secret: str) -> str:
    """The job's report page, opened by its link's token where a browser has no key."""
    return f"/v1/jobs/{job_id}/report.html?access={page_link_token(secret, job_id, time.time())}"


def _read_many(session: Session, jobs: Sequence[Job], secret: str) -> list[JobRead]:
    """The jobs of one workspace (whose secret signs their links) as polled: from their rows,
    whose counters the workers keep, and for finished jobs, which alone are reviewed, one
    count of their review decisions."""
    now = utcnow()
    finished = [job.id for job in jobs if job.status in EXPORTABLE]
    decisions = reviews_repository.decision_counts(session, finished) if finished else {}
    return [job_read(job, decisions.get(job.id, {}), secret, now) for job in jobs]


def job_read(
    job: Job | PolledJob, decisions: dict[Decision, int], secret: str, now: datetime
) -> JobRead:
    return JobRead(
        id=job.id,
        dataset_id=job.dataset_id,
        status=job.status,
        student=Student.model_validate(job.student),
        config=AuditConfig.model_validate(job.config),
        webhook_url=job.webhook_url,
        progress=Progress(
            total=job.total,
            done=job.done,
            categories={
                category: getattr(job, column)
                for category, column in repository.CATEGORY_COUNTERS.items()
            },
            flagged=job.flagged,
        ),
        generations=GenerationCounts(new=job.generations, cached=job.cached_generations),
        reviews=ReviewCounts.of(job.flagged, decisions),
        rescore_of=job.rescore_of,
        reviews_carried=job.reviews_carried,
        reviews_not_carried=job.reviews_not_carried,
        eta_seconds=_eta_seconds(job, now),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        links=_links(job, secret),
    )


def _read(session: Session, job: Job, secret: str) -> JobRead:
    return _read_many(session, [job], secret)[0]


async def poll_job(
    connections: AsyncConnections, workspace: Workspace, job_id: uuid.UUID
) -> JobRead:
    """`get_job` on the event loop: one query, two for a finished job."""
    job = await repository.fetch_job(connections, job_id)
    if job is None or job.workspace_id != workspace.id:
        raise NotFound(f"job {job_id} not found")
    decisions = {}
    if job.status in EXPORTABLE:
        decisions = await reviews_repository.fetch_decision_counts(connections, job.id)
    return job_read(job, decisions, workspace.webhook_secret, utcnow())


def create_job(
    session: Session,
    workspace: Workspace,
    job_create: JobCreate,
    settings: Settings,
    idempotency_key: str | None = None,
) -> tuple[JobRead, bool]:
    """A queued job over the whole dataset, and whether it is new; the caller commits, then
    tells the workers.

    The student must be in the operator's registry; the job stores what its name loads,
    without server or key. Refused (422) when the job could take more generations than the
    limit, or its webhook does not go to a public address. A submission retried with the same
    `idempotency_key` gives the job the first one made.
    """
    student, dataset = check_submission(session, workspace.id, job_create, settings)
    job = Job(
        workspace_id=workspace.id,
        dataset_id=dataset.id,
        status=JobStatus.QUEUED,
        student=student.spec(job_create.student),
        config=job_create.config.model_dump(mode="json"),
        webhook_url=str(job_create.webhook_url) if job_create.webhook_url else None,
        total=dataset.num_examples,
        idempotency_key=idempotency_key,
    )
    if idempotency_key is not None:
        existing = repository.get_job_by_idempotency_key(session, workspace.id, idempotency_key)
        if existing is None:
            try:
                with session.begin_nested():
                    session.add(job)
            except IntegrityError:  # the same key, submitted at the same moment
                existing = repository.get_job_by_idempotency_key(
                    session, workspace.id, idempotency_key
                )
        if existing is not None:
            if _submission(existing) != _submission(job):
                raise Conflict(
                    f"Idempotency-Key {idempotency_key!r} was used for another submission "
                    f"(job {existing.id})"
                )
            return _read(session, existing, workspace.webhook_secret), False
    session.add(job)
    session.flush()
    return _read(session, job, workspace.webhook_secret), True


def check_submission(
    session: Session, workspace_id: uuid.UUID, job_create: JobCreate, settings: Settings
) -> tuple[RegisteredStudent, Dataset]:
    """Every check a submission passes before a job is stored, and the student and dataset it
    names: a job's estimate makes the same ones, so it is refused exactly when the job would be."""
    student = students_service.find_student(settings.students, job_create.student)
    _check_webhook(job_create.webhook_url, settings)
    dataset = datasets_service.get_dataset(session, workspace_id, job_create.dataset_id)
    _check_generations(job_create.config, dataset.num_examples, settings.max_generations_per_job)
    return student, dataset


def _check_webhook(url: HttpUrl | None, settings: Settings) -> None:
    """422 unless the webhook goes to a public address. A DNS lookup: call it before any query
    opens a transaction."""
    if url is not None:
        try:
            check_url(str(url), settings.webhook_allow_networks)
        except WebhookRefused as exc:
            raise InvalidField(["webhook_url"], f"webhook_url {exc}") from exc


def rescore_job(
    session: Session,
    workspace: Workspace,
    job_id: uuid.UUID,
    rescore: JobRescore,
    settings: Settings,
) -> JobRead:
    """A queued job that judges the succeeded job's answers again with other judging options;
    the caller commits, then tells the workers.

    The new job has the source's dataset, student, exemplar sets and generation options, so
    each of its requests has the key one of the source's had, and the generation cache answers
    it: in full mode it generates nothing. In adaptive mode an example that the new matcher
    no longer settles where the old one did needs the sampling rounds a fresh job would draw:
    those are generated (and counted as the job's new generations), the rest come from the
    cache, so its verdicts are exactly a fresh job's. 409 unless the source has succeeded.
    """
    _check_webhook(rescore.webhook_url, settings)
    source = _get(session, workspace.id, job_id)
    if source.status != JobStatus.SUCCEEDED:
        raise Conflict(
            f"job {job_id} is {source.status.value}: only a succeeded job is rescored, "
            "since its answers are all stored"
        )
    student = Student.model_validate(source.student)
    registered = settings.students.get(student.name)
    if registered is None or not registered.loads(student):
        raise Conflict(
            f"job {job_id}'s student {student.name!r} is no longer registered as it was when the "
            "job ran: its answers are that model's, which the workers can no longer load"
        )
    config = rescore.config.merged(AuditConfig.model_validate(source.config))
    _check_generations(config, source.total, settings.max_generations_per_job)
    job = Job(
        workspace_id=workspace.id,
        dataset_id=source.dataset_id,
        status=JobStatus.QUEUED,
        student=source.student,
        config=config.model_dump(mode="json"),
        webhook_url=str(rescore.webhook_url) if rescore.webhook_url else None,
        total=source.total,
        # Copied in the database: a job of many groups holds megabytes of exemplars.
        exemplar_sets=select(Job.exemplar_sets).where(Job.id == source.id).scalar_subquery(),
        rescore_of=source.id,
    )
    session.add(job)
    session.flush()
    return _read(session, job, workspace.webhook_secret)


def _check_generations(config: AuditConfig, examples: int, limit: int) -> None:
    worst = worst_case_generations(config, examples)
    if worst > limit:
        raise InvalidField(
            ["config"],
            f"this job could take up to {worst:,} generations ({examples:,} examples x "
            f"{config.n_exemplar_sets} exemplar sets x (1 + {config.samples}) samples), over "
            f"the limit of {limit:,} per job; lower n_exemplar_sets or samples, or split the "
            "dataset",
        )


def _submission(job: Job) -> tuple[Any, ...]:
    return job.dataset_id, job.student, job.config, job.webhook_url


def get_job(session: Session, workspace: Workspace, job_id: uuid.UUID) -> JobRead:
    return _read(session, _get(session, workspace.id, job_id), workspace.webhook_secret)


def list_jobs(
    session: Session,
    workspace: Workspace,
    status: JobStatus | None,
    cursor: uuid.UUID | None,
    limit: int,
) -> JobPage:
    after = None
    if cursor is not None:
        after = repository.get_job(session, cursor)
        if after is None or after.workspace_id != workspace.id:
            raise InvalidQuery("cursor", f"cursor {cursor} names no job")
    jobs = repository.list_jobs(session, workspace.id, status, after, limit + 1)
    page = jobs[:limit]
    next_cursor = page[-1].id if len(jobs) > limit else None
    return JobPage(
        items=_read_many(session, page, workspace.webhook_secret), next_cursor=next_cursor
    )


@dataclass(frozen=True)
class Webhook:
    url: str
    body: bytes
    """The job as polled, as JSON: what is signed and sent."""
    secret: str
    """The job's workspace's."""


def webhook_of(session: Session, job_id: uuid.UUID) -> Webhook | None:
    """What a finished job's webhook sends; None when it has none (or the job is gone)."""
    job = repository.get_job(session, job_id)
    if job is None or not job.webhook_url:
        return None
    workspace = session.get_one(Workspace, job.workspace_id)
    body = _read(session, job, workspace.webhook_secret).model_dump_json().encode()
    return Webhook(job.webhook_url, body, workspace.webhook_secret)


def delete_job(session: Session, workspace_id: uuid.UUID, job_id: uuid.UUID) -> None:
    """Remove the job with its verdicts and report; a job still running is cancelled first, so
    no worker writes after the delete."""
    job = _get(session, workspace_id, job_id, lock=True)
    if not job.status.finished:
        lifecycle.cancel(job)
        session.flush()
    session.delete(job)


def cancel_job(session: Session, workspace: Workspace, job_id: uuid.UUID) -> JobRead:
    """Stop a queued or running job; workers see the status and do no more of it."""
    job = _get(session, workspace.id, job_id, lock=True)
    lifecycle.cancel(job)
    session.flush()
    return _read(session, job, workspace.webhook_secret)


def list_examples(
    session: Session,
    workspace_id: uuid.UUID,
    job_id: uuid.UUID,
    category: Category | None,
    flagged: bool | None,
    cursor: int | None,
    limit: int,
) -> ExamplePage:
    """The job's verdicts so far, by position; `cursor` is the previous page's last position."""
    job = _get(session, workspace_id, job_id)
    rows = repository.list_examples(
        session, job, category.value if category else None, flagged, cursor, limit + 1
    )
    page = rows[:limit]
    reviews = reviews_repository.reviews_at(session, job.id, [e.position for _, e in page])
    items = [
        ExampleRead(
            position=example.position,
            id=example.record_id,
            line=example.line,
            group=example.group,
            record=example.raw,
            audit=Audit.model_validate(verdict.audit),
            review=_review_read(reviews.get(example.position)),
        )
        for verdict, example in page
    ]
    next_cursor = str(items[-1].position) if len(rows) > limit else None
    return ExamplePage(items=items, next_cursor=next_cursor)


def _review_read(review: Review | None) -> ReviewRead | None:
    return None if review is None else ReviewRead.model_validate(review)


def get_example(
    session: Session, workspace_id: uuid.UUID, job_id: uuid.UUID, position: int
) -> ExampleRead:
    """The audited example at `position`, with its review."""
    page = list_examples(session, workspace_id, job_id, None, None, position - 1, 1)
    if not page.items or page.items[0].position != position:
        raise NotFound(f"job {job_id} has no audited example at position {position}")
    return page.items[0]


def export_job(
    session: Session,
    workspace_id: uuid.UUID,
    job_id: uuid.UUID,
    policy: ExportPolicy,
    export_format: ExportFormat = "jsonl",
    unreviewed: Unreviewed | None = None,
) -> Export:
    """The dataset as the policy writes it back, in upload order, in the export format.

    Examples without a verdict (a job cancelled part way) are written unchanged. `reviewed`
    applies people's decisions, and writes flagged examples without one as `unreviewed` says.

    JSONL streams: the lines are counted now and the rows read as the chunks are taken. A
    failure while the chunks are taken is logged and raised again: the server then aborts the
    connection, so a client never takes a short body for a whole one. Parquet and hf need every
    record's fields before their first row: they are written whole, then sent (422 when no one
    schema holds the records).
    """
    job = _get(session, workspace_id, job_id)
    if job.status not in EXPORTABLE:
        raise Conflict(f"job {job_id} is {job.status.value}: export needs it finished or cancelled")
    if unreviewed is not None and policy != "reviewed":
        raise InvalidFields([(["query", "unreviewed"], "goes with policy reviewed only")])
    unreviewed = unreviewed or DEFAULT_UNREVIEWED
    idk_text = AuditConfig.model_validate(job.config).idk_text
    record_format = datasets_service.record_format(session, job.dataset_id)
    # Read once, before the count: the count and the records agree whatever is decided meanwhile.
    decisions = reviews_repository.decisions(session, job.id) if policy == "reviewed" else {}
    records = (
        export_record(
            raw,
            Audit.model_validate(audit),
            policy,
            idk_text,
            record_format,
            decisions.get(position),
            unreviewed,
        )
        if audit is not None
        else raw
        for position, raw, audit in repository.iter_records(session, job)
    )
    filename = f"kma-{job_id}-{policy}{SUFFIXES[export_format]}"
    if export_format == "jsonl":
        return Export(
            _record_count(session, job, policy, unreviewed, len(decisions)),
            jsonl_chunks(f"job {job_id}", records),
            filename,
        )
    from app.exports.files import write_export  # pyarrow: only where a file is written

    try:
        written = write_export((r for r in records if r is not None), export_format)
    except UnwritableRecords as exc:
        raise Unprocessable(
            f"job {job_id} cannot be exported as {export_format}: {exc}; export it as jsonl"
        ) from exc
    return Export(
        written.record_count, written.chunks(), filename, MEDIA_TYPES[export_format], written.size
    )


def _record_count(
    session: Session, job: Job, policy: ExportPolicy, unreviewed: Unreviewed, decisions: int
) -> int:
    """The lines of an export: every example, less the flagged ones the policy drops (every
    decision is on a flagged example, and keeps it)."""
    if policy == "reviewed" and unreviewed == "drop":
        return repository.count_records(session, job, without_flagged=True) + decisions
    return repository.count_records(session, job, without_flagged=policy == "drop")


def list_conflicts(
    session: Session,
    workspace_id: uuid.UUID,
    job_id: uuid.UUID,
    cursor: int | None,
    limit: int,
) -> ConflictPage:
    """The job's conflicts so far, by position; `cursor` is the previous page's last position."""
    job = _get(session, workspace_id, job_id)
    rows = repository.list_examples(session, job, None, None, cursor, limit + 1, conflict=True)
    record_format = datasets_service.record_format(session, job.dataset_id)
    items = [_conflict(record_format, verdict, example) for verdict, example in rows[:limit]]
    next_cursor = str(items[-1].position) if len(rows) > limit else None
    return ConflictPage(items=items, next_cursor=next_cursor)


def _conflict(record_format: str, verdict: Verdict, example: ExampleRow) -> ConflictRead:
    teacher = parse_record(record_format, example.raw, example.line)
    return conflict_item(example.position, teacher, Audit.model_validate(verdict.audit))


def build_report(session: Session, job: Job) -> Report:
    """The job's report from its verdicts as they stand, counted in the database.

    Memory does not grow with the verdicts. `partial` unless the job has succeeded: a cancelled
    or failed job's report covers the examples audited before it stopped.
    """
    counts = summarize_tallies(repository.verdict_tallies(session, job))
    config = AuditConfig.model_validate(job.config)
    ended = job.finished_at or utcnow()
    return Report(
        **counts.model_dump(),
        partial=job.status != JobStatus.SUCCEEDED,
        total=job.total,
        generations=job.generations,
        generations_cached=job.cached_generations,
        mode=config.mode,
        student=Student.model_validate(job.student),
        config=config,
        seconds=round((ended - (job.started_at or job.created_at)).total_seconds(), 3),
    )


def _report(session: Session, job: Job) -> Report:
    """A succeeded job's stored report; a cancelled or failed job's, built now (partial); with
    its review counts as they stand."""
    if not job.status.finished:
        raise Conflict(f"job {job.id} is {job.status.value}: the report is written when it ends")
    report = _stored_report(job) or build_report(session, job)
    decisions = reviews_repository.decision_counts(session, [job.id]).get(job.id, {})
    return report.model_copy(update={"reviews": ReviewCounts.of(report.flagged, decisions)})


def _stored_report(job: Job) -> Report | None:
    if job.status == JobStatus.SUCCEEDED and job.report is not None:
        try:
            return Report.model_validate(job.report)
        except ValidationError:
            pass  # stored before reports were typed: its verdicts give the same report
    return None


def get_report(session: Session, workspace_id: uuid.UUID, job_id: uuid.UUID) -> Report:
    return _report(session, _get(session, workspace_id, job_id))


def get_report_page(session: Session, workspace: Workspace, job_id: uuid.UUID) -> str:
    """The report as an HTML page, with the first flagged examples and conflicts."""
    job = _get(session, workspace.id, job_id)
    report = _report(session, job)
    dataset = datasets_service.get_dataset(session, workspace.id, job.dataset_id)
    rows = repository.list_examples(session, job, None, True, None, REPORT_PAGE_ROWS)
    reviews = reviews_repository.reviews_at(session, job.id, [e.position for _, e in rows])
    conflicts = repository.list_examples(
        session, job, None, None, None, REPORT_PAGE_CONFLICTS, conflict=True
    )
    page = report_page.ReportPage(
        job_id=str(job.id),
        status=job.status.value,
        dataset_name=dataset.name,
        finished_at=job.finished_at,
        report=report,
        flagged_rows=[
            _flagged_row(dataset.format, verdict, example, reviews.get(example.position))
            for verdict, example in rows
        ],
        conflict_rows=[
            _conflict(dataset.format, verdict, example) for verdict, example in conflicts
        ],
        links=_links(job, workspace.webhook_secret),
        rescore_of=str(job.rescore_of) if job.rescore_of else None,
        rescore_of_page=(
            _page_link(job.rescore_of, workspace.webhook_secret) if job.rescore_of else None
        ),
        reviews_carried=job.reviews_carried,
    )
    return report_page.render(page)


def get_report_page_by_link(session: Session, job_id: uuid.UUID, access: str) -> str:
    """The page for a browser, which has no key: the link's token stands for it. A token that
    does not open this job's page answers 401, whether the job exists or not."""
    job = repository.get_job(session, job_id)
    if job is not None:
        workspace = session.get_one(Workspace, job.workspace_id)
        if page_link_opens(workspace.webhook_secret, job.id, access, time.time()):
            return get_report_page(session, workspace, job_id)
    raise Unauthorized("the link is invalid or has expired")


def _flagged_row(
    record_format: str, verdict: Verdict, example: ExampleRow, review: Review | None
) -> report_page.FlaggedRow:
    teacher = parse_record(record_format, example.raw, example.line)
    audit = Audit.model_validate(verdict.audit)
    return report_page.FlaggedRow(
        position=example.position,
        id=example.record_id,
        group=example.group,
        question=teacher.question,
        teacher_answer=teacher.answer,
        student_answer=audit.student_answer,
        agreement=audit.agreement,
        category=audit.category.value,
        suggested_action=audit.suggested_action.value,
        suggested_answer=audit.suggested_answer,
        review=_review_read(review),
    )
