"""Audit options (every one validated, with the method's defaults) and the audit object."""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
