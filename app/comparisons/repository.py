"""Comparison queries: the jobs' verdicts joined on position, one alias of the verdict table a
job, every count summed in the database."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, tuple_
from sqlalchemy.orm import Session, aliased

from app.audit.schemas import Category
from app.comparisons.domain import Selection
from app.models import Example, Verdict

EXPORT_BATCH = 2000


class Joined:
    """The verdicts of the jobs (in order), one row per position: `verdicts[i]` is job i's."""

    def __init__(self, job_ids: Sequence[uuid.UUID]) -> None:
        self.job_ids = list(job_ids)
        self.verdicts = [aliased(Verdict, name=f"verdict_{i}") for i in range(len(job_ids))]

    def select(self, *columns: Any) -> Select[Any]:
        first = self.verdicts[0]
        query = select(*columns).select_from(first)
        for verdict, job_id in zip(self.verdicts[1:], self.job_ids[1:], strict=True):
            query = query.join(
                verdict, and_(verdict.job_id == job_id, verdict.position == first.position)
            )
        return query.where(first.job_id == self.job_ids[0])

    def with_examples(self, dataset_id: uuid.UUID, selection: Selection, *columns: Any) -> Any:
        """The selected positions with their examples, in upload order."""
        first = self.verdicts[0]
        return (
            self.select(*columns)
            .join(
                Example,
                and_(Example.dataset_id == dataset_id, Example.position == first.position),
            )
            .where(*self.conditions(selection))
            .order_by(first.position)
        )

    def conditions(self, selection: Selection) -> list[Any]:
        found: list[Any] = []
        for verdict, job_id in zip(self.verdicts, self.job_ids, strict=True):
            if (allowed := selection.categories.get(job_id)) is not None:
                found.append(verdict.category.in_(sorted(allowed)))
        if selection.disagree:
            found += [or_(*self.unknown()), or_(*self.known())]
        return found

    def known(self) -> list[Any]:
        return [verdict.category != Category.UNKNOWN.value for verdict in self.verdicts]

    def unknown(self) -> list[Any]:
        return [verdict.category == Category.UNKNOWN.value for verdict in self.verdicts]


@dataclass(frozen=True)
class Counts:
    cells: dict[tuple[int, int], list[tuple[Category, Category, int]]]
    """Per pair of jobs (i < j, by index): (category of i, category of j, examples)."""
    examples: int
    known_by_all: int
    known_by_none: int


def comparison_counts(session: Session, job_ids: Sequence[uuid.UUID]) -> Counts:
    """Every pair's transition cells and the examples all, none of the jobs know.

    One pass over the join, grouped by every pair at once and by nothing (GROUPING SETS): a
    row's two non-null categories say which pair it counts; the row with none counts them all.
    """
    joined = Joined(job_ids)
    columns = [verdict.category for verdict in joined.verdicts]
    pairs = list(combinations(range(len(job_ids)), 2))
    rows = session.execute(
        joined.select(
            *columns,
            func.count(),
            func.count().filter(and_(*joined.known())),
            func.count().filter(and_(*joined.unknown())),
        ).group_by(
            func.grouping_sets(*(tuple_(columns[i], columns[j]) for i, j in pairs), tuple_())
        )
    )
    cells: dict[tuple[int, int], list[tuple[Category, Category, int]]] = {p: [] for p in pairs}
    totals = (0, 0, 0)
    for *categories, count, everyone, nobody in rows:
        named = [k for k, category in enumerate(categories) if category is not None]
        if not named:
            totals = (count, everyone, nobody)
            continue
        i, j = named
        cells[i, j].append((Category(categories[i]), Category(categories[j]), count))
    return Counts(cells, *totals)


def list_examples(
    session: Session,
    dataset_id: uuid.UUID,
    job_ids: Sequence[uuid.UUID],
    selection: Selection,
    after_position: int | None,
    limit: int,
) -> Sequence[Any]:
    """The selected examples, by position: (example, audit of each job in order)."""
    joined = Joined(job_ids)
    query = joined.with_examples(
        dataset_id, selection, Example, *(verdict.audit for verdict in joined.verdicts)
    ).limit(limit)
    if after_position is not None:
        query = query.where(joined.verdicts[0].position > after_position)
    return session.execute(query).all()


def count_examples(session: Session, job_ids: Sequence[uuid.UUID], selection: Selection) -> int:
    joined = Joined(job_ids)
    query = joined.select(func.count()).where(*joined.conditions(selection))
    return session.scalar(query) or 0


def iter_records(
    session: Session, dataset_id: uuid.UUID, job_ids: Sequence[uuid.UUID], selection: Selection
) -> Iterator[dict[str, Any]]:
    """The selected examples' records as uploaded, in upload order, read in batches."""
    joined = Joined(job_ids)
    query = joined.with_examples(dataset_id, selection, Example.raw)
    yield from session.scalars(query.execution_options(yield_per=EXPORT_BATCH))
