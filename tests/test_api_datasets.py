"""The datasets API on a real PostgreSQL: streamed uploads, every line validated, all or nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.datasets import router as datasets_router
from app.models import Dataset, Example
from app.settings import Settings, get_settings
from tests.conftest import SHARED_DATA, assert_documented, bearer

MAX_ERRORS = 3


@pytest.fixture
def client(api: FastAPI, api_key: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_settings] = lambda: Settings(max_upload_errors=MAX_ERRORS)
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


def jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def upload(client: TestClient, content: bytes, **form: str) -> Any:
    return client.post("/v1/datasets", files={"file": ("teacher.jsonl", content)}, data=form)


def stored(session: Session) -> tuple[int, int]:
    datasets = session.scalar(select(func.count()).select_from(Dataset))
    examples = session.scalar(select(func.count()).select_from(Example))
    return datasets or 0, examples or 0


def test_upload_stores_every_example_in_order(client: TestClient, session: Session) -> None:
    content = (
        jsonl({"id": "a", "question": "Capital of Zorvania?", "answer": "Quell", "group": "P36"})
        + b"\n"  # a blank line: skipped, but line numbers still count it
        + jsonl(
            {"question": "Who wrote X?", "answers": ["Ann", "Anne"], "relation": "P50"},
            {"id": 7, "question": "Q?", "answer": "A"},
        )
    )
    response = upload(client, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["name"] == "teacher.jsonl"
    assert body["format"] == "qa"
    assert body["num_examples"] == 3
    rows = session.scalars(
        select(Example)
        .where(Example.dataset_id == uuid.UUID(body["id"]))
        .order_by(Example.position)
    ).all()
    assert [(r.position, r.line, r.record_id, r.group) for r in rows] == [
        (0, 1, "a", "P36"),
        (1, 3, "3", "P50"),
        (2, 4, "7", None),
    ]
    assert rows[1].raw == {
        "question": "Who wrote X?",
        "answers": ["Ann", "Anne"],
        "relation": "P50",
    }

    got = client.get(f"/v1/datasets/{body['id']}")
    assert got.status_code == 200
    assert got.json() == body


def test_upload_takes_a_name_and_the_qa_format(client: TestClient) -> None:
    response = upload(client, jsonl({"question": "Q?", "answer": "A"}), name="mine", format="qa")
    assert response.status_code == 201
    assert (response.json()["name"], response.json()["format"]) == ("mine", "qa")


def test_lines_split_across_read_chunks(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets_router, "UPLOAD_CHUNK_BYTES", 7)
    records = [{"id": f"r{i}", "question": f"Question {i}?", "answer": "é"} for i in range(20)]
    response = upload(client, jsonl(*records))
    assert response.status_code == 201, response.text
    raws = session.scalars(
        select(Example.raw)
        .where(Example.dataset_id == uuid.UUID(response.json()["id"]))
        .order_by(Example.position)
    ).all()
    assert raws == records


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'{"question": "Q?", "answer": "A"}\n{"question": "Q2?", "answer": \n',
            [(2, None, "not valid JSON")],
        ),
        (b'{"question": "Q?"}\n', [(1, "answer", "missing")]),
        (
            b'{"question": "Q?", "answer": "A"}\n{"question": "\xff?", "answer": "A"}\n',
            [(2, None, "not valid UTF-8")],
        ),
        (
            jsonl(
                {"id": "x", "question": "Q?", "answer": "A"},
                {"id": "x", "question": "Q2?", "answer": "B"},
            ),
            [(2, "id", "duplicate id 'x' (first on line 1)")],
        ),
        (b"", [(1, None, "the dataset is empty")]),
        (b"\n  \n", [(1, None, "the dataset is empty")]),
        (b"[1, 2]\n", [(1, None, "must be a JSON object")]),
    ],
    ids=["broken-json", "missing-answer", "not-utf8", "duplicate-id", "empty", "blank", "array"],
)
def test_invalid_upload_stores_nothing(
    client: TestClient,
    session: Session,
    content: bytes,
    expected: list[tuple[int, str | None, str]],
) -> None:
    before = stored(session)
    response = upload(client, content)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "invalid dataset" in detail["message"]
    got = [(e["line"], e["field"], e["message"]) for e in detail["errors"]]
    assert [(line, field) for line, field, _ in got] == [(line, f) for line, f, _ in expected]
    for (_, _, message), (_, _, start) in zip(got, expected, strict=True):
        assert message.startswith(start)
    assert detail["more_errors"] == 0
    assert stored(session) == before


def test_every_invalid_line_counted_beyond_those_listed(
    client: TestClient, session: Session
) -> None:
    before = stored(session)
    lines = [b'{"question": "Q?", "answer": "A"}'] + [b"{oops"] * 5 + [b'{"question": "Q?"}']
    response = upload(client, b"\n".join(lines))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [e["line"] for e in detail["errors"]] == [2, 3, 4]
    assert detail["more_errors"] == 3  # lines 5, 6 and 7: validation went on to the end
    assert stored(session) == before


def test_duplicate_ids_are_found_by_the_database(client: TestClient, session: Session) -> None:
    before = stored(session)
    records = [
        {"id": "y" if i in (1, 7) else "x", "question": f"Q{i}?", "answer": "A"} for i in range(8)
    ]
    response = upload(client, jsonl(*records))
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert [(e["line"], e["message"]) for e in detail["errors"]] == [
        (3, "duplicate id 'x' (first on line 1)"),
        (4, "duplicate id 'x' (first on line 1)"),
        (5, "duplicate id 'x' (first on line 1)"),
    ]
    assert detail["more_errors"] == 3  # lines 6 and 7 ('x'), and 8 ('y', first on line 2)
    assert stored(session) == before


def test_unknown_format_is_refused(client: TestClient, session: Session) -> None:
    before = stored(session)
    response = upload(client, jsonl({"question": "Q?", "answer": "A"}), format="csv")
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "format"]
    assert stored(session) == before


def test_entityquestions_uploads_as_is(client: TestClient, session: Session) -> None:
    path = SHARED_DATA / "entityquestions" / "dev.jsonl"
    with path.open("rb") as file:
        response = client.post("/v1/datasets", files={"file": ("dev.jsonl", file)})
    assert response.status_code == 201, response.text
    dataset_id = uuid.UUID(response.json()["id"])
    assert response.json()["num_examples"] == 11_045
    count = session.scalar(
        select(func.count()).select_from(Example).where(Example.dataset_id == dataset_id)
    )
    assert count == 11_045
    first = session.get_one(Example, (dataset_id, 0))
    assert (first.record_id, first.group) == ("P131-dev-0", "P131")


def test_get_dataset_errors(client: TestClient) -> None:
    missing = client.get(f"/v1/datasets/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert "not found" in missing.json()["detail"]
    assert client.get("/v1/datasets/not-a-uuid").status_code == 422


def test_a_cursor_that_names_no_dataset_answers_the_documented_422(
    client: TestClient, api: FastAPI
) -> None:
    cursor = str(uuid.uuid4())
    response = client.get("/v1/datasets", params={"cursor": cursor})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "cursor"]
    assert error["msg"] == f"cursor {cursor} names no dataset"
    assert_documented(api, "GET /v1/datasets", response)


def test_an_upload_refused_answers_one_of_the_documented_422s(
    client: TestClient, api: FastAPI
) -> None:
    no_file = client.post("/v1/datasets", data={"name": "teacher"})
    assert no_file.status_code == 422
    assert no_file.json()["detail"][0]["loc"] == ["body", "file"]
    assert_documented(api, "POST /v1/datasets", no_file)
    invalid_line = upload(client, b'{"question": "Q?"}\n')
    assert invalid_line.status_code == 422
    assert invalid_line.json()["detail"]["errors"][0]["line"] == 1
    assert_documented(api, "POST /v1/datasets", invalid_line)


def test_a_body_that_is_not_a_multipart_form_answers_the_documented_400(
    client: TestClient, api: FastAPI, session: Session
) -> None:
    before = stored(session)
    response = client.post(
        "/v1/datasets", content=FIRST, headers={"content-type": "multipart/form-data"}
    )
    assert response.status_code == 400
    assert_documented(api, "POST /v1/datasets", response)
    assert stored(session) == before


# --- what a dataset cannot hold, and the limits ---------------------------------------------------

QA = '"question": "Q?", "answer": "A"'
FIRST = b'{"question": "Fine?", "answer": "yes"}\n'


def limit(api: FastAPI, **settings: int) -> None:
    api.dependency_overrides[get_settings] = lambda: Settings(
        max_upload_errors=MAX_ERRORS, **settings
    )


def refused(client: TestClient, content: bytes) -> list[tuple[int, str | None, str]]:
    response = upload(client, content)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]["errors"]
    return [(e["line"], e["field"], e["message"]) for e in errors]


@pytest.mark.parametrize(
    ("line", "field", "message"),
    [
        ('{"id": NaN, ' + QA + "}", "id", "must be a finite number"),
        ('{"score": Infinity, ' + QA + "}", "score", "must be a finite number"),
        ('{"scores": [1, -Infinity], ' + QA + "}", "scores[1]", "must be a finite number"),
        ('{"meta": {"p": 1e999}, ' + QA + "}", "meta.p", "must be a finite number"),
        ('{"id": ' + "7" * 5000 + ", " + QA + "}", "id", "must be an integer within 64 bits"),
        ('{"x": ' + "[" * 5000 + "]" * 5000 + ", " + QA + "}", None, "nests deeper than 64"),
        ('{"x": ' + "[" * 64 + "]" * 64 + ", " + QA + "}", "x" + "[0]" * 63, "nests deeper"),
        ('{"id": "\\ud800", ' + QA + "}", "id", "contains a lone surrogate (\\ud800)"),
        ('{"question": "Q\\udc00?", "answer": "A"}', "question", "contains a lone surrogate"),
        ('{"meta": [{"note": "\\ud83d"}], ' + QA + "}", "meta[0].note", "contains a lone"),
        ('{"k\\ud800": 1, ' + QA + "}", "k\\ud800", "its name contains a lone surrogate"),
        ('{"question": "Q?", "answer": "A\\u0000"}', "answer", "contains \\u0000"),
    ],
    ids=[
        "nan",
        "infinity",
        "minus-infinity",
        "1e999",
        "5000-digits",
        "nested-5000",
        "nested-65",
        "surrogate-id",
        "surrogate-question",
        "surrogate-extra",
        "surrogate-key",
        "nul",
    ],
)
def test_values_a_dataset_cannot_hold_are_refused(
    client: TestClient, session: Session, line: str, field: str | None, message: str
) -> None:
    before = stored(session)
    ((at, got_field, got_message),) = refused(client, FIRST + line.encode() + b"\n")
    assert (at, got_field) == (2, field)
    assert got_message.startswith(message), got_message
    assert stored(session) == before


def test_nul_in_a_chat_turn_names_the_turn(client: TestClient, session: Session) -> None:
    before = stored(session)
    turns = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}] * 2
    good = {"messages": turns}
    bad = {"messages": [*turns[:3], {"role": "assistant", "content": "A\x00"}]}
    assert refused(client, jsonl(good, bad)) == [
        (2, "messages[3].content", "contains \\u0000, which a dataset cannot store")
    ]
    assert stored(session) == before


def test_a_line_over_the_limit_is_refused(
    api: FastAPI, client: TestClient, session: Session
) -> None:
    before = stored(session)
    long = b'{"question": "' + b"x" * (1 << 20) + b'", "answer": "A"}\n'
    assert refused(client, FIRST + long + FIRST) == [
        (2, None, "longer than 1048576 bytes, the most a line may hold")
    ]
    limit(api, max_line_bytes=40)
    assert refused(client, FIRST + b'{"question": "' + b"x" * 40 + b'", "answer": "A"}\n') == [
        (2, None, "longer than 40 bytes, the most a line may hold")
    ]
    assert stored(session) == before


def test_examples_and_depth_over_the_limits_are_refused(
    api: FastAPI, client: TestClient, session: Session
) -> None:
    before = stored(session)
    limit(api, max_examples=2, max_json_depth=3)
    assert refused(client, FIRST * 3) == [
        (3, None, "more than 2 examples, the most a dataset may hold")
    ]
    assert refused(client, b'{"x": [[[1]]], ' + QA.encode() + b"}\n") == [
        (1, "x[0][0]", "nests deeper than 3 levels")
    ]
    assert stored(session) == before
    assert upload(client, b'{"x": [[1]], ' + QA.encode() + b"}\n").status_code == 201


def test_an_upload_over_the_limit_answers_413(
    api: FastAPI, client: TestClient, session: Session
) -> None:
    before = stored(session)
    limit(api, max_upload_bytes=1000)
    content = FIRST * 50
    declared = upload(client, content)  # refused on its Content-Length, before reading
    body, content_type = multipart(("file", "teacher.jsonl", content))
    streamed = client.post(  # no Content-Length: refused as the bytes pass the limit
        "/v1/datasets", content=iter([body]), headers={"content-type": content_type}
    )
    for response in (declared, streamed):
        assert response.status_code == 413
        assert response.json() == {
            "detail": "the upload is larger than 1000 bytes, the most this server takes"
        }
    assert "content-length" not in streamed.request.headers
    assert stored(session) == before
    assert upload(client, FIRST * 10).status_code == 201
    documented = client.get("/openapi.json").json()["paths"]["/v1/datasets"]["post"]
    assert documented["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorRead"
    }


def multipart(*parts: tuple[str, str | None, bytes], charset: str = "utf-8") -> tuple[bytes, str]:
    """A multipart/form-data body written by hand (name, filename, value), and its content type.

    By hand, so that field values and file names carry bytes no HTTP client would send; with
    `charset` set, the server decodes them by it (`unicode_escape` reads `\\ud800`).
    """
    body = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'.encode()
        if filename is not None:
            disposition += b'; filename="' + filename.encode("latin-1") + b'"'
        body += b"--kma\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--kma--\r\n", f"multipart/form-data; boundary=kma; charset={charset}"


@pytest.mark.parametrize(
    ("name", "filename", "charset", "field", "message"),
    [
        ("da\x00ta", None, "utf-8", "name", "contains \\u0000"),
        ("da\\ud800ta", None, "unicode_escape", "name", "contains a lone surrogate (\\ud800)"),
        (None, "t\x00.jsonl", "utf-8", "file", "its name contains \\u0000"),
        (None, "t\\udfff.jsonl", "unicode_escape", "file", "its name contains a lone surrogate"),
    ],
    ids=["nul-name", "surrogate-name", "nul-filename", "surrogate-filename"],
)
def test_form_fields_a_dataset_cannot_hold_are_refused(
    client: TestClient,
    session: Session,
    name: str | None,
    filename: str | None,
    charset: str,
    field: str,
    message: str,
) -> None:
    before = stored(session)
    parts = [("file", filename or "teacher.jsonl", FIRST)]
    if name is not None:
        parts.append(("name", None, name.encode("latin-1")))
    body, content_type = multipart(*parts, charset=charset)
    response = client.post("/v1/datasets", content=body, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", field]
    assert message in error["msg"]
    assert stored(session) == before


def test_unicode_and_big_numbers_round_trip(client: TestClient, session: Session) -> None:
    records = [
        {
            "id": "ζ-1",
            "question": "Qui a écrit 《红楼梦》? 🤔 cafe\u0301 \u05e9\u05dc\u05d5\u05dd",
            "answer": "曹雪芹 👨‍👩‍👧",
            "numbers": [2**63 - 1, -(2**63), 1.7976931348623157e308, 5e-324, 1e-5],
            "nested": json.loads("[" * 63 + "]" * 63),
        },
        {"id": 2**63 - 1, "question": "Émoji 🎉 as escapes?", "answer": "はい"},
    ]
    content = json.dumps(records[0], ensure_ascii=False).encode() + b"\n" + jsonl(records[1])
    response = upload(client, content, name="データ 🚀")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "データ 🚀"
    raws = session.scalars(
        select(Example.raw)
        .where(Example.dataset_id == uuid.UUID(response.json()["id"]))
        .order_by(Example.position)
    ).all()
    assert raws == records
