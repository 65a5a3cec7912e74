"""Reviews as plain data: a person's decision on a flagged example, and what the `reviewed`
export does with examples no one has decided on yet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from app.models import Decision

Unreviewed = Literal["suggested", "drop", "keep"]
"""What the `reviewed` export writes for a flagged example without a decision: its suggested
relabel, nothing (the row is dropped), or the teacher's answer."""
UNREVIEWED: tuple[Unreviewed, ...] = get_args(Unreviewed)
DEFAULT_UNREVIEWED: Unreviewed = "suggested"


@dataclass(frozen=True)
class Review:
    """What the export needs of a decision."""

    decision: Decision
    answer: str | None
    """The reviewer's answer, with `override`."""
