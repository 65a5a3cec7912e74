"""The job report as an HTML page for people: charts as inline SVG, every dataset string escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from app.audit.schemas import Category
from app.jobs.schemas import JobLinks

NO_GROUP = "(no group)"
MAX_GROUPS = 500
MAX_CONFLICTS = 1000

CATEGORY_COLORS = {
    Category.HIGHLY_KNOWN: "#2e7d32",
    Category.MAYBE_KNOWN: "#7cb342",
    Category.WEAKLY_KNOWN: "#f2a900",
    Category.UNKNOWN: "#c62828",
}
CATEGORY_MEANINGS = {
    Category.HIGHLY_KNOWN: "every greedy answer correct",
    Category.MAYBE_KNOWN: "some greedy answers correct",
    Category.WEAKLY_KNOWN: "no greedy answer correct, some samples correct",
    Category.UNKNOWN: "no answer correct",
}

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _number(n: int) -> str:
    return f"{n:,}"


def _percent(share: float) -> str:
    return f"{share:.1%}"


def _whole_percent(share: float) -> str:
    return f"{share:.0%}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_templates.filters.update(
    num=_number, pct=_percent, pct0=_whole_percent, duration=_duration, when=_when
)


@dataclass(frozen=True)
class FlaggedRow:
    """A flagged example as the page's table shows it."""

    id: str
    group: str | None
    question: str
    teacher_answer: str
    student_answer: str
    agreement: float
    category: str
    suggested_action: str
    suggested_answer: str | None


@dataclass(frozen=True)
class ReportPage:
    """What the page shows: the job's stored report and its first flagged rows."""

    job_id: str
    status: str
    dataset_name: str
    finished_at: datetime | None
    report: Mapping[str, Any]
    flagged_rows: Sequence[FlaggedRow]
    flagged_total: int
    links: JobLinks


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


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def category_bars(categories: Mapping[str, int]) -> list[Bar]:
    """One bar per category, in the method's order, scaled to the largest."""
    total = sum(categories.get(c.value, 0) for c in Category)
    largest = max((categories.get(c.value, 0) for c in Category), default=0)
    return [
        Bar(
            category=c.value,
            color=CATEGORY_COLORS[c],
            meaning=CATEGORY_MEANINGS[c],
            count=categories.get(c.value, 0),
            share=_share(categories.get(c.value, 0), total),
            width=_share(categories.get(c.value, 0), largest),
        )
        for c in Category
    ]


def group_rows(groups: Mapping[str, Mapping[str, int]]) -> list[GroupRow]:
    """The groups, largest first, each with its stacked category bar."""
    rows = []
    for name, counts in groups.items():
        examples = counts.get("examples", 0)
        segments, x = [], 0.0
        for c in Category:
            n = counts.get(c.value, 0)
            width = 100 * _share(n, examples)
            if n:
                segments.append(Segment(c.value, CATEGORY_COLORS[c], n, x, width))
            x += width
        rows.append(
            GroupRow(
                name=name or NO_GROUP,
                counts={c.value: counts.get(c.value, 0) for c in Category},
                flagged=counts.get("flagged", 0),
                examples=examples,
                flagged_share=_share(counts.get("flagged", 0), examples),
                segments=segments,
            )
        )
    return sorted(rows, key=lambda row: (-row.examples, row.name))


def render(page: ReportPage) -> str:
    """The whole page, self-contained: inline CSS, SVG and script, no network."""
    report = page.report
    categories: Mapping[str, int] = report.get("categories", {})
    num_examples = int(report.get("num_examples", sum(categories.values())))
    flagged = int(report.get("flagged", page.flagged_total))
    groups = group_rows(report.get("groups", {}))
    conflicts: list[Mapping[str, Any]] = list(report.get("conflicts", []))
    student = report.get("student") or {}
    return _templates.get_template("report.html").render(
        page=page,
        categories=[c.value for c in Category],
        colors={c.value: CATEGORY_COLORS[c] for c in Category},
        bars=category_bars(categories),
        num_examples=num_examples,
        flagged=flagged,
        flagged_share=_share(flagged, num_examples),
        has_groups="groups" in report,
        groups=groups[:MAX_GROUPS],
        groups_more=max(len(groups) - MAX_GROUPS, 0),
        conflicts=conflicts[:MAX_CONFLICTS],
        conflicts_total=len(conflicts),
        flagged_more=max(page.flagged_total - len(page.flagged_rows), 0),
        student_model=student.get("model"),
        mode=report.get("mode"),
        generations=report.get("generations", report.get("generations_used")),
        generations_cached=report.get("generations_cached"),
        seconds=report.get("seconds"),
        no_group=NO_GROUP,
    )
