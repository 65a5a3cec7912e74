"""The job report as an HTML page for people: charts as inline SVG, every dataset string escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from app.audit.schemas import Category, ConflictRead, GroupCounts, Report
from app.jobs.schemas import JobLinks
from app.pages import CATEGORY_COLORS, environment, share
from app.reviews.schemas import ReviewRead

NO_GROUP = "(no group)"
MAX_GROUPS = 500

CATEGORY_MEANINGS = {
    Category.HIGHLY_KNOWN: "every greedy answer correct",
    Category.MAYBE_KNOWN: "some greedy answers correct",
    Category.WEAKLY_KNOWN: "no greedy answer correct, some samples correct",
    Category.UNKNOWN: "no answer correct",
}

_templates = environment(Path(__file__).resolve().parent / "templates")


@dataclass(frozen=True)
class FlaggedRow:
    """A flagged example as the page's table shows it, with its review."""

    position: int
    id: str
    group: str | None
    question: str
    teacher_answer: str
    student_answer: str
    agreement: float
    category: str
    suggested_action: str
    suggested_answer: str | None
    review: ReviewRead | None


@dataclass(frozen=True)
class ReportPage:
    """What the page shows: the job's report, its first flagged rows and its first conflicts."""

    job_id: str
    status: str
    dataset_name: str
    finished_at: datetime | None
    report: Report
    flagged_rows: Sequence[FlaggedRow]
    conflict_rows: Sequence[ConflictRead]
    links: JobLinks
    rescore_of: str | None = None
    """The job whose answers this one judged again, when it is a rescore."""
    rescore_of_page: str | None = None
    """That job's report page, signed as the links are."""
    reviews_carried: int | None = None


@dataclass(frozen=True)
class Bar:
    category: str
    color: str
    meaning: str
    count: int
    share: float
    width: float
    """Of the chart's full bar, 0 to 1, relative to the largest category."""


@dataclass(frozen=True)
class Segment:
    category: str
    color: str
    count: int
    x: float
    width: float
    """Both in percent of the group's examples."""


@dataclass(frozen=True)
class GroupRow:
    name: str
    counts: dict[str, int]
    flagged: int
    examples: int
    flagged_share: float
    segments: list[Segment]


def category_bars(categories: Mapping[Category, int]) -> list[Bar]:
    """One bar per category, in the method's order, scaled to the largest."""
    counts = [categories.get(c, 0) for c in Category]
    total, largest = sum(counts), max(counts, default=0)
    return [
        Bar(
            category=c.value,
            color=CATEGORY_COLORS[c],
            meaning=CATEGORY_MEANINGS[c],
            count=n,
            share=share(n, total),
            width=share(n, largest),
        )
        for c, n in zip(Category, counts, strict=True)
    ]


def group_rows(groups: Mapping[str, GroupCounts]) -> list[GroupRow]:
    """The groups, largest first, each with its stacked category bar."""
    rows = []
    for name, counts in groups.items():
        segments, x = [], 0.0
        for c in Category:
            n = counts.categories.get(c, 0)
            width = 100 * share(n, counts.examples)
            if n:
                segments.append(Segment(c.value, CATEGORY_COLORS[c], n, x, width))
            x += width
        rows.append(
            GroupRow(
                name=name or NO_GROUP,
                counts={c.value: counts.categories.get(c, 0) for c in Category},
                flagged=counts.flagged,
                examples=counts.examples,
                flagged_share=share(counts.flagged, counts.examples),
                segments=segments,
            )
        )
    return sorted(rows, key=lambda row: (-row.examples, row.name))


def render(page: ReportPage) -> str:
    """The whole page, self-contained: inline CSS, SVG and script, no network."""
    report = page.report
    groups = group_rows(report.groups)
    return _templates.get_template("report.html").render(
        page=page,
        report=report,
        categories=[c.value for c in Category],
        bars=category_bars(report.categories),
        flagged_share=share(report.flagged, report.num_examples),
        groups=groups[:MAX_GROUPS],
        groups_more=max(len(groups) - MAX_GROUPS, 0),
        flagged_more=max(report.flagged - len(page.flagged_rows), 0),
        conflicts_more=max(report.conflicts - len(page.conflict_rows), 0),
        no_group=NO_GROUP,
    )
