"""Teacher datasets: reading JSONL in any record format, validating it, writing answers back."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

MAX_REPORTED_ERRORS = 50
MAX_LINE_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
MAX_EXAMPLES = 10_000_000

RecordFormat = Literal["qa", "messages", "alpaca", "sharegpt"]
RECORD_FORMATS: tuple[str, ...] = get_args(RecordFormat)
AUTO = "auto"
"""The format name that asks for detection: the first record's format is the file's."""


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
    """A line of the uploaded file: the object as written, the example read from it, its format."""

    line: int
    raw: dict[str, Any]
    example: Example
    format: str


@dataclass(frozen=True)
class Limits:
    """What one dataset may hold; the service's come from `KMA_MAX_*` settings."""

    line_bytes: int = MAX_LINE_BYTES
    json_depth: int = MAX_JSON_DEPTH
    examples: int = MAX_EXAMPLES


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


def _text(obj: dict[str, Any], key: str, at: str = "") -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise RecordError(at + key, f"must be a string, got {_kind(value)}")
    if not value.strip():
        raise RecordError(at + key, "must not be empty")
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


# --- record formats ---------------------------------------------------------------------------
# Each format says where its question and answer are; id, group/relation and aliases are read
# the same way in every format, and every other key is kept as uploaded.


def _read_qa(obj: dict[str, Any]) -> tuple[str, list[str]]:
    question = _text(obj, "question")
    if "answer" in obj:
        return question, [_text(obj, "answer")]
    if "answers" in obj:
        answers = _texts(obj, "answers")
        if not answers:
            raise RecordError("answers", "must hold at least one answer")
        return question, answers
    raise RecordError("answer", "missing: give 'answer' or a non-empty 'answers' list")


def _write_qa(out: dict[str, Any], answer: str) -> None:
    if "answer" in out:
        out["answer"] = answer
    else:
        out["answers"] = [answer]


def _read_alpaca(obj: dict[str, Any]) -> tuple[str, list[str]]:
    question = _text(obj, "instruction")
    extra = obj.get("input", "")
    if not isinstance(extra, str):
        raise RecordError("input", f"must be a string, got {_kind(extra)}")
    if extra.strip():
        question += "\n\n" + extra
    return question, [_text(obj, "output")]


def _write_alpaca(out: dict[str, Any], answer: str) -> None:
    out["output"] = answer


@dataclass(frozen=True)
class _Dialogue:
    """A chat format: a list of turns, each naming its speaker and holding its text."""

    turns: str
    speaker: str
    text: str
    asker: str
    answerer: str
    speakers: tuple[str, ...]

    def exchange(self, obj: dict[str, Any]) -> tuple[int, int]:
        """Where the question and the answer are: the last asker turn, the last answerer turn.

        The answer must come after the question: a conversation that ends on a question has no
        answer to audit.
        """
        turns = obj.get(self.turns)
        if not isinstance(turns, list) or not turns:
            raise RecordError(self.turns, f"must be a non-empty list of turns, got {_kind(turns)}")
        question = answer = -1
        for i, turn in enumerate(turns):
            at = f"{self.turns}[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(at, f"must be an object, got {_kind(turn)}")
            speaker = turn.get(self.speaker)
            if speaker not in self.speakers:
                raise RecordError(
                    f"{at}.{self.speaker}",
                    f"must be one of {', '.join(self.speakers)}, got {speaker!r}",
                )
            _text(turn, self.text, at + ".")
            if speaker == self.asker:
                question = i
            elif speaker == self.answerer:
                answer = i
        if question < 0:
            raise RecordError(self.turns, f"has no {self.asker} turn: no question to audit")
        if answer < question:
            raise RecordError(
                self.turns, f"has no {self.answerer} turn after the last {self.asker} turn"
            )
        return question, answer

    def read(self, obj: dict[str, Any]) -> tuple[str, list[str]]:
        question, answer = self.exchange(obj)
        turns = obj[self.turns]
        return turns[question][self.text], [turns[answer][self.text]]

    def write(self, out: dict[str, Any], answer: str) -> None:
        at = self.exchange(out)[1]
        turns = list(out[self.turns])
        turns[at] = {**turns[at], self.text: answer}
        out[self.turns] = turns


_MESSAGES = _Dialogue(
    "messages", "role", "content", "user", "assistant", ("system", "user", "assistant")
)
_SHAREGPT = _Dialogue("conversations", "from", "value", "human", "gpt", ("system", "human", "gpt"))


@dataclass(frozen=True)
class _Format:
    marker: str
    """The key that only this format's records have: what detection looks for."""
    read: Callable[[dict[str, Any]], tuple[str, list[str]]]
    """The question and the answers (the first is the answer, the rest count as aliases)."""
    write: Callable[[dict[str, Any], str], None]
    """Put a new answer in the answer's place of a copy of the record."""


_FORMATS: dict[str, _Format] = {
    "qa": _Format("question", _read_qa, _write_qa),
    "messages": _Format("messages", _MESSAGES.read, _MESSAGES.write),
    "alpaca": _Format("instruction", _read_alpaca, _write_alpaca),
    "sharegpt": _Format("conversations", _SHAREGPT.read, _SHAREGPT.write),
}


def _rules(format: str) -> _Format:
    try:
        return _FORMATS[format]
    except KeyError:
        raise ValueError(
            f"unknown record format {format!r}; known: {', '.join(RECORD_FORMATS)}"
        ) from None


def _marked(obj: dict[str, Any]) -> list[str]:
    return [name for name, rules in _FORMATS.items() if rules.marker in obj]


def detect_format(obj: dict[str, Any]) -> str:
    """The one format the record's keys say it is; RecordError when none or several fit."""
    found = _marked(obj)
    if len(found) == 1:
        return found[0]
    if not found:
        markers = ", ".join(f"'{r.marker}' ({name})" for name, r in _FORMATS.items())
        raise RecordError(None, f"matches no record format: expected one of {markers}")
    keys = " and ".join(f"'{_FORMATS[name].marker}'" for name in found)
    raise RecordError(
        None, f"is ambiguous: it has {keys} ({', '.join(found)}); name the format to use"
    )


def parse_record(format: str, obj: dict[str, Any], line: int) -> Example:
    """Read a record of the named format; its id is its `id`, else its line number."""
    question, answers = _rules(format).read(obj)
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


def with_answer(format: str, raw: dict[str, Any], answer: str) -> dict[str, Any]:
    """A copy of the record with only its answer replaced; key order and the rest as uploaded.

    qa: `answer` (or `answers`, which becomes `[answer]`); messages: the last assistant turn's
    `content`; alpaca: `output`; sharegpt: the last `gpt` turn's `value`.
    """
    out = dict(raw)
    _rules(format).write(out, answer)
    return out


def read_lines(
    chunks: Iterable[bytes], max_line_bytes: int = MAX_LINE_BYTES
) -> Iterator[tuple[int, bytes]]:
    """Split a byte stream into numbered lines (1-based), keeping memory to one line.

    A line longer than `max_line_bytes` comes cut to its first `max_line_bytes + 1` bytes, the
    rest dropped as it streams past: the reader sees it is too long without holding it.
    """
    line_no = 0
    rest = b""
    cut = False  # `rest` is the start of a line too long; its bytes up to the newline are dropped
    for chunk in chunks:
        if cut:
            end = chunk.find(b"\n")
            if end < 0:
                continue
            line_no += 1
            yield line_no, rest
            rest, cut, chunk = b"", False, chunk[end + 1 :]
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            line_no += 1
            yield line_no, line[: max_line_bytes + 1]
        if len(rest) > max_line_bytes:
            rest, cut = rest[: max_line_bytes + 1], True
    if rest:
        yield line_no + 1, rest


_INT_LIMIT = 1 << 63
"""Integers must lie in [-2**63, 2**63): what a 64-bit integer holds, and far beyond any id."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_SUSPECT = re.compile(r"\\u(?:0000|[dD][89a-fA-F])|NaN|Infinity|\d{19}|[eE][+-]?\d{3}")
"""Where check_values may find something, the line has one of these (or more brackets than the
depth allows): an escaped NUL or surrogate, NaN or Infinity, or a number long enough to overflow."""
_MAX_FIELD_NAME = 64


def _parse_int(text: str) -> int:
    # int() of thousands of digits is slow, and refused past 4,300: any that long is out of range.
    return int(text) if len(text) <= 20 else _INT_LIMIT


_JSON = json.JSONDecoder(parse_int=_parse_int)


def unstorable_text(text: str) -> str | None:
    """Why the text cannot be stored, if it cannot: a NUL, or half of a surrogate pair."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "contains \\u0000, which a dataset cannot store"
    return f"contains a lone surrogate (\\u{ord(found.group()):04x}), which is not text"


def decode_line(
    line_no: int, data: bytes, max_line_bytes: int = MAX_LINE_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any] | None:
    """One JSONL line as an object; None for a blank line. Raises LineError-carrying errors."""
    if len(data) > max_line_bytes:
        raise RecordError(None, f"longer than {max_line_bytes} bytes, the most a line may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(None, f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
    if not text.strip():
        return None
    try:
        obj = _JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise RecordError(None, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise RecordError(None, f"nests deeper than {max_depth} levels") from None
    if not isinstance(obj, dict):
        raise RecordError(None, f"must be a JSON object, got {_kind(obj)}")
    # The walk costs more than the parse: it runs only where the text says it may find something.
    if _SUSPECT.search(text) or text.count("{") + text.count("[") > max_depth:
        check_values(obj, max_depth)
    return obj


def check_values(obj: dict[str, Any], max_depth: int = MAX_JSON_DEPTH) -> None:
    """RecordError naming the first field (say `messages[3].content`) a dataset cannot hold.

    That is text with a NUL or a lone surrogate (a value or a key, at any depth), a number that
    is not finite (`NaN`, `Infinity`, `1e999`) or an integer beyond 64 bits, and objects or lists
    nested deeper than `max_depth`. The walk keeps its own stack, so no depth exhausts Python's.
    """
    stack: list[tuple[str | None, str | int | None, object, int]] = [(None, None, obj, 1)]
    while stack:
        parent, step, value, depth = stack.pop()
        if isinstance(step, str) and (problem := unstorable_text(step)):
            name = step.encode("unicode_escape").decode("ascii")
            raise RecordError(_field(parent, name), f"its name {problem}")
        problem = None
        if isinstance(value, str):
            problem = unstorable_text(value)
        elif isinstance(value, float):
            if not math.isfinite(value):
                problem = "must be a finite number (JSON has no NaN or Infinity; 1e999 overflows)"
        elif isinstance(value, int):
            if not -_INT_LIMIT <= value < _INT_LIMIT:
                problem = "must be an integer within 64 bits (-2**63 to 2**63 - 1)"
        elif isinstance(value, dict | list):
            at = parent if step is None else _field(parent, step)
            if depth > max_depth:
                raise RecordError(at, f"nests deeper than {max_depth} levels")
            if isinstance(value, dict):
                stack.extend((at, k, v, depth + 1) for k, v in reversed(value.items()))
            else:
                stack.extend((at, i, value[i], depth + 1) for i in range(len(value) - 1, -1, -1))
        if problem:
            raise RecordError(_field(parent, step), problem)


def _field(parent: str | None, step: str | int | None) -> str | None:
    if step is None:
        return parent
    if isinstance(step, int):
        return f"{parent or ''}[{step}]"
    if len(step) > _MAX_FIELD_NAME:
        step = step[:_MAX_FIELD_NAME] + "..."
    return step if parent is None else f"{parent}.{step}"


def parse_records(
    chunks: Iterable[bytes],
    format: str = AUTO,
    *,
    check_ids: bool = True,
    limits: Limits = Limits(),
) -> Iterator[Record | LineError]:
    """Every line of a JSONL stream as a Record, or a LineError saying what is wrong where.

    A named format reads every record as that format. `auto` takes the format of the first
    record whose format can be told, and expects every later record to be of that format.
    `check_ids` finds duplicate ids by keeping every id seen; a caller that stores the records
    can leave that to its store instead, so memory stays flat.
    """
    expected = None if format == AUTO else format
    if expected is not None:
        _rules(expected)  # an unknown name is the caller's error, not the file's
    detected_on = 0
    seen_ids: dict[str, int] = {}
    for line_no, data in read_lines(chunks, limits.line_bytes):
        try:
            obj = decode_line(line_no, data, limits.line_bytes, limits.json_depth)
            if obj is None:
                continue
            if expected is None:
                expected, detected_on = detect_format(obj), line_no
            elif format == AUTO:
                _check_same_format(obj, expected, detected_on)
            example = parse_record(expected, obj, line_no)
        except RecordError as exc:
            yield LineError(line_no, exc.field, exc.message)
            continue
        first = seen_ids.setdefault(example.id, line_no) if check_ids else line_no
        if first != line_no:
            yield duplicate_id(line_no, example.id, first)
            continue
        yield Record(line_no, obj, example, expected)


def duplicate_id(line: int, record_id: str, first: int) -> LineError:
    return LineError(line, "id", f"duplicate id {record_id!r} (first on line {first})")


def _check_same_format(obj: dict[str, Any], expected: str, detected_on: int) -> None:
    # A record that also has the file's marker is read as the file's format; one with only
    # another format's marker would otherwise fail on a missing field, hiding the real mistake.
    found = _marked(obj)
    if found and expected not in found:
        raise RecordError(
            None,
            f"is in the {' or '.join(found)} format, but the file is in the {expected} format"
            f" (detected on line {detected_on})",
        )


def valid_records(
    chunks: Iterable[bytes],
    format: str = AUTO,
    max_errors: int = MAX_REPORTED_ERRORS,
    *,
    check_ids: bool = True,
    limits: Limits = Limits(),
) -> Iterator[Record]:
    """The records of a JSONL stream, checked to the last line; each carries its format.

    Records are yielded while every line so far is valid, so a caller can store them as they
    come; after the stream ends, DatasetError lists the invalid lines (the first `max_errors`,
    and how many more), and the caller discards what it stored. Memory holds one line. A
    record beyond `limits.examples` stops the reading there, with the errors found so far.
    """
    errors: list[LineError] = []
    more = 0
    count = 0
    for item in parse_records(chunks, format, check_ids=check_ids, limits=limits):
        if isinstance(item, LineError):
            if len(errors) < max_errors:
                errors.append(item)
            else:
                more += 1
        else:
            count += 1
            if count > limits.examples:
                message = f"more than {limits.examples} examples, the most a dataset may hold"
                raise DatasetError([*errors, LineError(item.line, None, message)], more)
            if not errors:
                yield item
    if not errors and count == 0:
        errors.append(LineError(1, None, "the dataset is empty: no JSON records found"))
    if errors:
        raise DatasetError(errors, more)


def load_records(
    chunks: Iterable[bytes], format: str = AUTO, *, limits: Limits = Limits()
) -> list[Record]:
    """All records of a dataset, or DatasetError listing the invalid lines."""
    return list(valid_records(chunks, format, limits=limits))
