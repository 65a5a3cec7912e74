"""The rules of a comparison as pure functions: what "known" means, which examples a filter
keeps, a transition table from its cells."""

from __future__ import annotations

import string
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from app.audit.schemas import Category
from app.comparisons.schemas import KnownCounts, Transition

KNOWN = frozenset({Category.HIGHLY_KNOWN, Category.MAYBE_KNOWN, Category.WEAKLY_KNOWN})
"""A student knows an example when any of its answers is correct: every category but Unknown."""
UNKNOWN = frozenset({Category.UNKNOWN})


def label(index: int) -> str:
    """A, B, C, ... for the jobs compared, in the order they were named."""
    return string.ascii_uppercase[index]


@dataclass(frozen=True)
class Selection:
    """Which examples of a comparison to list or export."""

    categories: Mapping[uuid.UUID, frozenset[Category]] = field(default_factory=dict)
    """Per job named: the categories its verdict must be in. Jobs not named: any."""
    disagree: bool = False
    """Only examples some students know and others do not."""


def selection(
    known_by: Iterable[uuid.UUID] = (),
    unknown_by: Iterable[uuid.UUID] = (),
    categories: Iterable[tuple[uuid.UUID, frozenset[Category]]] = (),
    disagree: bool = False,
) -> Selection:
    """The examples meeting every condition: known by each job of `known_by`, unknown to each
    of `unknown_by`, in one of the categories given for a job. Conditions on one job add up:
    `known_by` with `category=...:Unknown` keeps nothing."""
    allowed: dict[uuid.UUID, frozenset[Category]] = {}
    conditions = [(job_id, KNOWN) for job_id in known_by]
    conditions += [(job_id, UNKNOWN) for job_id in unknown_by]
    conditions += list(categories)
    for job_id, kept in conditions:
        allowed[job_id] = allowed.get(job_id, frozenset(Category)) & kept
    return Selection(allowed, disagree)


def transition(
    first: uuid.UUID, second: uuid.UUID, cells: Iterable[tuple[Category, Category, int]]
) -> Transition:
    """The table of two jobs from its non-empty cells: (first's category, second's, count)."""
    counts = {row: dict.fromkeys(Category, 0) for row in Category}
    for row, column, n in cells:
        counts[row][column] += n

    def total(rows: frozenset[Category], columns: frozenset[Category]) -> int:
        return sum(counts[row][column] for row in rows for column in columns)

    return Transition(
        first=first,
        second=second,
        counts=counts,
        known=KnownCounts(
            both=total(KNOWN, KNOWN),
            first_only=total(KNOWN, UNKNOWN),
            second_only=total(UNKNOWN, KNOWN),
            neither=total(UNKNOWN, UNKNOWN),
        ),
    )
