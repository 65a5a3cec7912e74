"""Comparison I/O: the jobs compared, their transition tables, the examples side by side."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.audit.schemas import Category, Mode
from app.students.schemas import Student


class ComparedJob(BaseModel):
    id: uuid.UUID
    student: Student
    mode: Mode
    finished_at: datetime | None
    categories: dict[Category, int] = Field(description="Examples per category.")
    known: int = Field(description="Examples in a category other than Unknown.")
    report_html: str = Field(description="The job's own report page.")


class KnownCounts(BaseModel):
    """Examples by whether each of two students knows them (any category but Unknown)."""

    both: int
    first_only: int
    second_only: int
    neither: int


class Transition(BaseModel):
    """Two jobs' categories crossed: how many examples went from each category in the first to
    each category in the second."""

    first: uuid.UUID = Field(description="The job whose categories are the rows.")
    second: uuid.UUID = Field(description="The job whose categories are the columns.")
    counts: dict[Category, dict[Category, int]] = Field(
        description="`counts[a][b]`: examples in category a for the first job and b for the "
        "second; every category, 0 when none."
    )
    known: KnownCounts


class Agreement(BaseModel):
    known_by_all: int = Field(description="Examples every student knows.")
    known_by_none: int = Field(description="Examples no student knows (Unknown for all).")
    disagree: int = Field(description="Examples some students know and others do not.")


class ComparisonLinks(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    self_: str = Field(alias="self")
    examples: str = Field(description="The examples side by side; filtered as `export` is.")
    export: str = Field(
        description="The examples as JSONL; filter them with `known_by`, `unknown_by`, "
        "`category` and `disagree`."
    )
    report_html: str = Field(description="The comparison as a page for people.")


class Comparison(BaseModel):
    """Jobs of different students on one dataset, compared."""

    dataset_id: uuid.UUID
    num_examples: int
    jobs: list[ComparedJob] = Field(description="In the order asked for.")
    agreement: Agreement
    transitions: list[Transition] = Field(
        description="One per pair of jobs, in the order asked for: (1, 2), (1, 3), ... (2, 3)..."
    )
    links: ComparisonLinks


class StudentVerdict(BaseModel):
    """One job's verdict on an example."""

    job_id: uuid.UUID
    category: Category
    student_answer: str = Field(description="The student's most frequent answer.")
    agreement: float = Field(description="Share of the student's outputs equal to its answer.")


class ComparedExample(BaseModel):
    position: int = Field(description="0-based, in upload order.")
    id: str = Field(description="The record's id (its line number when it has none).")
    line: int = Field(description="1-based line number in the uploaded file.")
    group: str | None
    question: str
    teacher_answer: str
    verdicts: list[StudentVerdict] = Field(description="One per job, in the order asked for.")


class ComparedExamplePage(BaseModel):
    items: list[ComparedExample]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")
