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
from tests.conftest import SHARED_DATA, bearer

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
