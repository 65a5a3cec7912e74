"""Teacher datasets: reading JSONL, validating every record, and writing answers back."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

MAX_REPORTED_ERRORS = 50


@dataclass(frozen=True)
class Example:
    """One teacher question-answer pair, as the audit sees it."""

    id: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()
    group: str | None = None

    @property
    def golds(self) -> tuple[str, ...]:
        """Every answer that counts as the teacher's: the answer, then its aliases."""
        return (self.answer, *self.aliases)


@dataclass(frozen=True)
class Record:
    """A line of the uploaded file: the object as written, and the example read from it."""

    line: int
    raw: dict[str, Any]
    example: Example


@dataclass(frozen=True)
class LineError:
    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class DatasetError(Exception):
    """The dataset is invalid; `errors` says where (the first MAX_REPORTED_ERRORS of them)."""

    errors: list[LineError] = field(default_factory=list)
    more: int = 0

    def __str__(self) -> str:
        lines = [str(e) for e in self.errors]
        if self.more:
            lines.append(f"... and {self.more} more errors")
        return "invalid dataset:\n  " + "\n  ".join(lines)


class RecordError(ValueError):
    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RecordError(key, f"must be a string, got {_kind(value)}")
    if not value.strip():
        raise RecordError(key, "must not be empty")
    return value


def _texts(obj: dict[str, Any], key: str) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise RecordError(key, f"must be a list of strings, got {_kind(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RecordError(f"{key}[{i}]", "must be a non-empty string")
    return value


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def parse_qa(obj: dict[str, Any], line: int) -> Example:
    """Read a `qa` record: question, answer or answers, optional id, group/relation, aliases."""
    question = _text(obj, "question")
    if "answer" in obj:
        answers = [_text(obj, "answer")]
    elif "answers" in obj:
        answers = _texts(obj, "answers")
        if not answers:
            raise RecordError("answers", "must hold at least one answer")
    else:
        raise RecordError("answer", "missing: give 'answer' or a non-empty 'answers' list")
    aliases = _texts(obj, "aliases") if "aliases" in obj else []
    group: str | None = None
    for key in ("group", "relation"):
        if obj.get(key) is not None:
            value = obj[key]
            if not isinstance(value, str | int):
                raise RecordError(key, f"must be a string, got {_kind(value)}")
            group = str(value)
            break
    raw_id = obj.get("id", line)
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool) or str(raw_id) == "":
        raise RecordError("id", f"must be a non-empty string or an integer, got {_kind(raw_id)}")
    return Example(
        id=str(raw_id),
        question=question,
        answer=answers[0],
        aliases=tuple(answers[1:] + aliases),
        group=group,
    )


def read_lines(chunks: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """Split a byte stream into numbered lines (1-based), keeping memory to one line."""
    line_no = 0
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            line_no += 1
            yield line_no, line
    if rest:
        yield line_no + 1, rest


def decode_line(line_no: int, data: bytes) -> dict[str, Any] | None:
    """One JSONL line as an object; None for a blank line. Raises LineError-carrying errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(None, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(None, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(None, f"must be a JSON object, got {_kind(obj)}")
    if "\\u0000" in text and _has_nul(obj):
        raise RecordError(None, "contains \\u0000, which a dataset cannot store")
    return obj


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return isinstance(value, list) and any(_has_nul(v) for v in value)


def parse_records(chunks: Iterable[bytes]) -> Iterator[Record | LineError]:
    """Every line of a JSONL stream as a Record, or a LineError saying what is wrong where."""
    seen_ids: dict[str, int] = {}
    for line_no, data in read_lines(chunks):
        try:
            obj = decode_line(line_no, data)
            if obj is None:
                continue
            example = parse_qa(obj, line_no)
        except RecordError as exc:
            yield LineError(line_no, exc.field, exc.message)
            continue
        first = seen_ids.setdefault(example.id, line_no)
        if first != line_no:
            yield LineError(line_no, "id", f"duplicate id {example.id!r} (first on line {first})")
            continue
        yield Record(line_no, obj, example)


def valid_records(
    chunks: Iterable[bytes], max_errors: int = MAX_REPORTED_ERRORS
) -> Iterator[Record]:
    """The records of a JSONL stream, checked to the last line.

    Records are yielded while every line so far is valid, so a caller can store them as they
    come; after the stream ends, DatasetError lists the invalid lines (the first `max_errors`,
    and how many more), and the caller discards what it stored. Memory holds one line.
    """
    errors: list[LineError] = []
    more = 0
    count = 0
    for item in parse_records(chunks):
        if isinstance(item, LineError):
            if len(errors) < max_errors:
                errors.append(item)
            else:
                more += 1
        else:
            count += 1
            if not errors:
                yield item
    if not errors and count == 0:
        errors.append(LineError(1, None, "the dataset is empty: no JSON records found"))
    if errors:
        raise DatasetError(errors, more)


def load_records(chunks: Iterable[bytes]) -> list[Record]:
    """All records of a dataset, or DatasetError listing the invalid lines."""
    return list(valid_records(chunks))


def with_answer(raw: dict[str, Any], answer: str) -> dict[str, Any]:
    """The record as uploaded, with its teacher answer replaced."""
    out = dict(raw)
    if "answer" in out:
        out["answer"] = answer
    else:
        out["answers"] = [answer]
    return out
