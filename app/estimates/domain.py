"""What a job would take, from the method's sampling schedule alone: pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.audit.domain import samples_to_draw
from app.audit.schemas import AuditConfig


@dataclass(frozen=True)
class SampleStep:
    """One sampling request of a prompt: `n` samples, after `drawn` already drawn."""

    drawn: int
    n: int


def sampling_steps(config: AuditConfig, *, correct: bool) -> list[SampleStep]:
    """The sampling requests one prompt gets when every answer the student gives is correct
    (`correct`), or every one wrong: the schedule's two extremes.

    Full mode draws every sample either way. Adaptive mode draws none when the greedy answers
    are correct, and every round when nothing is: the rounds a job ever asks for are a prefix
    of the all-wrong ones.
    """
    steps: list[SampleStep] = []
    drawn = 0
    while more := samples_to_draw(correct, drawn, config):
        steps.append(SampleStep(drawn, more))
        drawn += more
    return steps


def generations_per_prompt(config: AuditConfig, *, correct: bool) -> int:
    """Completions one prompt takes: its greedy answer and the samples of its steps."""
    return 1 + sum(step.n for step in sampling_steps(config, correct=correct))


def sample_positions(examples: int, most: int) -> Sequence[int]:
    """Every position up to `most` examples; beyond, `most` of them spread evenly."""
    if examples <= most:
        return range(examples)
    return [i * examples // most for i in range(most)]
