"""Audit options (every one validated, with the method's defaults), the audit object, the report."""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.students.schemas import Student


class Category(StrEnum):
    HIGHLY_KNOWN = "HighlyKnown"
    MAYBE_KNOWN = "MaybeKnown"
    WEAKLY_KNOWN = "WeaklyKnown"
    UNKNOWN = "Unknown"


class SuggestedAction(StrEnum):
    KEEP = "keep"
    RELABEL_STUDENT = "relabel_student"
    RELABEL_IDK = "relabel_idk"


Matcher = Literal["normalized_exact", "contains", "token_f1"]
Mode = Literal["adaptive", "full"]


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class PromptTemplate(BaseModel):
    """How a few-shot prompt is written: each exemplar, then the question."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exemplar: str = "Q: {question}\nA: {answer}\n\n"
    query: str = "Q: {question}\nA:"

    @field_validator("exemplar")
    @classmethod
    def _exemplar_fields(cls, value: str) -> str:
        if _fields(value) != {"question", "answer"}:
            raise ValueError("must use exactly the fields {question} and {answer}")
        return value

    @field_validator("query")
    @classmethod
    def _query_fields(cls, value: str) -> str:
        if _fields(value) != {"question"}:
            raise ValueError("must use exactly the field {question}")
        return value


class AuditConfig(BaseModel):
    """The method's options. The defaults are SliCK's (Gekhman et al. 2024)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_exemplar_sets: int = Field(10, ge=1, le=100, description="Few-shot prompts per question.")
    shots: int = Field(4, ge=0, le=32, description="Exemplars per prompt.")
    samples: int = Field(16, ge=0, le=1024, description="Sampled answers per prompt.")
    temperature: float = Field(0.5, gt=0.0, le=2.0, description="Sampling temperature.")
    top_k: int = Field(40, ge=-1, description="Top-k for samples; -1 turns it off.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling for samples.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Longest answer, in tokens.")
    matcher: Matcher = "normalized_exact"
    f1_threshold: float = Field(0.5, gt=0.0, le=1.0, description="For matcher token_f1.")
    mode: Mode = Field("adaptive", description="adaptive: same categories, fewer generations.")
    flag_categories: tuple[Category, ...] = (Category.UNKNOWN,)
    student_answer_min_agreement: float = Field(0.9, ge=0.0, le=1.0)
    idk_text: str = Field("I don't know.", min_length=1)
    seed: int = Field(0, description="Draws the exemplar sets.")
    prompt: PromptTemplate = PromptTemplate()
    chat_template: bool = Field(
        False,
        description="Wrap each few-shot prompt as one user message in the student's chat "
        "template, for chat-tuned students.",
    )

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (off) or at least 1")
        return value


class Audit(BaseModel):
    """The audit object attached to every example."""

    category: Category
    flagged: bool
    p_greedy: float
    p_sample: float | None = Field(
        description="Share of correct samples among those drawn; null when none were drawn."
    )
    student_answer: str
    agreement: float
    suggested_action: SuggestedAction
    suggested_answer: str | None
    generations: int


class ConflictRead(BaseModel):
    """An example the student answers consistently, and differently from the teacher."""

    position: int = Field(description="0-based, in upload order.")
    id: str = Field(description="The record's id (its line number when it has none).")
    question: str
    teacher_answer: str = Field(description="The answer in the dataset.")
    student_answer: str = Field(description="The student's most frequent answer.")
    agreement: float = Field(description="Share of the student's outputs equal to its answer.")
    category: Category


class GroupCounts(BaseModel):
    """One group's counts."""

    categories: dict[Category, int] = Field(description="Examples per category, 0 when none.")
    flagged: int = Field(description="Examples in a flagged category.")
    examples: int = Field(description="Examples of the group with a verdict.")


class ReportCounts(BaseModel):
    """What a report counts over the verdicts; the same whether summed in SQL or in Python."""

    num_examples: int = Field(description="Examples with a verdict.")
    categories: dict[Category, int] = Field(
        description="Examples per category; every category, 0 when none."
    )
    groups: dict[str, GroupCounts] = Field(
        description='Counts per group (the record\'s relation or topic), by name; "" holds the '
        "examples without one."
    )
    flagged: int = Field(description="Examples in a flagged category (`flag_categories`).")
    suggested_actions: dict[SuggestedAction, int] = Field(
        description="Examples per suggested action; every action, 0 when none."
    )
    conflicts: int = Field(
        description="Examples the student answers consistently and differently from the "
        "teacher (where the teacher may be wrong); listed by `/conflicts` and conflicts.jsonl."
    )
    generations_used: int = Field(
        description="Completions the verdicts rest on (the audits' `generations`), new or cached."
    )


class Report(ReportCounts):
    """A job's report: the job's API report, the page's data and `kma audit`'s report.json."""

    partial: bool = Field(
        description="True when the job did not succeed (cancelled or failed): the counts cover "
        "the examples audited before it stopped."
    )
    total: int = Field(description="Examples in the dataset.")
    generations: int = Field(description="Completions the student generated for this audit.")
    generations_cached: int = Field(description="Completions taken from the generation cache.")
    mode: Mode = Field(description="The sampling mode the audit ran in.")
    student: Student = Field(description="The model audited.")
    config: AuditConfig = Field(description="The method options the audit ran with.")
    seconds: float = Field(description="Wall-clock seconds from start to end.")
