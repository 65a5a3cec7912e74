"""HTML pages for people: each package's templates on the shared layout (`templates/page.html`:
the style and the scripts that sort and search tables), every dataset string escaped."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined

from app.audit.schemas import Category

LAYOUT = Path(__file__).resolve().parent / "templates"

CATEGORY_COLORS = {
    Category.HIGHLY_KNOWN: "#2e7d32",
    Category.MAYBE_KNOWN: "#7cb342",
    Category.WEAKLY_KNOWN: "#f2a900",
    Category.UNKNOWN: "#c62828",
}


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


def environment(templates: Path) -> Environment:
    """Jinja for the pages in `templates`, which extend "page.html"; `colors` (by category name)
    and the filters `num`, `pct`, `pct0`, `duration` and `when` are everywhere."""
    env = Environment(
        loader=ChoiceLoader([FileSystemLoader(templates), FileSystemLoader(LAYOUT)]),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        num=_number, pct=_percent, pct0=_whole_percent, duration=_duration, when=_when
    )
    env.globals["colors"] = {c.value: color for c, color in CATEGORY_COLORS.items()}
    return env


def share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0
