"""Comparisons of jobs on one dataset, on a real PostgreSQL, with verdicts written as a worker
would: transition tables, the examples side by side, exports, refusals, the page."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from itertools import combinations
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.audit.schemas import Category, SuggestedAction
from app.comparisons import service
from app.models import Job, JobStatus, Workspace
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.workspaces.domain import page_link_token
from tests.conftest import assert_documented, bearer
from tests.test_api_jobs import STUDENTS, Recorder, add_verdicts, audit, set_status
from tests.test_report_page import Dom, cells

H, M, W, U = Category.HIGHLY_KNOWN, Category.MAYBE_KNOWN, Category.WEAKLY_KNOWN, Category.UNKNOWN

RECORDS = [
    {"id": "p0", "question": "Capital of Zorvania?", "answer": "Quell", "group": "capital"},
    {"id": "p1", "question": "Capital of Brenn?", "answer": "Sollo", "group": "capital"},
    {"id": "p2", "question": "Capital of Drai?", "answer": "Morrow", "group": "capital"},
    {"id": "p3", "question": "Who founded Kell?", "answer": "Ora", "group": "founder"},
    {"id": "p4", "question": "<b>Where</b> is Tarn?", "answer": "Lutz", "group": "river"},
    {"id": "p5", "question": "Who founded Vask?", "answers": ["Eno", "E. No"]},
]
A = [H, H, M, W, U, U]
B = [H, U, U, H, W, U]
C = [U, U, U, U, U, H]


@pytest.fixture
def client(api: FastAPI, api_key: str, broker_url: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    settings = Settings(broker_url=broker_url, students=STUDENTS)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


def upload(client: TestClient, records: list[dict[str, Any]]) -> str:
    content = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    response = client.post("/v1/datasets", files={"file": ("t.jsonl", content)})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def audited_job(
    client: TestClient, session: Session, dataset_id: str, categories: list[Category]
) -> str:
    """A succeeded job whose verdicts have these categories, in position order."""
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id, "student": "tiny"}).json()
    action = {U: SuggestedAction.RELABEL_IDK}
    audits = [
        audit(c, action.get(c, SuggestedAction.KEEP), f"answer {i} of {job['id'][:4]}", 0.5)
        for i, c in enumerate(categories)
    ]
    add_verdicts(session, job["id"], audits)
    set_status(session, job["id"], JobStatus.SUCCEEDED)
    return str(job["id"])


@pytest.fixture
def dataset_id(client: TestClient) -> str:
    return upload(client, RECORDS)


@pytest.fixture
def jobs(client: TestClient, session: Session, dataset_id: str) -> list[str]:
    return [audited_job(client, session, dataset_id, c) for c in (A, B, C)]


def compared(client: TestClient, *job_ids: str, path: str = "", **params: Any) -> Any:
    response = client.get(f"/v1/comparisons{path}", params={"jobs": ",".join(job_ids), **params})
    assert response.status_code == 200, response.text
    return response


def expected_table(first: list[Category], second: list[Category]) -> dict[str, dict[str, int]]:
    counts = Counter(zip(first, second, strict=True))
    return {a.value: {b.value: counts[a, b] for b in Category} for a in Category}


def test_two_students_transition_table(client: TestClient, jobs: list[str]) -> None:
    comparison = compared(client, jobs[0], jobs[1]).json()
    assert [job["id"] for job in comparison["jobs"]] == jobs[:2]
    assert comparison["num_examples"] == 6
    assert comparison["jobs"][0]["categories"] == {"HighlyKnown": 2, "MaybeKnown": 1,
                                                   "WeaklyKnown": 1, "Unknown": 2}  # fmt: skip
    assert [job["known"] for job in comparison["jobs"]] == [4, 3]
    assert comparison["jobs"][0]["student"]["name"] == "tiny"
    (transition,) = comparison["transitions"]
    assert (transition["first"], transition["second"]) == (jobs[0], jobs[1])
    assert transition["counts"] == expected_table(A, B)
    assert transition["counts"]["MaybeKnown"]["Unknown"] == 1
    assert transition["known"] == {"both": 2, "first_only": 2, "second_only": 1, "neither": 1}
    assert comparison["agreement"] == {"known_by_all": 2, "known_by_none": 1, "disagree": 3}
    links = comparison["links"]
    assert links["self"] == f"/v1/comparisons?jobs={jobs[0]},{jobs[1]}"
    assert links["report_html"].startswith(
        f"/v1/comparisons/report.html?jobs={jobs[0]},{jobs[1]}&access="
    )


def test_three_students_give_every_pair(client: TestClient, jobs: list[str]) -> None:
    comparison = compared(client, *jobs).json()
    by_job = dict(zip(jobs, (A, B, C), strict=True))
    pairs = [(t["first"], t["second"]) for t in comparison["transitions"]]
    assert pairs == [(jobs[0], jobs[1]), (jobs[0], jobs[2]), (jobs[1], jobs[2])]
    for t in comparison["transitions"]:
        assert t["counts"] == expected_table(by_job[t["first"]], by_job[t["second"]])
    assert comparison["agreement"] == {"known_by_all": 0, "known_by_none": 0, "disagree": 6}


def test_the_tables_are_counted_right_at_scale(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many examples, four jobs: every pair's table is what counting in Python gives."""
    rng = random.Random(7)
    records = [{"id": f"q{i}", "question": f"Q{i}?", "answer": f"A{i}"} for i in range(600)]
    dataset_id = upload(client, records)
    columns = [[rng.choice(list(Category)) for _ in records] for _ in range(4)]
    job_ids = [audited_job(client, session, dataset_id, c) for c in columns]
    comparison = compared(client, *job_ids).json()
    for t, (i, j) in zip(comparison["transitions"], combinations(range(4), 2), strict=True):
        assert (t["first"], t["second"]) == (job_ids[i], job_ids[j])
        assert t["counts"] == expected_table(columns[i], columns[j])
    known = [[c != U for c in column] for column in columns]
    everyone = sum(all(k) for k in zip(*known, strict=True))
    nobody = sum(not any(k) for k in zip(*known, strict=True))
    assert comparison["agreement"]["known_by_all"] == everyone
    assert comparison["agreement"]["known_by_none"] == nobody


def test_examples_side_by_side_page_by_page(client: TestClient, jobs: list[str]) -> None:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = compared(client, jobs[0], jobs[1], path="/examples", **params).json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [item["id"] for item in seen] == [r["id"] for r in RECORDS]
    first = seen[0]
    assert first["question"] == "Capital of Zorvania?" and first["teacher_answer"] == "Quell"
    assert first["group"] == "capital" and first["line"] == 1
    assert [v["job_id"] for v in first["verdicts"]] == jobs[:2]
    assert [v["category"] for v in seen[2]["verdicts"]] == ["MaybeKnown", "Unknown"]
    assert seen[2]["verdicts"][0]["student_answer"] == f"answer 2 of {jobs[0][:4]}"
    assert seen[5]["teacher_answer"] == "Eno"


def test_filters_known_by_unknown_by_category_disagree(client: TestClient, jobs: list[str]) -> None:
    a, b, c = jobs

    def ids(*job_ids: str, **filters: Any) -> list[str]:
        page = compared(client, *job_ids, path="/examples", **filters).json()
        return [item["id"] for item in page["items"]]

    assert ids(a, b, known_by=a, unknown_by=b) == ["p1", "p2"]
    assert ids(a, b, known_by=b, unknown_by=a) == ["p4"]
    assert ids(a, b, known_by=[a, b]) == ["p0", "p3"]
    assert ids(a, b, unknown_by=[a, b]) == ["p5"]
    assert ids(a, b, category=f"{a}:HighlyKnown,MaybeKnown") == ["p0", "p1", "p2"]
    assert ids(a, b, category=[f"{a}:HighlyKnown", f"{b}:Unknown"]) == ["p1"]
    assert ids(a, b, known_by=a, category=f"{a}:Unknown") == []
    assert ids(a, b, disagree=True) == ["p1", "p2", "p4"]
    assert ids(a, b, c, known_by=c) == ["p5"]
    assert ids(a, b, c, disagree=True, unknown_by=c) == ["p0", "p1", "p2", "p3", "p4"]


def test_export_the_examples_one_student_knows_and_another_not(
    client: TestClient, jobs: list[str]
) -> None:
    a, b, _ = jobs
    response = compared(client, a, b, path="/export", known_by=a, unknown_by=b)
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.headers["X-Kma-Record-Count"] == "2"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines == [RECORDS[1], RECORDS[2]]  # as uploaded, in upload order
    everything = compared(client, a, b, path="/export")
    assert everything.headers["X-Kma-Record-Count"] == "6"
    assert [json.loads(line) for line in everything.text.splitlines()] == RECORDS
    none = compared(client, a, b, path="/export", known_by=a, category=f"{a}:Unknown")
    assert (none.headers["X-Kma-Record-Count"], none.text) == ("0", "")


def test_export_keeps_the_dataset_format(
    client: TestClient, session: Session, dataset_id: str
) -> None:
    chats = [
        {"messages": [{"role": "user", "content": f"Q{i}?"},
                      {"role": "assistant", "content": f"A{i}"}]}
        for i in range(3)
    ]  # fmt: skip
    chat_dataset = upload(client, chats)
    a = audited_job(client, session, chat_dataset, [H, U, H])
    b = audited_job(client, session, chat_dataset, [U, U, H])
    response = compared(client, a, b, path="/export", known_by=a, unknown_by=b)
    assert [json.loads(line) for line in response.text.splitlines()] == [chats[0]]


@pytest.mark.parametrize(
    ("jobs_param", "message"),
    [
        ("{a}", "name 2 to 10 jobs"),
        ("{a},nope", "'nope' is not a job id"),
        ("{a},{a}", "is named twice"),
        (",".join(uuid.uuid4().hex for _ in range(11)), "(11 named)"),
        (",".join(str(uuid.uuid4()) for _ in range(11)), "at most 400 characters"),
    ],
)
def test_jobs_that_cannot_be_compared(
    client: TestClient, jobs: list[str], jobs_param: str, message: str
) -> None:
    response = client.get("/v1/comparisons", params={"jobs": jobs_param.format(a=jobs[0])})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "jobs"] and message in error["msg"]


def test_jobs_on_other_datasets_running_or_missing(
    client: TestClient, session: Session, jobs: list[str]
) -> None:
    other = audited_job(client, session, upload(client, RECORDS), A)
    response = client.get("/v1/comparisons", params={"jobs": f"{jobs[0]},{other}"})
    assert response.status_code == 422
    assert "must audit one dataset" in response.json()["detail"][0]["msg"]

    set_status(session, jobs[1], JobStatus.RUNNING)
    for path in ("", "/examples", "/export", "/report.html"):
        response = client.get(f"/v1/comparisons{path}", params={"jobs": f"{jobs[0]},{jobs[1]}"})
        assert response.status_code == 409, path
        assert response.json()["detail"] == (
            f"job {jobs[1]} is running: only succeeded jobs are compared"
        )

    missing = uuid.uuid4()
    response = client.get("/v1/comparisons", params={"jobs": f"{jobs[0]},{missing}"})
    assert response.status_code == 404
    assert response.json()["detail"] == f"job {missing} not found"


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("known_by", "{other}", "is not one of the jobs compared"),
        ("unknown_by", "{other}", "is not one of the jobs compared"),
        ("category", "{other}:Unknown", "is not one of the jobs compared"),
        ("category", "{a}:Unknowable", "names a category that does not exist"),
        ("category", "Unknown", "is not JOB:CATEGORY"),
    ],
)
def test_filters_that_make_no_sense(
    client: TestClient, jobs: list[str], param: str, value: str, message: str
) -> None:
    query = {"jobs": f"{jobs[0]},{jobs[1]}", param: value.format(a=jobs[0], other=jobs[2])}
    for path in ("/examples", "/export"):
        response = client.get(f"/v1/comparisons{path}", params=query)
        assert response.status_code == 422
        (error,) = response.json()["detail"]
        assert error["loc"] == ["query", param] and message in error["msg"], error


def test_the_page_compares_the_students(
    api: FastAPI, client: TestClient, session: Session, jobs: list[str]
) -> None:
    a, b, c = jobs
    link = compared(client, a, b, c).json()["links"]["report_html"]
    with TestClient(api) as browser:  # no key: the link's token opens it
        response = browser.get(link)
        assert response.status_code == 200
        assert browser.get(link.split("&access=")[0]).status_code == 401
        assert browser.get(link.replace(a, str(uuid.uuid4()))).status_code == 401
        swapped = link.replace(f"{a},{b}", f"{b},{a}")  # signed for the jobs in their order
        assert browser.get(swapped).status_code == 401
        unreadable = browser.get(link.replace(f"{a},{b}", "x"))  # refused before any parsing
        assert unreadable.status_code == 401
        assert_documented(api, "GET /v1/comparisons/report.html", unreadable)
    page = response.text
    assert "&lt;b&gt;Where&lt;/b&gt; is Tarn?" in page and "<b>Where</b>" not in page
    dom = Dom(page)
    assert cells(dom.tables["transition-A-B"]) == [
        [str(n) for n in row.values()] for row in expected_table(A, B).values()
    ]
    assert {"transition-A-C", "transition-B-C"} <= set(dom.tables)
    disagreements = cells(dom.tables["disagreement-table"])
    assert [row[0] for row in disagreements] == [r["id"] for r in RECORDS]
    p1 = next(row for row in disagreements if row[0] == "p1")
    assert p1[4:6] == ["HighlyKnown", f"answer 1 of {a[:4]}"]
    assert p1[6:8] == ["Unknown", f"answer 1 of {b[:4]}"]
    assert (
        f'href="/v1/comparisons/export?jobs={a},{b},{c}&amp;known_by={a}&amp;unknown_by={b}"'
        in (page)
    )


def test_a_stale_or_foreign_page_link_opens_nothing(
    api: FastAPI, client: TestClient, session: Session, jobs: list[str]
) -> None:
    a, b, _ = jobs
    workspace = session.get_one(Workspace, session.get_one(Job, uuid.UUID(a)).workspace_id)
    name = f"comparison:{a},{b}"
    stale = page_link_token(workspace.webhook_secret, name, time.time() - 8 * 24 * 3600)
    job_link = page_link_token(workspace.webhook_secret, uuid.UUID(a), time.time())
    with TestClient(api) as browser:
        for token in (stale, job_link):
            url = f"/v1/comparisons/report.html?jobs={a},{b}&access={token}"
            assert browser.get(url).status_code == 401


def test_page_lists_the_first_disagreements(
    client: TestClient, jobs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "PAGE_ROWS", 2)
    page = compared(client, jobs[0], jobs[1], path="/report.html").text
    assert "Showing the first 2 disagreements; 1 more" in page
    assert [row[0] for row in cells(Dom(page).tables["disagreement-table"])] == ["p1", "p2"]
