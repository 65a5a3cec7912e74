"""Reading teacher datasets: every line validated, errors that say where."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from app.datasets.domain import DatasetError, Limits, load_records, read_lines, with_answer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "entityquestions"


def load(text: bytes) -> list[str]:
    return [r.example.id for r in load_records([text])]


def errors(text: bytes) -> list[str]:
    with pytest.raises(DatasetError) as info:
        load_records([text])
    return [str(e) for e in info.value.errors]


def test_reads_every_field() -> None:
    (record,) = load_records(
        [
            b'{"id": "a", "question": "Q?", "answers": ["x", "y"], "aliases": ["z"],'
            b' "relation": "P1"}'
        ]
    )
    ex = record.example
    assert (ex.id, ex.question, ex.answer, ex.aliases, ex.group) == (
        "a",
        "Q?",
        "x",
        ("y", "z"),
        "P1",
    )
    assert ex.golds == ("x", "y", "z")


def test_ids_default_to_the_line_number_and_blank_lines_are_skipped() -> None:
    assert load(b'{"question": "a?", "answer": "1"}\n\n{"question": "b?", "answer": "2"}\n') == [
        "1",
        "3",
    ]


def test_lines_split_across_chunks() -> None:
    chunks = [b'{"question": "a?", "ans', b'wer": "1"}\n{"question"', b': "b?", "answer": "2"}']
    assert [r.example.answer for r in load_records(chunks)] == ["1", "2"]
    assert list(read_lines([b"a\nb", b"c\n"])) == [(1, b"a"), (2, b"bc")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b'{"question": "a?", "answer": "1"}\n{"question": "b?", "answer": }\n',
            "line 2: not valid JSON",
        ),
        (b'{"question": "a?"}\n', "line 1, field 'answer': missing"),
        (b'{"question": "a?", "answer": ""}\n', "line 1, field 'answer': must not be empty"),
        (b'{"question": "a?", "answers": []}\n', "line 1, field 'answers': must hold"),
        (b'{"question": "a?", "answers": ["x", 3]}\n', "line 1, field 'answers[1]'"),
        (
            b'{"question": "a?", "answer": "1"}\n{"answer": "1"}\n',
            "line 2, field 'question': must be a string, got nothing",
        ),
        (b"[1, 2]\n", "line 1: must be a JSON object, got list"),
        (b'{"question": "a\xff?", "answer": "1"}\n', "line 1: not valid UTF-8 (byte 16"),
        (b"", "line 1: the dataset is empty"),
        (
            b'{"question": "a\\u0000?", "answer": "1"}\n',
            "line 1, field 'question': contains \\u0000",
        ),
        (b"\n\n", "line 1: the dataset is empty"),
        (
            b'{"id": 1, "question": "a?", "answer": "1"}\n'
            b'{"id": "1", "question": "b?", "answer": "2"}\n',
            "line 2, field 'id': duplicate id '1' (first on line 1)",
        ),
        (b'{"question": "a?", "answer": "1", "group": ["P1"]}\n', "line 1, field 'group'"),
    ],
)
def test_invalid_lines(text: bytes, expected: str) -> None:
    assert any(e.startswith(expected) for e in errors(text)), errors(text)


QA = b'"question": "a?", "answer": "1"'
FINITE = "must be a finite number (JSON has no NaN or Infinity; 1e999 overflows)"
BIG = "must be an integer within 64 bits"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'{"id": NaN, ' + QA + b"}", f"line 2, field 'id': {FINITE}"),
        (b'{"score": Infinity, ' + QA + b"}", f"line 2, field 'score': {FINITE}"),
        (b'{"scores": [1, -Infinity], ' + QA + b"}", f"line 2, field 'scores[1]': {FINITE}"),
        (b'{"meta": {"p": 1e999}, ' + QA + b"}", f"line 2, field 'meta.p': {FINITE}"),
        (b'{"id": ' + b"7" * 5000 + b", " + QA + b"}", f"line 2, field 'id': {BIG}"),
        (b'{"id": 9223372036854775808, ' + QA + b"}", f"line 2, field 'id': {BIG}"),
        (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b", " + QA + b"}", "line 2: nests deeper"),
        (
            b'{"x": ' + b"[" * 64 + b"]" * 64 + b", " + QA + b"}",
            "line 2, field 'x" + "[0]" * 63 + "': nests deeper than 64 levels",
        ),
        (b'{"id": "\\ud800", ' + QA + b"}", "line 2, field 'id': contains a lone surrogate"),
        (
            b'{"question": "a\\uDC00?", "answer": "1"}',
            "line 2, field 'question': contains a lone surrogate (\\udc00)",
        ),
        (
            b'{"meta": {"notes": ["ok", {"why": "\\ud83d"}]}, ' + QA + b"}",
            "line 2, field 'meta.notes[1].why': contains a lone surrogate",
        ),
        (
            b'{"meta": {"k\\ud800": 1}, ' + QA + b"}",
            "line 2, field 'meta.k\\ud800': its name contains a lone surrogate",
        ),
        (b'{"k\\u0000": 1, ' + QA + b"}", "line 2, field 'k\\x00': its name contains \\u0000"),
        (
            b'{"messages": [{"role": "user", "content": "a?"},'
            b' {"role": "assistant", "content": "1\\u0000"}]}',
            "line 2, field 'messages[1].content': contains \\u0000",
        ),
    ],
    ids=[
        "nan",
        "infinity",
        "minus-infinity",
        "1e999",
        "5000-digits",
        "2**63",
        "nested-5000",
        "nested-65",
        "surrogate-id",
        "surrogate-question",
        "surrogate-extra",
        "surrogate-key",
        "nul-key",
        "nul-content",
    ],
)
def test_values_a_dataset_cannot_hold(text: bytes, expected: str) -> None:
    found = errors(b'{"question": "ok?", "answer": "1"}\n' + text + b"\n")
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_long_line_is_refused_without_being_held() -> None:
    limit = 1 << 20
    chunk = b"x" * limit
    # 200 MiB on one line, then a short one: the long line is cut as it streams past.
    chunks = (chunk if i < 200 else b'\n{"question": "b?", "answer": "2"}' for i in range(201))
    tracemalloc.start()
    try:
        lines = [(n, len(data)) for n, data in read_lines(chunks, limit)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [(1, limit + 1), (2, 33)]
    assert peak < 4 * limit
    text = b'{"question": "a?", "answer": "1"}\n{"question": "' + b"x" * 100 + b'"}\n'
    with pytest.raises(DatasetError) as info:
        load_records([text + text], limits=Limits(line_bytes=50))
    assert [str(e) for e in info.value.errors] == [
        f"line {n}: longer than 50 bytes, the most a line may hold" for n in (2, 4)
    ]


def test_examples_beyond_the_limit_are_refused() -> None:
    text = b'{"question": "a?", "answer": "1"}\n' * 5
    assert len(load_records([text], limits=Limits(examples=5))) == 5
    with pytest.raises(DatasetError) as info:
        load_records([text], limits=Limits(examples=3))
    assert [str(e) for e in info.value.errors] == [
        "line 4: more than 3 examples, the most a dataset may hold"
    ]


def test_unicode_and_big_numbers_are_kept() -> None:
    record = {
        "question": "Qui a écrit 《红楼梦》? 🤔 e\u0301 \u05e9\u05dc\u05d5\u05dd",
        "answer": "曹雪芹 👨‍👩‍👧",
        "numbers": [2**63 - 1, -(2**63), 1.7976931348623157e308, 5e-324, -0.0, 1e-5],
        "deep": json.loads("[" * 63 + "]" * 63),
    }
    escaped = json.dumps({"id": "escaped", **record})  # the emoji as surrogate pairs
    utf8 = json.dumps({"id": "ζ-1", **record}, ensure_ascii=False)
    first, second = load_records([f"{escaped}\n{utf8}\n".encode()])
    assert first.raw == {"id": "escaped", **record}
    assert second.raw == {"id": "ζ-1", **record}
    assert (second.example.id, second.example.answer) == ("ζ-1", "曹雪芹 👨‍👩‍👧")


def test_every_bad_line_is_reported() -> None:
    text = b"".join(
        b"{broken\n" if i % 2 else b'{"question": "q?", "answer": "a"}\n' for i in range(10)
    )
    found = errors(text)
    assert [e.split(":")[0] for e in found] == [f"line {i}" for i in (2, 4, 6, 8, 10)]


def test_error_list_is_capped() -> None:
    with pytest.raises(DatasetError) as info:
        load_records([b"{\n" * 80])
    assert len(info.value.errors) == 50
    assert info.value.more == 30
    assert "and 30 more errors" in str(info.value)


def test_entityquestions_loads_as_is() -> None:
    for name, lines in (("dev.jsonl", 11045), ("test.jsonl", 11049)):
        with (DATA / name).open("rb") as f:
            records = load_records(iter(lambda f=f: f.read(1 << 16), b""))
        assert len(records) == lines
        assert {r.example.group for r in records} == {
            "P131",
            "P136",
            "P17",
            "P19",
            "P26",
            "P264",
            "P36",
            "P40",
            "P495",
            "P69",
            "P740",
            "P800",
        }


def test_with_answer_replaces_only_the_answer() -> None:
    assert with_answer("qa", {"question": "q", "answer": "a", "x": 1}, "b") == {
        "question": "q",
        "answer": "b",
        "x": 1,
    }
    assert with_answer("qa", {"question": "q", "answers": ["a", "c"]}, "b") == {
        "question": "q",
        "answers": ["b"],
    }
