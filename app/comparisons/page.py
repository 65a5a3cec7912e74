"""The comparison as an HTML page for people: the students' categories, each pair's transition
table shaded by count, and the examples they disagree on, every dataset string escaped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.audit.schemas import Category
from app.comparisons.domain import label
from app.comparisons.schemas import ComparedExample, Comparison, Transition
from app.pages import environment, share

_templates = environment(Path(__file__).resolve().parent / "templates")


@dataclass(frozen=True)
class ComparisonPage:
    dataset_name: str
    comparison: Comparison
    disagreements: Sequence[ComparedExample]
    """The first examples some students know and others do not."""


@dataclass(frozen=True)
class Table:
    """A transition table as the page draws it: the pair's labels and each cell's shade."""

    first: str
    second: str
    transition: Transition
    shades: dict[Category, dict[Category, float]]
    """Per cell, 0 to 1: its count relative to the table's largest."""


def tables(comparison: Comparison) -> list[Table]:
    labels = {job.id: label(i) for i, job in enumerate(comparison.jobs)}
    found = []
    for t in comparison.transitions:
        largest = max(n for row in t.counts.values() for n in row.values())
        shades = {
            row: {column: share(n, largest) for column, n in counts.items()}
            for row, counts in t.counts.items()
        }
        found.append(Table(labels[t.first], labels[t.second], t, shades))
    return found


def render(page: ComparisonPage) -> str:
    """The whole page, self-contained: inline CSS and script, no network."""
    comparison = page.comparison
    return _templates.get_template("comparison.html").render(
        page=page,
        comparison=comparison,
        jobs=[(label(i), job) for i, job in enumerate(comparison.jobs)],
        categories=[c.value for c in Category],
        tables=tables(comparison),
        export=comparison.links.export,
        examples=comparison.links.examples,
        disagreements_more=max(comparison.agreement.disagree - len(page.disagreements), 0),
        share=share,
    )
