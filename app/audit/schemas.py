"""Audit options (every one validated, with the method's defaults), the audit object, the report."""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.reviews.schemas import ReviewCounts
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


PROMPT_FIELDS = ("question", "answer")
MAX_TEMPLATE_CHARS = 4000


def template_fields(template: str) -> set[str]:
    """The fields a prompt template fills in, each a plain `{question}` or `{answer}`.

    Anything more `str.format` would do with the text (a format spec such as `{question:>9}`, a
    conversion such as `{question!r}`, attribute or index access, a positional `{}`) is refused:
    a template is data from the caller, and those can make it huge or read an object's insides.
    Literal braces are written `{{` and `}}`.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:  # an unmatched brace
        raise ValueError(f"{exc}; write a literal brace as {{{{ or }}}}") from None
    fields: set[str] = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"a positional field {{{name}}} is not allowed; name {{question}} or {{answer}}"
            )
        if name not in PROMPT_FIELDS:
            if name.split(".", 1)[0].split("[", 1)[0] in PROMPT_FIELDS:
                raise ValueError(f"attribute or index access {{{name}}} is not allowed")
            raise ValueError(f"unknown field {{{name}}}; only {{question}} and {{answer}} exist")
        if conversion is not None:
            raise ValueError(f"a conversion (!{conversion}) is not allowed on {{{name}}}")
        if spec:
            raise ValueError(f"a format spec (:{spec}) is not allowed on {{{name}}}")
        fields.add(name)
    return fields


Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]


class PromptTemplate(BaseModel):
    """How a few-shot prompt is written: each exemplar, then the question."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exemplar: Template = "Q: {question}\nA: {answer}\n\n"
    query: Template = "Q: {question}\nA:"

    @field_validator("exemplar")
    @classmethod
    def _exemplar_fields(cls, value: str) -> str:
        if template_fields(value) != {"question", "answer"}:
            raise ValueError("must use exactly the fields {question} and {answer}")
        return value

    @field_validator("query")
    @classmethod
    def _query_fields(cls, value: str) -> str:
        if template_fields(value) != {"question"}:
            raise ValueError("must use exactly the field {question}")
        return value


class JudgingOptions(BaseModel):
    """The options that judge the student's answers: changing them needs no new generation, so a
    finished job can be rescored with others (`POST /v1/jobs/{id}/rescore`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    matcher: Matcher = "normalized_exact"
    f1_threshold: float = Field(0.5, gt=0.0, le=1.0, description="For matcher token_f1.")
    flag_categories: tuple[Category, ...] = Field(
        (Category.UNKNOWN,),
        min_length=1,
        description="Categories that are flagged; no repeats.",
        json_schema_extra={"uniqueItems": True},
    )
    student_answer_min_agreement: float = Field(0.9, ge=0.0, le=1.0)
    idk_text: str = Field("I don't know.", min_length=1, max_length=1000)

    @field_validator("flag_categories")
    @classmethod
    def _unique_categories(cls, value: tuple[Category, ...]) -> tuple[Category, ...]:
        if len(set(value)) != len(value):
            raise ValueError("must not name a category twice")
        return value


class AuditConfig(JudgingOptions):
    """The method's options. The defaults are SliCK's (Gekhman et al. 2024)."""

    n_exemplar_sets: int = Field(10, ge=1, le=100, description="Few-shot prompts per question.")
    shots: int = Field(4, ge=0, le=32, description="Exemplars per prompt.")
    samples: int = Field(16, ge=0, le=1024, description="Sampled answers per prompt.")
    temperature: float = Field(0.5, gt=0.0, le=2.0, description="Sampling temperature.")
    top_k: int = Field(
        40,
        ge=-1,
        le=1000,
        description="Top-k for samples; -1 turns it off.",
        json_schema_extra={"not": {"const": 0}},
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling for samples.")
    max_new_tokens: int = Field(32, ge=1, le=512, description="Longest answer, in tokens.")
    mode: Mode = Field("adaptive", description="adaptive: same categories, fewer generations.")
    seed: int = Field(0, ge=-(2**63), le=2**63 - 1, description="Draws the exemplar sets.")
    prompt: PromptTemplate = PromptTemplate()
    chat_template: bool = Field(
        False,
        description="Ask each few-shot prompt as one user message, for chat-tuned students: "
        "rendered in the model's chat template, or sent to the server's chat endpoint (openai).",
    )

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (off) or at least 1")
        return value


JUDGING_OPTIONS: tuple[str, ...] = tuple(JudgingOptions.model_fields)
GENERATION_OPTIONS: tuple[str, ...] = tuple(
    name for name in AuditConfig.model_fields if name not in JudgingOptions.model_fields
)
"""The options that change what the student is asked or how its answers are drawn (the prompts,
the sampling, the schedule): a rescore cannot change them, its answers are the source job's."""


class RescoreOptions(JudgingOptions):
    """The judging options a rescore changes; those left out keep the source job's values (the
    defaults shown are a new job's). A generation option answers 422 at its own place, saying
    why: a rescore reuses the stored answers."""

    @model_validator(mode="before")
    @classmethod
    def _no_generation_options(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refused = [name for name in GENERATION_OPTIONS if name in data]
            if refused:
                raise ValidationError.from_exception_data(
                    cls.__name__,
                    [
                        InitErrorDetails(
                            type=PydanticCustomError(
                                "needs_generations",
                                "{name} changes the student's answers, which a rescore reuses "
                                "(it changes only " + ", ".join(JUDGING_OPTIONS) + "); submit a "
                                "new job to change it",
                                {"name": name},
                            ),
                            loc=(name,),
                            input=data[name],
                        )
                        for name in refused
                    ],
                )
        return data

    def merged(self, config: AuditConfig) -> AuditConfig:
        """`config` with the options given here in place of its own."""
        given = self.model_dump(mode="json", include=self.model_fields_set)
        return AuditConfig.model_validate({**config.model_dump(mode="json"), **given})


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
    reviews: ReviewCounts | None = Field(
        None,
        description="How many flagged examples people have reviewed, per decision, as the "
        "report is read; null where no one reviews (`kma audit`'s report.json).",
    )
