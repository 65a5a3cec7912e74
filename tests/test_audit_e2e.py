"""`kma audit` end to end: the tiny student, a dataset of facts it knows and facts it never saw.

On both engines (transformers and vLLM on this CPU): trained facts come out unflagged, unseen
facts come out Unknown, adaptive mode uses at most 60% of full mode's generations, and the two
engines' greedy answers agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.audit.domain import build_prompts, clean_answer, draw_exemplar_sets
from app.audit.schemas import AuditConfig, Report
from app.students.schemas import Student
from kma.tiny_student import Fact, write_dataset
from workers.engines.base import Engine, GenerationRequest, GenerationResult
from workers.local_audit import audit_file, read_dataset
from workers.runner import greedy_options

pytestmark = pytest.mark.slow

N_TRAINED, N_UNSEEN = 60, 40


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[Fact, bool]]]:
    path = tmp_path_factory.mktemp("world") / "teacher.jsonl"
    return path, write_dataset(path, n_trained=N_TRAINED, n_unseen=N_UNSEEN)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_audit(out: Path, facts: list[tuple[Fact, bool]]) -> Report:
    """The audit's verdicts match what the student was taught; returns the report."""
    annotated = read_jsonl(out / "annotated.jsonl")
    assert [r["id"] for r in annotated] == [f.id for f, _ in facts]
    trained = [r["audit"] for r, (_, seen) in zip(annotated, facts, strict=True) if seen]
    unseen = [r["audit"] for r, (_, seen) in zip(annotated, facts, strict=True) if not seen]
    kept = sum(not a["flagged"] for a in trained) / len(trained)
    unknown = sum(a["category"] == "Unknown" for a in unseen) / len(unseen)
    assert kept >= 0.95, f"only {kept:.0%} of trained facts unflagged"
    assert unknown >= 0.95, f"only {unknown:.0%} of unseen facts Unknown"

    filtered = read_jsonl(out / "filtered.jsonl")
    assert len(filtered) == len(annotated)  # `suggested` replaces, it does not drop
    for row, out_row in zip(annotated, filtered, strict=True):
        audit = row.pop("audit")
        expected = audit["suggested_answer"] if audit["flagged"] else row["answer"]
        assert out_row == {**row, "answer": expected}

    report = Report.model_validate_json((out / "report.json").read_text())
    assert not report.partial
    assert report.num_examples == report.total == len(facts)
    assert sum(report.categories.values()) == len(facts)
    assert report.flagged == sum(a["flagged"] for a in trained + unseen)
    assert report.generations == sum(r["generations"] for r in [*trained, *unseen])
    assert report.generations == report.generations_used

    conflicts = read_jsonl(out / "conflicts.jsonl")
    assert len(conflicts) == report.conflicts
    ids = [r["id"] for r in annotated]
    assert all(ids[c["position"]] == c["id"] for c in conflicts)
    return report


class CountingEngine:
    """The engine, counting its calls."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.model_id, self.calls = engine, engine.model_id, 0

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls += 1
        return self.engine.generate(requests)

    def close(self) -> None:
        pass


def run_audits(
    engine: Engine, engine_name: str, dataset: Path, out: Path
) -> tuple[tuple[Report, int], tuple[Report, int]]:
    """Each mode's report and engine calls."""
    records = read_dataset(dataset)
    student = Student.model_validate({"model": engine.model_id, "engine": engine_name})
    runs = []
    for mode in ("adaptive", "full"):
        counting = CountingEngine(engine)
        report = audit_file(records, counting, AuditConfig(mode=mode), out / mode, student=student)
        runs.append((report, counting.calls))
    return runs[0], runs[1]


def check_modes(
    adaptive: tuple[Report, int],
    full: tuple[Report, int],
    out: Path,
    facts: list[tuple[Fact, bool]],
) -> None:
    check_audit(out / "adaptive", facts)
    check_audit(out / "full", facts)
    assert adaptive[0].generations <= 0.6 * full[0].generations
    assert full[0].generations == len(facts) * 10 * (1 + 16)
    # One batch of 100 examples: one greedy call, then one call per sampling round.
    assert adaptive[1] <= 4
    assert full[1] == 2


def test_kma_audit_command_on_hf(
    student_dir: Path, dataset: tuple[Path, list[tuple[Fact, bool]]], tmp_path: Path
) -> None:
    path, facts = dataset
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "kma.cli", "audit", str(path), "--student", str(student_dir),
         "--engine", "hf", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "auditing: 100%" in result.stderr  # the progress bar
    assert "Unknown" in result.stderr  # the category table
    report = check_audit(out, facts)
    assert report.student == Student(name=str(student_dir), model=str(student_dir), engine="hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "annotated.jsonl",
        "conflicts.jsonl",
        "filtered.jsonl",
        "report.json",
    ]


@pytest.fixture(scope="module")
def hf_engine(student_dir: Path) -> Iterator[Engine]:
    from workers.engines.hf import HFEngine

    engine = HFEngine(str(student_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def vllm_engine(student_dir: Path) -> Iterator[Engine]:
    pytest.importorskip("vllm", reason="vLLM is installed by scripts/test")
    from workers.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(student_dir), max_model_len=512)
    yield engine
    engine.close()


def test_hf_engine_adaptive_and_full(
    hf_engine: Engine, dataset: tuple[Path, list[tuple[Fact, bool]]], tmp_path: Path
) -> None:
    path, facts = dataset
    adaptive, full = run_audits(hf_engine, "hf", path, tmp_path)
    check_modes(adaptive, full, tmp_path, facts)


@pytest.mark.vllm
def test_vllm_engine_adaptive_and_full(
    vllm_engine: Engine, dataset: tuple[Path, list[tuple[Fact, bool]]], tmp_path: Path
) -> None:
    path, facts = dataset
    adaptive, full = run_audits(vllm_engine, "vllm", path, tmp_path)
    check_modes(adaptive, full, tmp_path, facts)


@pytest.mark.vllm
def test_engines_agree_on_greedy_answers(
    hf_engine: Engine, vllm_engine: Engine, dataset: tuple[Path, list[tuple[Fact, bool]]]
) -> None:
    path, _ = dataset
    config = AuditConfig()
    examples = [r.example for r in read_dataset(path)]
    sets = draw_exemplar_sets(examples, config)
    requests = [
        GenerationRequest(prompt, greedy_options(config))
        for prompts in build_prompts(examples, sets, config)
        for prompt in prompts
    ]
    hf = [clean_answer(r.texts[0]) for r in hf_engine.generate(requests)]
    vllm = [clean_answer(r.texts[0]) for r in vllm_engine.generate(requests)]
    agree = sum(a == b for a, b in zip(hf, vllm, strict=True)) / len(requests)
    assert len(requests) == 1000
    assert agree >= 0.95, f"greedy answers agree on {agree:.1%} of prompts"
