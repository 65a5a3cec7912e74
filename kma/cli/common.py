"""What the commands share: exit codes, `--config` parsing, error and report formatting."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from app.audit.schemas import Category, Report
from app.comparisons.domain import label
from app.comparisons.schemas import Comparison
from app.estimates.schemas import Estimate

# 2 is both a usage error and input the server refused: a pipeline treats them alike.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_SERVER = 0, 1, 2, 3, 4
EXIT_REFUSED = EXIT_USAGE


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as a dict; values are read as JSON when they parse, else as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config takes key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def format_validation_error(exc: ValidationError) -> str:
    return "\n  ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()
    )


def format_categories(report: Report) -> str:
    total = report.num_examples or 1
    rows = [f"{'category':<12} {'examples':>9} {'share':>7}"]
    for category in Category:
        count = report.categories.get(category, 0)
        rows.append(f"{category.value:<12} {count:>9} {count / total:>7.1%}")
    rows.append(f"{'flagged':<12} {report.flagged:>9} {report.flagged / total:>7.1%}")
    rows.append(f"conflicts (student consistent, teacher different): {report.conflicts}")
    rows.append(
        f"generations: {report.generations} new, {report.generations_cached} from the cache"
    )
    if report.partial:
        rows.append(f"partial: {report.num_examples} of {report.total} examples audited")
    return "\n".join(rows)


def format_comparison(comparison: Comparison) -> str:
    """The students (lettered A, B, ...) and, for each pair, its transition table."""
    labels = {job.id: label(i) for i, job in enumerate(comparison.jobs)}
    width = max(len(c.value) for c in Category) + 2
    rows = []
    for job in comparison.jobs:
        rows.append(
            f"{labels[job.id]}  {job.student.name} ({job.mode}), job {job.id}: knows "
            f"{job.known} of {comparison.num_examples}"
        )
        rows.append("   " + ", ".join(f"{c.value} {job.categories.get(c, 0)}" for c in Category))
    agreement = comparison.agreement
    rows.append(
        f"known by all {agreement.known_by_all}, by none {agreement.known_by_none}, "
        f"by some only {agreement.disagree}"
    )
    for t in comparison.transitions:
        first, second = labels[t.first], labels[t.second]
        rows += ["", f"{first} x {second} (rows: {first}, columns: {second})"]
        rows.append(" " * width + "".join(f"{c.value:>{width}}" for c in Category))
        for row in Category:
            counts = "".join(f"{t.counts[row][column]:>{width}}" for column in Category)
            rows.append(f"{row.value:<{width}}{counts}")
        known = t.known
        rows.append(
            f"known by both {known.both}, by {first} only {known.first_only}, "
            f"by {second} only {known.second_only}, by neither {known.neither}"
        )
    return "\n".join(rows)


def format_estimate(estimate: Estimate) -> str:
    """The estimate as a table: each figure at best and at worst, and the time."""
    rows = [
        f"student {estimate.student.name}, {estimate.mode} mode: {estimate.examples:,} "
        f"examples, {estimate.prompts:,} prompts",
        f"{'':<14}{'best':>12}{'worst':>12}",
    ]
    for name, bounds in (
        ("generations", estimate.generations),
        ("in the cache", estimate.cached),
        ("to generate", estimate.new),
    ):
        rows.append(f"{name:<14}{bounds.best:>12,}{bounds.worst:>12,}")
    if estimate.rate is None or estimate.seconds is None:
        rows.append("time: unknown (no job of this student has run in this workspace yet)")
    else:
        chunks = estimate.rate.chunks
        rows.append(
            f"{'seconds':<14}{estimate.seconds.best:>12,.1f}{estimate.seconds.worst:>12,.1f}"
        )
        rows.append(
            f"at {estimate.rate.generations_per_second:,.1f} generations/s, measured on "
            f"{chunks} recent chunk{'s' if chunks > 1 else ''} of this student"
        )
    return "\n".join(rows)
