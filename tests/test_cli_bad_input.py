"""`kma audit` on bad input: a message naming the line, a non-zero exit, no output written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD = b'{"question": "What is the capital of Zorvania?", "answer": "Blemton"}\n'


def kma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kma.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GOOD + b'{"question": "Who?", "answer": "x"\n', "line 2: not valid JSON"),
        (GOOD + GOOD.replace(b'"answer"', b'"anwser"'), "line 2, field 'answer': missing"),
        (b"", "line 1: the dataset is empty"),
        (GOOD + b'{"question": "Caf\xe9?", "answer": "x"}\n', "line 2: not valid UTF-8"),
    ],
    ids=["broken-json", "missing-answer", "empty-file", "non-utf8"],
)
def test_bad_input_names_the_line_and_writes_nothing(
    tmp_path: Path, content: bytes, message: str
) -> None:
    dataset = tmp_path / "teacher.jsonl"
    dataset.write_bytes(content)
    out = tmp_path / "out"
    result = kma("audit", str(dataset), "--student", "no-model-needed", "--out", str(out))
    assert result.returncode == 2
    assert message in result.stderr
    assert not out.exists()


def test_bad_config_is_refused_before_anything_runs(tmp_path: Path) -> None:
    dataset = tmp_path / "teacher.jsonl"
    dataset.write_bytes(GOOD)
    result = kma(
        "audit", str(dataset), "--student", "x", "--out", str(tmp_path / "o"),
        "--config", "samples=-3", "--config", "matcher=fuzzy",
    )  # fmt: skip
    assert result.returncode == 2
    assert "samples: Input should be greater than or equal to 0" in result.stderr
    assert "matcher: Input should be" in result.stderr
    assert not (tmp_path / "o").exists()


def test_missing_file(tmp_path: Path) -> None:
    result = kma("audit", str(tmp_path / "nope.jsonl"), "--student", "x", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
