"""Job I/O: the submission, the job as polled, its examples page."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from app.audit.schemas import Audit, AuditConfig, Category, ConflictRead, RescoreOptions
from app.models import JobStatus
from app.reviews.schemas import ReviewCounts, ReviewRead
from app.students.schemas import Student, StudentName


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: uuid.UUID
    student: StudentName = Field(
        description="The name of a registered student (`GET /v1/students`)."
    )
    config: AuditConfig = Field(
        default_factory=AuditConfig, description="Method options; omitted ones take defaults."
    )
    webhook_url: HttpUrl | None = Field(None, description="Called when the job finishes.")


class JobRescore(BaseModel):
    """A new job that judges a succeeded job's stored answers with other judging options."""

    model_config = ConfigDict(extra="forbid")

    config: RescoreOptions = Field(
        default_factory=RescoreOptions,
        description="Judging options; those left out keep the source job's. Options that need "
        "new generations (samples, shots, temperature, the prompt, ...) answer 422.",
    )
    webhook_url: HttpUrl | None = Field(None, description="Called when the new job finishes.")


class Progress(BaseModel):
    total: int = Field(description="Examples in the job.")
    done: int = Field(description="Examples with a verdict.")
    categories: dict[Category, int] = Field(description="Verdicts per category.")
    flagged: int


class GenerationCounts(BaseModel):
    new: int = Field(description="Completions the student generated for this job.")
    cached: int = Field(description="Completions taken from the generation cache.")


class JobLinks(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    self_: str = Field(alias="self")
    examples: str
    export: str
    conflicts: str
    report: str
    report_html: str = Field(description="The report as a page for people, with charts.")


class JobRead(BaseModel):
    id: uuid.UUID
    dataset_id: uuid.UUID
    status: JobStatus
    student: Student
    config: AuditConfig
    webhook_url: str | None
    progress: Progress
    generations: GenerationCounts
    reviews: ReviewCounts = Field(description="How far people have reviewed the flagged examples.")
    rescore_of: uuid.UUID | None = Field(
        description="The job whose stored answers this one judges again; null for a job "
        "submitted afresh (or once that job is deleted)."
    )
    reviews_carried: int | None = Field(
        description="A rescore's, once it finishes: the source job's review decisions copied "
        "onto it (same example, still flagged, and an accept only where the suggestion is "
        "unchanged); null otherwise."
    )
    reviews_not_carried: int | None = Field(
        description="A rescore's, once it finishes: the source job's decisions not copied, "
        "because the example is no longer flagged or its accepted suggestion changed."
    )
    eta_seconds: float | None = Field(
        description="Estimated seconds left, from the pace so far; null unless running."
    )
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: JobLinks


class JobPage(BaseModel):
    items: list[JobRead]
    next_cursor: uuid.UUID | None = Field(description="Pass as `cursor` for the next page.")


class ExampleRead(BaseModel):
    position: int = Field(description="0-based, in upload order.")
    id: str = Field(description="The record's id (its line number when it has none).")
    line: int = Field(description="1-based line number in the uploaded file.")
    group: str | None
    record: dict[str, Any] = Field(description="The record as uploaded.")
    audit: Audit
    review: ReviewRead | None = Field(description="A person's decision on it; null when none.")


class ExamplePage(BaseModel):
    items: list[ExampleRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class ConflictPage(BaseModel):
    items: list[ConflictRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
