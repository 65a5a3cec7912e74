"""Review I/O: a decision on one example or many, the review as read, the counts per job."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

from app.datasets.schemas import storable
from app.models import POSITION_MAX, Decision

MAX_ANSWER_CHARS = 100_000
MAX_NOTE_CHARS = 2_000
MAX_BATCH_ITEMS = 100_000


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Answer = Annotated[
    str,
    BeforeValidator(storable),
    AfterValidator(not_blank),
    Field(
        max_length=MAX_ANSWER_CHARS,
        description="The reviewer's answer: with `override`, and only with it.",
    ),
]
Note = Annotated[
    str,
    BeforeValidator(storable),
    Field(max_length=MAX_NOTE_CHARS, description="Why, for the next person to read."),
]


class ReviewUpdate(BaseModel):
    """A decision on one flagged example; a later one replaces it."""

    model_config = ConfigDict(extra="forbid")

    decision: Decision = Field(
        description="`accept`: the suggested relabel; `reject`: the teacher's answer stays; "
        "`override`: `answer` instead."
    )
    answer: Answer | None = Field(None, validate_default=True)
    note: Note | None = None

    @field_validator("answer")
    @classmethod
    def _answer_with_override(cls, value: str | None, info: ValidationInfo) -> str | None:
        decision = info.data.get("decision")
        if decision == Decision.OVERRIDE and value is None:
            raise ValueError("is required with decision override")
        if decision is not None and decision != Decision.OVERRIDE and value is not None:
            raise ValueError(f"goes with decision override only, not {decision.value}")
        return value


class ReviewItem(ReviewUpdate):
    position: int = Field(ge=0, le=POSITION_MAX, description="The example's, 0-based.")


class ReviewBatch(BaseModel):
    """Decisions on many examples, stored all together or not at all."""

    model_config = ConfigDict(extra="forbid")

    items: list[ReviewItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class ReviewRead(BaseModel):
    """A decision as stored, with who made it and when."""

    model_config = ConfigDict(from_attributes=True)

    decision: Decision
    answer: str | None = Field(description="The reviewer's answer, with `override`.")
    note: str | None
    reviewed_by: str = Field(description="The name of the API key the decision was made with.")
    api_key_id: uuid.UUID | None = Field(description="That key's id; null when anonymous.")
    reviewed_at: datetime


class ReviewCounts(BaseModel):
    """How far the review of a job's flagged examples has gone."""

    reviewed: int = Field(description="Flagged examples with a decision.")
    unreviewed: int = Field(description="Flagged examples without one yet.")
    decisions: dict[Decision, int] = Field(
        description="Reviewed examples per decision; every decision, 0 when none."
    )

    @classmethod
    def of(cls, flagged: int, decisions: Mapping[Decision, int]) -> ReviewCounts:
        """The counts of a job with `flagged` flagged examples and these decisions."""
        every = {decision: decisions.get(decision, 0) for decision in Decision}
        reviewed = sum(every.values())
        return cls(reviewed=reviewed, unreviewed=flagged - reviewed, decisions=every)


class ReviewBatchRead(BaseModel):
    updated: int = Field(description="Decisions stored by this request.")
    reviews: ReviewCounts = Field(description="The job's counts after it.")
