"""Job I/O: the submission, the job as polled, its examples page."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from app.audit.schemas import Audit, AuditConfig, Category
from app.models import JobStatus


class Student(BaseModel):
    """The model under audit."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="A Hugging Face model id or a local directory.")
    engine: Literal["auto", "hf", "vllm", "openai"] = Field(
        "auto",
        description="auto: vllm where it imports and a GPU is present, else hf. openai: an "
        "OpenAI-compatible completions server serving `model` (`vllm serve`, SGLang, ...).",
    )
    revision: str | None = Field(None, description="A model revision (branch, tag or commit).")
    base_url: HttpUrl | None = Field(
        None,
        description="The openai engine's server, e.g. http://host:8000/v1; "
        "unset: the worker's KMA_OPENAI_BASE_URL.",
    )

    @model_validator(mode="after")
    def base_url_only_for_openai(self) -> Student:
        if self.base_url is not None and self.engine != "openai":
            raise ValueError("base_url is for the openai engine")
        return self


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: uuid.UUID
    student: Student
    config: AuditConfig = Field(
        default_factory=AuditConfig, description="Method options; omitted ones take defaults."
    )
    webhook_url: HttpUrl | None = Field(None, description="Called when the job finishes.")


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


class ExamplePage(BaseModel):
    items: list[ExampleRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
