"""The hf engine's batches against a naive loop of one `generate` call per prompt.

Usage: python bench/hf_engine.py [--model tiny|shaped] [--examples 40] [--naive-examples N]
                                 [--batch-sizes 64 256 1024] [--device cuda|cpu]

Made for a GPU (the device of `--device`, by default CUDA where torch sees it), and runs on a
CPU too. The work is full mode's on the tiny student's world (`kma.tiny_student.write_dataset`,
half the facts unseen): kma's own prompts (`build_prompts`, 10 exemplar sets of 4 shots) and
options (`greedy_options`, `sample_options`: a greedy answer and 16 samples at temperature 0.5,
top-k 40, at most 32 new tokens), asked of `workers.engines.hf.HFEngine` as the runner asks
(the greedy step, then the samples), once per `--batch-sizes` value (the engine's
`batch_size`: sequences per `generate` call). The naive loop is the same engine with a batch
size of 1: one `generate` call per prompt, its `n` samples in that call, on the same questions
(or the first `--naive-examples` of them, as it is slow); the ways are compared by generations
per second.

`--model tiny` is the tiny student (built under .cache/tiny-student if missing). `--model shaped`
is a model of a real small student's shape with random weights: Qwen2-0.5B's transformer (24
layers, hidden size 896, 14 attention heads and 2 key-value heads of 64, MLP 4,864) over the
tiny student's tokenizer, which was trained locally (2,048 tokens: 0.36B parameters, where the
real one's 152k-token vocabulary makes 0.49B). It answers noise, so nearly every answer runs to
the 32-token limit: the heaviest case for the engine. Its weights are in bfloat16 on a GPU,
float32 on a CPU, where one question takes more than ten minutes on 2 cores: it is for a GPU.

Prints a table and, as the last line of stdout, the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from app.audit.domain import build_prompts, draw_exemplar_sets  # noqa: E402
from app.audit.schemas import AuditConfig  # noqa: E402
from app.datasets.domain import Example  # noqa: E402
from kma.tiny_student import ensure_student, write_dataset  # noqa: E402
from workers.engines.base import GenerationRequest  # noqa: E402
from workers.engines.hf import HFEngine  # noqa: E402
from workers.runner import greedy_options, sample_options  # noqa: E402

TINY = REPO / ".cache" / "tiny-student"
SHAPE = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
}
"""Qwen2-0.5B's transformer."""


@dataclass
class Run:
    way: str
    batch_size: int
    examples: int
    generations: int
    seconds: float
    generations_per_s: float
    new_tokens: int
    """Tokens of the answers as the tokenizer reads them back, stops cut off."""


@dataclass
class Result:
    model: str
    parameters: int
    device: str
    dtype: str
    examples: int
    config: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    speedups: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


def shaped_model(out_dir: Path) -> Path:
    """A random-weight model of `SHAPE` over the tiny student's tokenizer, saved to `out_dir`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_student(TINY))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def questions(count: int, work_dir: Path) -> list[Example]:
    """`count` questions of the tiny student's world, half of them facts it never saw."""
    path = work_dir / "dataset.jsonl"
    facts = write_dataset(path, n_trained=count - count // 2, n_unseen=count // 2)
    return [
        Example(id=str(i), question=fact.question, answer=fact.answer, group=fact.relation)
        for i, (fact, _) in enumerate(facts)
    ]


def full_mode_steps(examples: list[Example], config: AuditConfig) -> list[list[GenerationRequest]]:
    """What the runner asks in full mode: every prompt's greedy answer, then its samples."""
    prompts = [
        p
        for per in build_prompts(examples, draw_exemplar_sets(examples, config), config)
        for p in per
    ]
    return [
        [GenerationRequest(p, greedy_options(config)) for p in prompts],
        [GenerationRequest(p, sample_options(config, config.samples)) for p in prompts],
    ]


def timed(
    engine: HFEngine, way: str, batch_size: int, examples: list[Example], config: AuditConfig
) -> Run:
    engine.batch_size = batch_size
    steps = full_mode_steps(examples, config)
    if engine.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = [engine.generate(step) for step in steps]
    if engine.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    texts = [text for step in results for result in step for text in result.texts]
    new_tokens = sum(
        len(ids) for ids in engine.tokenizer(texts, add_special_tokens=False)["input_ids"]
    )
    return Run(
        way, batch_size, len(examples), len(texts), seconds, len(texts) / seconds, new_tokens
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "shaped"], default="tiny")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument(
        "--naive-examples", type=int, help="questions for the naive loop (default: all)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    config = AuditConfig(mode="full", seed=0)
    with tempfile.TemporaryDirectory(prefix="kma-hf-bench-") as tmp:
        work_dir = Path(tmp)
        model_dir = (
            ensure_student(TINY) if args.model == "tiny" else shaped_model(work_dir / "model")
        )
        engine = HFEngine(str(model_dir), device=args.device)
        if args.device != "cpu" and args.model == "shaped":
            engine.model.to(torch.bfloat16)
        examples = questions(args.examples, work_dir)
        result = Result(
            model=args.model,
            parameters=sum(p.numel() for p in engine.model.parameters()),
            device=torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or "cpu",
            dtype=str(next(engine.model.parameters()).dtype),
            examples=args.examples,
            config=config.model_dump(
                include={"n_exemplar_sets", "shots", "samples", "max_new_tokens"}
            ),
            machine={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "date": datetime.now(UTC).date().isoformat(),
            },
        )
        timed(engine, "warm-up", args.batch_sizes[0], examples[:2], config)
        for batch_size in args.batch_sizes:
            result.runs.append(timed(engine, "hf engine", batch_size, examples, config))
        naive = timed(engine, "naive loop", 1, examples[: args.naive_examples], config)  # None: all
        result.runs.append(naive)
        for run in result.runs[:-1]:
            result.speedups[f"batch {run.batch_size}"] = (
                run.generations_per_s / naive.generations_per_s
            )
        engine.close()

    print(
        f"{result.model} ({result.parameters / 1e6:,.1f}M parameters, {result.dtype}) "
        f"on {result.device}"
    )
    print(
        f"{'way':<12} {'batch':>6} {'examples':>9} {'gens':>7} {'s':>8} {'gen/s':>9} {'tokens':>8}"
    )
    for run in result.runs:
        print(
            f"{run.way:<12} {run.batch_size:>6} {run.examples:>9} {run.generations:>7} "
            f"{run.seconds:>8.1f} {run.generations_per_s:>9.1f} {run.new_tokens:>8}"
        )
    for name, speedup in result.speedups.items():
        print(f"{name} / naive loop: {speedup:.1f}x")
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
