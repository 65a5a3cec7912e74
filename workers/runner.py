"""Audits a batch of examples against an engine: greedy answers first, then sampling rounds.

Each step asks the engine for the whole batch at once (in calls of at most `call_generations`
completions), so the calls per batch do not grow with its size. Between calls the runner asks
`checkpoint`, which raises to stop it (a cancelled job, a lost lease). The rules (what to draw,
how to judge) are the pure ones in `app.audit.domain`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from app.audit.domain import (
    AnswerKey,
    ExemplarSets,
    Tally,
    Verdict,
    build_prompts,
    clean_answer,
    judge,
    samples_to_draw,
)
from app.audit.schemas import AuditConfig
from app.datasets.domain import Example
from workers.engines.base import (
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)


@dataclass
class RunStats:
    greedy_generations: int = 0
    sampled_generations: int = 0
    engine_calls: int = 0
    engine_seconds: float = 0.0
    steps: list[int] = field(default_factory=list)
    """Requests sent at each step (greedy, then each sampling round)."""

    def add(self, other: RunStats) -> None:
        self.greedy_generations += other.greedy_generations
        self.sampled_generations += other.sampled_generations
        self.engine_calls += other.engine_calls
        self.engine_seconds += other.engine_seconds
        self.steps += other.steps

    def call(
        self,
        engine: Engine,
        requests: list[GenerationRequest],
        call_generations: int,
        checkpoint: Callable[[], None],
    ) -> list[GenerationResult]:
        """One step: engine calls of at most `call_generations` completions, timed and counted."""
        results: list[GenerationResult] = []
        for part in _slices(requests, call_generations):
            checkpoint()
            started = time.perf_counter()
            results += engine.generate(part)
            self.engine_seconds += time.perf_counter() - started
            self.engine_calls += 1
        if requests:
            self.steps.append(len(requests))
        return results


class TimedEngine:
    """An engine that counts its calls and adds up the seconds they take: the model's busy
    time, where the runner's own timing (`RunStats`) also holds the generation cache's."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model_id = engine.model_id
        self.calls = 0
        self.seconds = 0.0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        started = time.perf_counter()
        self.calls += 1
        try:
            return self.engine.generate(requests)
        finally:
            self.seconds += time.perf_counter() - started

    def close(self) -> None:
        self.engine.close()


def _slices(requests: list[GenerationRequest], generations: int) -> list[list[GenerationRequest]]:
    """Consecutive runs of requests asking for at most `generations` completions each (a single
    request asking for more is a run of its own)."""
    parts: list[list[GenerationRequest]] = []
    size = 0
    for request in requests:
        if not parts or size + request.options.n > generations:
            parts.append([])
            size = 0
        parts[-1].append(request)
        size += request.options.n
    return parts


def never_stop() -> None:
    """A checkpoint that lets the run go on."""


@dataclass
class BatchResult:
    tallies: list[Tally]
    verdicts: list[Verdict]
    stats: RunStats


def greedy_options(config: AuditConfig) -> SamplingOptions:
    return SamplingOptions(
        n=1,
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        max_tokens=config.max_new_tokens,
    )


def sample_options(config: AuditConfig, n: int) -> SamplingOptions:
    return SamplingOptions(
        n=n,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        max_tokens=config.max_new_tokens,
    )


def audit_batch(
    examples: Sequence[Example],
    sets: ExemplarSets,
    engine: Engine,
    config: AuditConfig,
    *,
    call_generations: int = 1 << 30,
    checkpoint: Callable[[], None] = never_stop,
) -> BatchResult:
    """Generate what the schedule needs for these examples and judge each one."""
    stats = RunStats()
    prompts = build_prompts(examples, sets, config)
    greedy = greedy_options(config)
    requests = [GenerationRequest(p, greedy) for per_example in prompts for p in per_example]
    results = iter(stats.call(engine, requests, call_generations, checkpoint))
    stats.greedy_generations += len(requests)
    tallies = [Tally([clean_answer(next(results).texts[0]) for _ in ps]) for ps in prompts]
    keys = [AnswerKey(ex.golds, config) for ex in examples]
    found = [key.any_match(tally.greedy) for key, tally in zip(keys, tallies, strict=True)]

    unsettled = list(range(len(examples)))
    while True:
        wanted: list[tuple[int, int, int]] = []  # example, samples drawn so far, more to draw
        for i in unsettled:
            drawn = tallies[i].drawn
            if more := samples_to_draw(found[i], drawn, config):
                wanted.append((i, drawn, more))
        if not wanted:
            break
        options = {more: sample_options(config, more) for _, _, more in wanted}
        requests = [
            GenerationRequest(p, options[more]) for i, drawn, more in wanted for p in prompts[i]
        ]
        results = iter(stats.call(engine, requests, call_generations, checkpoint))
        for i, drawn, more in wanted:
            rows = tallies[i].samples
            for row in rows:
                texts = next(results).texts
                if len(texts) != more:
                    raise RuntimeError(f"engine returned {len(texts)} samples, asked for {more}")
                row.extend(map(clean_answer, texts))
            stats.sampled_generations += more * len(rows)
            # A correct answer only matters while there are samples left to draw.
            if not found[i] and drawn + more < config.samples:
                found[i] = keys[i].any_match(
                    itertools.chain.from_iterable(row[drawn:] for row in rows)
                )
        # An example the schedule leaves out once is settled for good.
        unsettled = [i for i, _, _ in wanted]

    verdicts = [judge(ex, t, config) for ex, t in zip(examples, tallies, strict=True)]
    return BatchResult(tallies, verdicts, stats)
