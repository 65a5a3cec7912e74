"""Record formats (qa, messages, alpaca, sharegpt): reading, detection, and export in kind."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.audit.domain import EXPORT_POLICIES
from app.audit.schemas import AuditConfig, Category, Report, SuggestedAction
from app.datasets.domain import (
    RECORD_FORMATS,
    DatasetError,
    Example,
    RecordError,
    detect_format,
    load_records,
    parse_record,
    with_answer,
)
from app.exports.domain import EXPORT_FORMATS, MEDIA_TYPES
from app.exports.files import HF_DATA_FILE, HF_INFO_FILE, HF_STATE_FILE
from app.jobs import service as jobs_service
from app.models import Dataset, Job, JobStatus, utcnow
from app.models import Example as ExampleRow
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.students.schemas import Student
from tests.conftest import bearer, new_workspace
from tests.test_api_jobs import (
    IDK,
    STUDENTS,
    Recorder,
    add_verdicts,
    audit,
    set_status,
    submit,
)
from tests.test_jobs import knows_even_numbers, make_worker, run_all
from workers.engines.base import GenerationRequest, GenerationResult
from workers.engines.fake import FakeEngine
from workers.local_audit import audit_file, read_dataset

QA = {
    "id": "z1",
    "question": "Capital of Zorvania?",
    "answer": "Quell",
    "group": "P36",
    "source": "teacher",
}
MESSAGES = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of Zorvania?"},
        {"role": "assistant", "content": "Quell", "weight": 1},
    ],
    "id": "z1",
    "relation": "P36",
    "source": "teacher",
}
ALPACA = {
    "instruction": "Name the capital of this country.",
    "input": "Zorvania",
    "output": "Quell",
    "id": "z1",
    "group": "P36",
}
SHAREGPT = {
    "id": "z1",
    "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello."},
        {"from": "human", "value": "Capital of Zorvania?"},
        {"from": "gpt", "value": "Quell"},
    ],
    "group": "P36",
}
SAMPLES = {"qa": QA, "messages": MESSAGES, "alpaca": ALPACA, "sharegpt": SHAREGPT}
ANSWER_AT: dict[str, tuple[str | int, ...]] = {
    "qa": ("answer",),
    "messages": ("messages", 4, "content"),
    "alpaca": ("output",),
    "sharegpt": ("conversations", 4, "value"),
}
"""Where each sample keeps its answer: the only place an export may change."""


def jsonl(*records: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def put(record: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A deep copy of the record with the value at `path` replaced."""
    out = copy.deepcopy(record)
    target: Any = out
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return out


def errors(content: bytes, record_format: str = "auto") -> list[str]:
    with pytest.raises(DatasetError) as info:
        load_records([content], record_format)
    return [str(e) for e in info.value.errors]


# --- reading ----------------------------------------------------------------------------------


def test_every_format_is_covered() -> None:
    assert set(SAMPLES) == set(RECORD_FORMATS)


@pytest.mark.parametrize(
    ("record_format", "question"),
    [
        ("qa", "Capital of Zorvania?"),
        ("messages", "Capital of Zorvania?"),
        ("alpaca", "Name the capital of this country.\n\nZorvania"),
        ("sharegpt", "Capital of Zorvania?"),
    ],
)
def test_parse_every_format(record_format: str, question: str) -> None:
    example = parse_record(record_format, SAMPLES[record_format], 7)
    assert example == Example(id="z1", question=question, answer="Quell", group="P36")
    assert detect_format(SAMPLES[record_format]) == record_format


def test_alpaca_without_input_asks_the_instruction_alone() -> None:
    for extra in ({}, {"input": ""}, {"input": "  "}):
        record = {"instruction": "Name a colour.", **extra, "output": "Red"}
        assert parse_record("alpaca", record, 1).question == "Name a colour."


def test_ids_are_the_record_id_or_the_line_and_survive_export() -> None:
    for record_format, sample in SAMPLES.items():
        anonymous = {k: v for k, v in sample.items() if k != "id"}
        assert parse_record(record_format, anonymous, 12).id == "12"
        before = parse_record(record_format, sample, 3)
        after = parse_record(record_format, with_answer(record_format, sample, "Vark"), 3)
        assert after == Example(before.id, before.question, "Vark", before.aliases, before.group)


def test_aliases_are_read_in_every_format() -> None:
    assert parse_record("qa", {"question": "q?", "answers": ["a", "b"], "aliases": ["c"]}, 1) == (
        Example("1", "q?", "a", ("b", "c"))
    )
    assert parse_record("sharegpt", {**SHAREGPT, "aliases": ["Quel"]}, 1).golds == (
        "Quell",
        "Quel",
    )


# --- writing the answer back -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record_format", "raw", "expected"),
    [
        (
            "qa",
            QA,
            {
                "id": "z1",
                "question": "Capital of Zorvania?",
                "answer": "No idea.",
                "group": "P36",
                "source": "teacher",
            },
        ),
        (
            "qa",
            {"answers": ["Quell", "Quel"], "question": "Capital?", "aliases": ["Q"]},
            {"answers": ["No idea."], "question": "Capital?", "aliases": ["Q"]},
        ),
        (
            "messages",
            MESSAGES,
            {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Capital of Zorvania?"},
                    {"role": "assistant", "content": "No idea.", "weight": 1},
                ],
                "id": "z1",
                "relation": "P36",
                "source": "teacher",
            },
        ),
        (
            "alpaca",
            ALPACA,
            {
                "instruction": "Name the capital of this country.",
                "input": "Zorvania",
                "output": "No idea.",
                "id": "z1",
                "group": "P36",
            },
        ),
        (
            "sharegpt",
            SHAREGPT,
            {
                "id": "z1",
                "conversations": [
                    {"from": "system", "value": "Answer briefly."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello."},
                    {"from": "human", "value": "Capital of Zorvania?"},
                    {"from": "gpt", "value": "No idea."},
                ],
                "group": "P36",
            },
        ),
    ],
)
def test_with_answer_changes_only_the_answer(
    record_format: str, raw: dict[str, Any], expected: dict[str, Any]
) -> None:
    before = copy.deepcopy(raw)
    out = with_answer(record_format, raw, "No idea.")
    assert out == expected
    # Key order too, at every level: the export is compared byte for byte elsewhere.
    assert json.dumps(out) == json.dumps(expected)
    assert json.dumps(raw) == json.dumps(before)  # the input is not mutated


def test_the_last_answer_after_the_last_question_is_the_one_relabelled() -> None:
    trailing = {
        "messages": [
            {"role": "user", "content": "Q1?"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2?"},
            {"role": "assistant", "content": "A2"},
            {"role": "system", "content": "Done."},
        ]
    }
    example = parse_record("messages", trailing, 1)
    assert (example.question, example.answer) == ("Q2?", "A2")
    out = with_answer("messages", trailing, "X")
    assert [m["content"] for m in out["messages"]] == ["Q1?", "A1", "Q2?", "X", "Done."]


def test_unknown_format_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown record format 'csv'"):
        parse_record("csv", QA, 1)
    with pytest.raises(ValueError, match="unknown record format"):
        load_records([jsonl(QA)], "csv")


# --- detection and validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"question": "q?", "messages": []}, "is ambiguous: it has 'question' and 'messages'"),
        ({"instruction": "i", "conversations": []}, "(alpaca, sharegpt); name the format"),
        ({"prompt": "q?", "completion": "a"}, "matches no record format"),
    ],
)
def test_detection_refuses_ambiguous_and_unknown_records(
    record: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecordError) as info:
        detect_format(record)
    assert message in info.value.message
    (error,) = errors(jsonl(record))
    assert error.startswith("line 1: ") and message in error


def test_auto_reads_each_format_and_records_carry_it() -> None:
    for record_format, sample in SAMPLES.items():
        second = {k: v for k, v in sample.items() if k != "id"}
        records = load_records([jsonl(sample, second)])
        assert [(r.format, r.example.id) for r in records] == [
            (record_format, "z1"),
            (record_format, "2"),
        ]


def test_a_mixed_file_names_the_line_and_the_expected_format() -> None:
    content = jsonl(QA, {**MESSAGES, "id": "m"}, {**QA, "id": "q2"}, {**ALPACA, "id": "a"})
    assert errors(content) == [
        "line 2: is in the messages format, but the file is in the qa format (detected on line 1)",
        "line 4: is in the alpaca format, but the file is in the qa format (detected on line 1)",
    ]


def test_detection_waits_for_the_first_record_it_can_read() -> None:
    content = b"{broken\n" + jsonl(MESSAGES, QA)
    assert errors(content) == [
        "line 1: not valid JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 3: is in the qa format, but the file is in the messages format (detected on line 2)",
    ]


def test_a_record_with_the_files_marker_and_another_reads_as_the_file() -> None:
    extra = {**MESSAGES, "id": "m2", "question": "kept as an extra key"}
    records = load_records([jsonl(MESSAGES, extra)])
    assert records[1].example.question == "Capital of Zorvania?"
    assert records[1].format == "messages"


def test_a_named_format_reads_every_record_as_it() -> None:
    assert errors(jsonl(QA), "alpaca") == [
        "line 1, field 'instruction': must be a string, got nothing"
    ]
    ambiguous = {**QA, "messages": "not a list: ignored as qa"}
    assert [r.format for r in load_records([jsonl(ambiguous)], "qa")] == ["qa"]


def turns(*pairs: tuple[Any, Any]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": "hi"}, "field 'messages': must be a non-empty list of turns, got str"),
        ({"messages": []}, "field 'messages': must be a non-empty list of turns, got list"),
        ({"messages": ["hi"]}, "field 'messages[0]': must be an object, got str"),
        (
            turns(("user", "q?"), ("tool", "x"), ("assistant", "a")),
            "field 'messages[1].role': must be one of system, user, assistant, got 'tool'",
        ),
        (
            turns(("system", "s"), ("user", "q?"), ("assistant", "a"), ("assistant", "")),
            "field 'messages[3].content': must not be empty",
        ),
        (
            turns(("user", "q?"), ("assistant", None)),
            "field 'messages[1].content': must be a string, got nothing",
        ),
        (
            turns(("user", [{"type": "text", "text": "q?"}]), ("assistant", "a")),
            "field 'messages[0].content': must be a string, got list",
        ),
        (
            turns(("system", "s"), ("assistant", "a")),
            "field 'messages': has no user turn: no question to audit",
        ),
        (
            turns(("user", "q1?"), ("assistant", "a"), ("user", "q2?")),
            "field 'messages': has no assistant turn after the last user turn",
        ),
        (
            {"conversations": [{"from": "user", "value": "q?"}, {"from": "gpt", "value": "a"}]},
            "field 'conversations[0].from': must be one of system, human, gpt, got 'user'",
        ),
        (
            {"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt"}]},
            "field 'conversations[1].value': must be a string, got nothing",
        ),
        ({"instruction": "i", "input": 3, "output": "o"}, "field 'input': must be a string, got"),
        ({"instruction": "i", "input": ""}, "field 'output': must be a string, got nothing"),
        ({"instruction": " ", "output": "o"}, "field 'instruction': must not be empty"),
    ],
)
def test_invalid_records_name_the_field(record: dict[str, Any], expected: str) -> None:
    (error,) = errors(jsonl(record))
    assert error.startswith(f"line 1, {expected}")


# --- the API: upload, audit, export in kind ----------------------------------------------------


def dataset_of(record_format: str) -> list[dict[str, Any]]:
    """Three records: ids x0 and x1, then one without an id (its id is its line, 3)."""
    sample, answer_at = SAMPLES[record_format], ANSWER_AT[record_format]
    records = []
    for i, answer in enumerate(("Quell", "Ann Vey", "Lutz")):
        record = put(sample, answer_at, answer)
        if i < 2:
            record["id"] = f"x{i}"
        else:
            del record["id"]
        records.append(record)
    return records


AUDITS = [
    audit(Category.HIGHLY_KNOWN, SuggestedAction.KEEP, "Quell", 1.0),
    audit(Category.UNKNOWN, SuggestedAction.RELABEL_STUDENT, "Bo Ek", 0.95),
    audit(Category.UNKNOWN, SuggestedAction.RELABEL_IDK, "Vark", 0.3),
]


@pytest.fixture
def client(api: FastAPI, api_key: str, broker_url: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    settings = Settings(broker_url=broker_url, students=STUDENTS)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


OVERRIDE = "Ora Lind"
DECISIONS = [
    {"position": 1, "decision": "override", "answer": OVERRIDE},
    {"position": 2, "decision": "reject"},
]
"""What a person decided on the flagged examples: the `reviewed` policy applies it."""


def audited_job(client: TestClient, session: Session, record_format: str, form: str) -> str:
    """Upload the format's dataset, finish a job over it as a worker would, and review it."""
    response = client.post(
        "/v1/datasets",
        files={"file": ("t.jsonl", jsonl(*dataset_of(record_format)))},
        data={"format": form},
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == record_format
    job_id = submit(client, response.json()["id"], config={"idk_text": IDK})["id"]
    add_verdicts(session, job_id, AUDITS)
    set_status(session, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    review = client.patch(f"/v1/jobs/{job_id}/examples", json={"items": DECISIONS})
    assert review.status_code == 200, review.text
    return job_id


def expected_export(record_format: str, policy: str) -> list[dict[str, Any]]:
    """The records each policy writes for `dataset_of(record_format)`, audited and reviewed."""
    keep, student, idk = dataset_of(record_format)
    at = ANSWER_AT[record_format]
    return {
        "suggested": [keep, put(student, at, "Bo Ek"), put(idk, at, IDK)],
        "drop": [keep],
        "idk": [keep, put(student, at, IDK), put(idk, at, IDK)],
        "student": [keep, put(student, at, "Bo Ek"), put(idk, at, "Vark")],
        "annotate": [
            {**r, "audit": a.model_dump(mode="json")}
            for r, a in zip(dataset_of(record_format), AUDITS, strict=True)
        ],
        "reviewed": [keep, put(student, at, OVERRIDE), idk],
    }[policy]


def export_lines(client: TestClient, job_id: str, policy: str) -> list[str]:
    response = client.get(f"/v1/jobs/{job_id}/export", params={"policy": policy})
    assert response.status_code == 200, response.text
    return response.text.splitlines()


@pytest.mark.parametrize("record_format", RECORD_FORMATS)
def test_export_writes_the_relabel_in_the_formats_answer(
    client: TestClient, session: Session, record_format: str
) -> None:
    job_id = audited_job(client, session, record_format, "auto")
    for policy in EXPORT_POLICIES:
        # Byte for byte: the relabel lands in its place and nothing else moves, key order included.
        assert export_lines(client, job_id, policy) == [
            json.dumps(r, ensure_ascii=False) for r in expected_export(record_format, policy)
        ], policy
    examples = client.get(f"/v1/jobs/{job_id}/examples").json()["items"]
    assert [e["id"] for e in examples] == ["x0", "x1", "3"]


@pytest.mark.parametrize("record_format", RECORD_FORMATS)
def test_upload_with_a_named_format(
    client: TestClient, session: Session, record_format: str
) -> None:
    job_id = audited_job(client, session, record_format, record_format)
    assert len(export_lines(client, job_id, "drop")) == 1
    others = [f for f in RECORD_FORMATS if f != record_format]
    response = client.post(
        "/v1/datasets",
        files={"file": ("t.jsonl", jsonl(*dataset_of(record_format)))},
        data={"format": others[0]},
    )
    assert response.status_code == 422
    assert [e["line"] for e in response.json()["detail"]["errors"]] == [1, 2, 3]


OPENAI_ROLES = {"system", "user", "assistant"}
OPENAI_MESSAGE_KEYS = {"role", "content", "name", "weight"}


def openai_chat_problems(lines: list[str]) -> list[str]:
    """What OpenAI's chat fine-tuning format checks would refuse, line by line."""
    problems = []
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            problems.append(f"{n}: no messages list")
            continue
        for message in messages:
            if not isinstance(message, dict):
                problems.append(f"{n}: a message is not an object")
                continue
            if set(message) - OPENAI_MESSAGE_KEYS:
                problems.append(f"{n}: unknown keys {sorted(set(message) - OPENAI_MESSAGE_KEYS)}")
            if message.get("role") not in OPENAI_ROLES:
                problems.append(f"{n}: role {message.get('role')!r}")
            content = message.get("content")
            if not isinstance(content, str) or not content.strip():
                problems.append(f"{n}: content {content!r}")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            problems.append(f"{n}: no assistant message")
    return problems


def test_the_openai_checker_catches_what_it_should() -> None:
    bad = [
        json.dumps({"prompt": "p"}),
        json.dumps({"messages": [{"role": "user", "content": "q", "tool_calls": []}]}),
        json.dumps({"messages": [{"role": "tool", "content": ""}]}),
    ]
    assert openai_chat_problems(bad) == [
        "1: no messages list",
        "2: unknown keys ['tool_calls']",
        "2: no assistant message",
        "3: role 'tool'",
        "3: content ''",
        "3: no assistant message",
    ]


def test_exported_messages_pass_the_openai_fine_tuning_rules(
    client: TestClient, session: Session
) -> None:
    job_id = audited_job(client, session, "messages", "auto")
    for policy in EXPORT_POLICIES:
        assert openai_chat_problems(export_lines(client, job_id, policy)) == [], policy


def test_exports_load_with_hugging_face_datasets(
    client: TestClient, session: Session, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    for record_format in RECORD_FORMATS:
        job_id = audited_job(client, session, record_format, "auto")
        for policy in ("suggested", "annotate"):
            path = tmp_path / f"{record_format}-{policy}.jsonl"
            path.write_text("\n".join(export_lines(client, job_id, policy)) + "\n")
            loaded = datasets.load_dataset(
                "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
            )
            assert loaded.num_rows == 3
            row: Any = loaded[1]
            if policy == "annotate":
                assert row["audit"]["suggested_answer"] == "Bo Ek"
            for step in ANSWER_AT[record_format]:
                row = row[step]
            assert row == ("Bo Ek" if policy == "suggested" else "Ann Vey")


def without_nulls(value: Any) -> Any:
    """The value with every null-valued key left out, at every depth: a columnar file gives a
    key some records lack as null."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def read_back(content: bytes, export_format: str, folder: Path) -> list[dict[str, Any]]:
    """The records of an export, read as a user would: JSON lines, or with pyarrow and with
    Hugging Face `datasets`, which must agree."""
    if export_format == "jsonl":
        return [json.loads(line) for line in content.decode().splitlines()]
    datasets = pytest.importorskip("datasets")
    folder.mkdir()
    if export_format == "parquet":
        path = folder / "export.parquet"
        path.write_bytes(content)
        rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
        loaded = datasets.Dataset.from_parquet(str(path), cache_dir=str(folder / "cache"))
    else:
        with tarfile.open(fileobj=io.BytesIO(content)) as tar:
            assert sorted(tar.getnames()) == [HF_DATA_FILE, HF_INFO_FILE, HF_STATE_FILE]
            tar.extractall(folder / "dataset", filter="data")
        loaded = datasets.load_from_disk(str(folder / "dataset"))
        with pa.memory_map(str(folder / "dataset" / HF_DATA_FILE)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
    assert loaded.to_list() == rows
    return rows


@pytest.mark.parametrize("export_format", EXPORT_FORMATS)
@pytest.mark.parametrize("policy", EXPORT_POLICIES)
@pytest.mark.parametrize("record_format", RECORD_FORMATS)
def test_every_policy_in_every_export_format(
    client: TestClient,
    session: Session,
    tmp_path: Path,
    record_format: str,
    policy: str,
    export_format: str,
) -> None:
    job_id = audited_job(client, session, record_format, "auto")
    response = client.get(
        f"/v1/jobs/{job_id}/export", params={"policy": policy, "format": export_format}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(MEDIA_TYPES[export_format])
    suffix = {"jsonl": "jsonl", "parquet": "parquet", "hf": "tar"}[export_format]
    assert response.headers["content-disposition"] == (
        f'attachment; filename="kma-{job_id}-{policy}.{suffix}"'
    )
    records = read_back(response.content, export_format, tmp_path / "read")
    expected = expected_export(record_format, policy)
    assert int(response.headers["X-Kma-Record-Count"]) == len(records) == len(expected)
    if export_format == "jsonl":
        assert records == expected
    else:  # every key of the records, in their order, nested ones as lists and structs
        assert without_nulls(records) == without_nulls(expected)
        assert list(records[0]) == list(expected[0])


def test_records_of_mixed_types_are_refused_as_parquet(
    client: TestClient, session: Session
) -> None:
    records = [{**QA, "id": f"m{i}", "source": source} for i, source in enumerate([1, "a", 2])]
    response = client.post("/v1/datasets", files={"file": ("t.jsonl", jsonl(*records))})
    job_id = submit(client, response.json()["id"])["id"]
    set_status(session, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    for export_format in ("parquet", "hf"):
        response = client.get(f"/v1/jobs/{job_id}/export", params={"format": export_format})
        assert response.status_code == 422
        assert response.json()["detail"] == (
            f"job {job_id} cannot be exported as {export_format}: field 'source' of record 2 is "
            "a string, and an integer in an earlier record: a column holds one type; export it "
            "as jsonl"
        )
    assert len(export_lines(client, job_id, "suggested")) == 3


# --- the worker and `kma audit` read the dataset's format ----------------------------------------


def test_a_job_over_a_messages_dataset_runs(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        workspace_id = new_workspace(session)
        dataset = Dataset(
            workspace_id=workspace_id, name="numbers", format="messages", num_examples=6
        )
        session.add(dataset)
        session.flush()
        session.add_all(
            ExampleRow(
                dataset_id=dataset.id,
                position=i,
                line=i + 1,
                record_id=str(i + 1),
                group=None,
                raw=turns(("user", f"What is number {i}?"), ("assistant", str(i))),
            )
            for i in range(6)
        )
        job = Job(
            workspace_id=workspace_id,
            dataset_id=dataset.id,
            student={"name": "fake", "engine": "hf", "model": "fake"},
            config=AuditConfig().model_dump(mode="json"),
            total=6,
        )
        session.add(job)
    engine = FakeEngine(knows_even_numbers)
    run_all(make_worker(sessions, lambda student: engine))
    with sessions() as session:
        done = session.get_one(Job, job.id)
        assert done.status == JobStatus.SUCCEEDED
        report = Report.model_validate(done.report)
        assert report.categories[Category.HIGHLY_KNOWN] == 3
        conflicts = jobs_service.list_conflicts(session, workspace_id, job.id, None, 50).items
    assert [(c.question, c.teacher_answer) for c in conflicts] == [
        (f"What is number {i}?", str(i)) for i in (1, 3, 5)
    ]


def always(text: str) -> Callable[[GenerationRequest], GenerationResult]:
    def handler(request: GenerationRequest) -> GenerationResult:
        return GenerationResult([text] * request.options.n)

    return handler


def test_kma_audit_writes_back_in_the_files_format(tmp_path: Path) -> None:
    path = tmp_path / "teacher.jsonl"
    path.write_bytes(jsonl(*dataset_of("sharegpt")))
    records = read_dataset(path)
    assert {r.format for r in records} == {"sharegpt"}
    student = Student(name="fake", model="fake", engine="hf")
    out = tmp_path / "out"
    report = audit_file(records, FakeEngine(always(" Vark")), AuditConfig(), out, student=student)
    filtered = (out / "filtered.jsonl").read_text().splitlines()
    at = ANSWER_AT["sharegpt"]
    assert filtered == [
        json.dumps(put(r, at, "Vark"), ensure_ascii=False) for r in dataset_of("sharegpt")
    ]
    assert Report.model_validate_json((out / "report.json").read_text()) == report
    assert report.student == student
    # The student always answers Vark: every example is a conflict, listed in conflicts.jsonl.
    conflicts = [json.loads(line) for line in (out / "conflicts.jsonl").read_text().splitlines()]
    assert report.conflicts == len(conflicts) == len(records)
    assert conflicts[0] == {
        "position": 0,
        "id": records[0].example.id,
        "question": records[0].example.question,
        "teacher_answer": records[0].example.answer,
        "student_answer": "Vark",
        "agreement": 1.0,
        "category": "Unknown",
    }
    assert [c["position"] for c in conflicts] == list(range(len(records)))


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (jsonl(QA), ["--format", "alpaca"], "line 1, field 'instruction'"),
        (
            jsonl(QA, MESSAGES),
            [],
            "line 2: is in the messages format, but the file is in the qa format",
        ),
    ],
)
def test_kma_audit_format_option(
    tmp_path: Path, content: bytes, args: list[str], message: str
) -> None:
    path = tmp_path / "teacher.jsonl"
    path.write_bytes(content)
    command = [sys.executable, "-m", "kma.cli", "audit", str(path), "--student", "x"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "out"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
