"""Reading teacher datasets: every line validated, errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.datasets.domain import DatasetError, load_records, read_lines, with_answer

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
        (b'{"question": "a\\u0000?", "answer": "1"}\n', "line 1: contains \\u0000"),
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
