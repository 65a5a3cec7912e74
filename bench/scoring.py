"""`audit_batch` alone, with a student that answers at once: kma's own cost per generation.

Usage: .venv/bin/python bench/scoring.py [--examples 2000] [--repeats 5] [--modes full,adaptive]
                                         [--matcher normalized_exact] [--profile]

Invents a dataset of `--examples` questions in 20 groups and, for every prompt the default
AuditConfig (10 exemplar sets, 16 samples) builds, the answers a small student would give: a few
distinct strings per question, repeated, as completions come (a leading space). About a third of
the questions it knows (its greedy answers are the teacher's, give or take a spelling:
"Paris", "paris", "Paris."), some it half knows, some it finds only by sampling, about a third
it does not know (the same one or two wrong answers over and over). The engine looks the
answers up by prompt and hands out each prompt's samples in order, so every mode reads the same
table (a prompt that two exemplar sets make alike, in a small group, gets the samples of both).
Each mode is run `--repeats` times over the whole dataset as one batch; the best run is
reported, with its CPU time (on a shared machine, wall time also counts the waits for a core).
`--profile` prints cProfile's top functions of one more run per mode to stderr.

Prints a table and, as the last line of stdout, the result as JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.audit.domain import ExemplarSets, Prompt, build_prompts, draw_exemplar_sets  # noqa: E402
from app.audit.schemas import AuditConfig, Matcher  # noqa: E402
from app.datasets.domain import Example  # noqa: E402
from workers.engines.base import GenerationRequest, GenerationResult  # noqa: E402
from workers.runner import audit_batch  # noqa: E402

WORDS = (
    "Blemton",
    "Zorvania",
    "Quillhaven",
    "Marrow",
    "Tessaly",
    "Orbin",
    "Caldera",
    "Vintmoor",
    "Hask",
    "Pellucid",
    "Ardent",
    "Sorrow",
    "Gallant",
    "Fenwick",
    "Yarrow",
    "Istra",
    "Dunmore",
    "Kestrel",
    "Lumen",
    "Brackwater",
    "Osric",
    "Thane",
)


@dataclass(frozen=True)
class Answers:
    """What the student says to one prompt: its greedy answer (made once, handed out as it is)
    and every sample, in order."""

    greedy: GenerationResult
    samples: list[str]


def invent_examples(count: int, rng: random.Random) -> list[Example]:
    return [
        Example(
            id=str(i),
            question=f"What is the capital of {rng.choice(WORDS)}land number {i}?",
            answer=f"{rng.choice(WORDS)} {rng.choice(WORDS)}",
            aliases=(rng.choice(WORDS),) if i % 5 == 0 else (),
            group=f"P{i % 20}",
        )
        for i in range(count)
    ]


def invent_answers(example: Example, config: AuditConfig, rng: random.Random) -> list[Answers]:
    """Per prompt, the student's answers: a few distinct strings, each repeated."""
    right = [example.answer, example.answer.lower(), example.answer + "."]
    wrong = [f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in range(3)]
    # How often a greedy answer and a sample are right, by how well the student knows it.
    p_greedy, p_sample = rng.choice(
        [(1.0, 0.8)] * 7 + [(0.5, 0.4)] * 3 + [(0.0, 0.1)] * 3 + [(0.0, 0.0)] * 7
    )

    def say(p_right: float) -> str:
        if rng.random() < p_right:
            return " " + rng.choices(right, weights=(8, 1, 1))[0]
        return " " + rng.choices(wrong, weights=(7, 2, 1))[0]

    return [
        Answers(GenerationResult([say(p_greedy)]), [say(p_sample) for _ in range(config.samples)])
        for _ in range(config.n_exemplar_sets)
    ]


class TableEngine:
    """Answers each prompt from its table at once: the greedy answer, then the samples in
    order, as many as asked for."""

    def __init__(self, table: dict[Prompt, Answers]) -> None:
        self.model_id = "table"
        self.table = table
        self.drawn: dict[Prompt, int] = {}

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for r in requests:
            answers = self.table[r.prompt]
            if r.options.greedy:
                results.append(answers.greedy)
                continue
            start = self.drawn.get(r.prompt, 0)
            self.drawn[r.prompt] = start + r.options.n
            results.append(GenerationResult(answers.samples[start : start + r.options.n]))
        return results

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class ModeResult:
    mode: str
    examples: int
    generations: int
    engine_calls: int
    seconds: float
    generations_per_s: int
    examples_per_s: int
    cpu_seconds: float
    """This process's CPU time: what the run costs, on a machine shared with other work."""
    generations_per_cpu_s: int
    categories: dict[str, int]


@dataclass
class Result:
    matcher: str
    repeats: int
    modes: list[ModeResult]
    machine: dict[str, Any]


def run_mode(
    examples: list[Example],
    sets: ExemplarSets,
    table: dict[Prompt, Answers],
    config: AuditConfig,
    repeats: int,
    profile: bool,
) -> ModeResult:
    best = best_cpu = float("inf")
    for _ in range(repeats):
        engine = TableEngine(table)
        started, started_cpu = time.perf_counter(), time.process_time()
        batch = audit_batch(examples, sets, engine, config)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
    if profile:
        profiler = cProfile.Profile()
        profiler.runcall(audit_batch, examples, sets, TableEngine(table), config)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
        print(f"--- profile, {config.mode} mode ---\n{out.getvalue()}", file=sys.stderr)
    generations = batch.stats.greedy_generations + batch.stats.sampled_generations
    categories = Counter(v.audit.category.value for v in batch.verdicts)
    return ModeResult(
        mode=config.mode,
        examples=len(examples),
        generations=generations,
        engine_calls=batch.stats.engine_calls,
        seconds=round(best, 4),
        generations_per_s=round(generations / best),
        examples_per_s=round(len(examples) / best),
        cpu_seconds=round(best_cpu, 4),
        generations_per_cpu_s=round(generations / best_cpu),
        categories=dict(sorted(categories.items())),
    )


def table_text(result: Result) -> str:
    lines = [
        f"matcher {result.matcher}, best of {result.repeats}, "
        f"load average {result.machine['load_average'][0]:.2f}",
        "mode      examples  generations  seconds  generations/s  examples/s"
        "  cpu seconds  generations/cpu s",
    ]
    for m in result.modes:
        lines.append(
            f"{m.mode:<9} {m.examples:>8}  {m.generations:>11}  {m.seconds:>7.3f}"
            f"  {m.generations_per_s:>13,}  {m.examples_per_s:>10,}"
            f"  {m.cpu_seconds:>11.3f}  {m.generations_per_cpu_s:>17,}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="runs per mode; the best counts")
    parser.add_argument("--modes", default="full,adaptive", help="comma-separated")
    parser.add_argument("--matcher", default="normalized_exact", choices=get_args(Matcher))
    parser.add_argument("--profile", action="store_true", help="cProfile's top 15 to stderr")
    args = parser.parse_args(argv)
    if args.examples < 1 or args.repeats < 1:
        parser.error("--examples and --repeats must be at least 1")

    rng = random.Random(0)
    config = AuditConfig(matcher=args.matcher)
    examples = invent_examples(args.examples, rng)
    sets = draw_exemplar_sets(examples, config)
    table: dict[Prompt, Answers] = {}
    for example, prompts in zip(examples, build_prompts(examples, sets, config), strict=True):
        for prompt, answers in zip(prompts, invent_answers(example, config, rng), strict=True):
            if prompt in table:  # two exemplar sets that show the same shots
                table[prompt].samples.extend(answers.samples)
            else:
                table[prompt] = answers
    modes = [
        run_mode(
            examples,
            sets,
            table,
            config.model_copy(update={"mode": mode}),
            args.repeats,
            args.profile,
        )
        for mode in args.modes.split(",")
    ]
    result = Result(
        matcher=args.matcher,
        repeats=args.repeats,
        modes=modes,
        machine={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
            "date": datetime.now(UTC).date().isoformat(),
        },
    )
    print(table_text(result))
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
