"""What the commands share: exit codes, `--config` parsing, error and report formatting."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from app.audit.schemas import Category, Report

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
