"""Reviews: a person's decisions on flagged examples, stored with who and when, counted on the
job and the report, applied by the `reviewed` export, and carried over to another job."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.audit.schemas import Category, SuggestedAction
from app.models import ApiKey, Decision, Job, JobStatus, Review, utcnow
from app.queue import get_queue
from app.reviews.service import copy_decisions
from app.settings import Settings, get_settings
from tests.conftest import bearer
from tests.test_api_jobs import (
    AUDITS,
    IDK,
    RECORDS,
    STUDENTS,
    Recorder,
    add_verdicts,
    audit,
    set_status,
    submit,
)

JSONL = b"".join(json.dumps(r).encode() + b"\n" for r in RECORDS)
STUDENT, IDK_ROW, KNOWN, WEAKLY_KNOWN, UNAUDITED = 1, 2, 0, 3, 4
"""Positions: AUDITS flags 1 (relabel to the student's "Bo Ek") and 2 (to IDK); 0 and 3 are not
flagged; 4 has no verdict."""


@pytest.fixture
def client(api: FastAPI, api_key: str, broker_url: str) -> Iterator[TestClient]:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    settings = Settings(broker_url=broker_url, students=STUDENTS)
    api.dependency_overrides[get_settings] = lambda: settings
    with TestClient(api, headers=bearer(api_key)) as client:
        yield client


def finished_job(client: TestClient, session: Session, dataset_id: str | None = None) -> str:
    if dataset_id is None:
        dataset_id = client.post("/v1/datasets", files={"file": ("t.jsonl", JSONL)}).json()["id"]
    job_id = submit(client, dataset_id, config={"idk_text": IDK})["id"]
    add_verdicts(session, job_id, AUDITS)
    set_status(session, job_id, JobStatus.SUCCEEDED, finished_at=utcnow())
    return job_id


@pytest.fixture
def job_id(client: TestClient, session: Session) -> str:
    return finished_job(client, session)


def decide(client: TestClient, job_id: str, position: int, **body: Any) -> Any:
    return client.patch(f"/v1/jobs/{job_id}/examples/{position}", json=body)


def stored(session: Session) -> dict[int, tuple[Decision, str | None]]:
    return {r.position: (r.decision, r.answer) for r in session.scalars(select(Review))}


def export(client: TestClient, job_id: str, **params: str) -> tuple[int, list[dict[str, Any]]]:
    response = client.get(f"/v1/jobs/{job_id}/export", params={"policy": "reviewed", **params})
    assert response.status_code == 200, response.text
    records = [json.loads(line) for line in response.text.splitlines()]
    assert int(response.headers["X-Kma-Record-Count"]) == len(records)
    return len(records), records


def answers(records: list[dict[str, Any]]) -> list[Any]:
    return [r.get("answer", r.get("answers")) for r in records]


# --- one example ------------------------------------------------------------------------------


def test_a_decision_is_stored_with_who_and_when(
    client: TestClient, session: Session, job_id: str
) -> None:
    before = utcnow()
    response = decide(client, job_id, STUDENT, decision="accept", note="checked the source")
    assert response.status_code == 200, response.text
    example = response.json()
    assert (example["position"], example["id"]) == (STUDENT, "b")
    review = example["review"]
    key = session.scalars(select(ApiKey)).one()
    assert review["decision"] == "accept"
    assert review["answer"] is None
    assert review["note"] == "checked the source"
    assert (review["reviewed_by"], review["api_key_id"]) == ("tests", str(key.id))
    assert before <= datetime.fromisoformat(review["reviewed_at"]) <= utcnow()
    # The listing and the example itself show it; the examples without one say null.
    page = client.get(f"/v1/jobs/{job_id}/examples").json()["items"]
    assert [e["review"] for e in page] == [None, review, None, None]
    assert client.get(f"/v1/jobs/{job_id}/examples/{STUDENT}").json() == example


def test_a_later_decision_replaces_the_earlier(
    client: TestClient, session: Session, job_id: str
) -> None:
    assert decide(client, job_id, IDK_ROW, decision="accept").status_code == 200
    response = decide(client, job_id, IDK_ROW, decision="override", answer="Lutz-on-Tarn")
    assert response.json()["review"]["answer"] == "Lutz-on-Tarn"
    assert stored(session) == {IDK_ROW: (Decision.OVERRIDE, "Lutz-on-Tarn")}


def test_the_job_and_the_report_count_the_reviews(client: TestClient, job_id: str) -> None:
    nothing = {
        "reviewed": 0,
        "unreviewed": 2,
        "decisions": {"accept": 0, "reject": 0, "override": 0},
    }
    assert client.get(f"/v1/jobs/{job_id}").json()["reviews"] == nothing
    decide(client, job_id, STUDENT, decision="reject")
    counted = {
        "reviewed": 1,
        "unreviewed": 1,
        "decisions": {"accept": 0, "reject": 1, "override": 0},
    }
    assert client.get(f"/v1/jobs/{job_id}").json()["reviews"] == counted
    assert client.get("/v1/jobs").json()["items"][0]["reviews"] == counted
    assert client.get(f"/v1/jobs/{job_id}/report").json()["reviews"] == counted
    page = client.get(f"/v1/jobs/{job_id}/report.html").text
    assert '<div class="value" id="reviewed-count">1 <small>of 2 flagged</small></div>' in page


@pytest.mark.parametrize(
    ("body", "loc", "message"),
    [
        ({"decision": "override"}, ["body", "answer"], "is required with decision override"),
        (
            {"decision": "accept", "answer": "x"},
            ["body", "answer"],
            "goes with decision override only, not accept",
        ),
        ({"decision": "override", "answer": "  "}, ["body", "answer"], "must not be blank"),
        ({"decision": "override", "answer": "a\u0000b"}, ["body", "answer"], "\\u0000"),
        ({"decision": "override", "answer": "x" * 100_001}, ["body", "answer"], "at most"),
        ({"decision": "approve"}, ["body", "decision"], "'accept', 'reject' or 'override'"),
        ({"decision": "accept", "note": "n" * 2001}, ["body", "note"], "at most 2000"),
        ({"decision": "accept", "by": "me"}, ["body", "by"], "Extra inputs"),
    ],
)
def test_a_bad_decision_names_its_field(
    client: TestClient,
    session: Session,
    job_id: str,
    body: dict[str, Any],
    loc: list[str],
    message: str,
) -> None:
    response = decide(client, job_id, STUDENT, **body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert message in error["msg"]
    assert stored(session) == {}


def test_only_flagged_audited_examples_are_reviewed(
    client: TestClient, session: Session, job_id: str
) -> None:
    for position in (KNOWN, WEAKLY_KNOWN):
        response = decide(client, job_id, position, decision="override", answer="x")
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {
                "type": "value_error",
                "loc": ["path", "position"],
                "msg": f"example {position} is not flagged: only flagged examples are reviewed",
            }
        ]
    response = decide(client, job_id, UNAUDITED, decision="accept")
    assert response.status_code == 404
    assert response.json()["detail"] == (
        f"job {job_id} has no audited example at position {UNAUDITED}"
    )
    assert decide(client, job_id, 2**31, decision="accept").status_code == 422
    assert client.get(f"/v1/jobs/{job_id}/examples/{UNAUDITED}").status_code == 404
    assert stored(session) == {}


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.FAILED])
def test_only_a_succeeded_or_cancelled_job_is_reviewed(
    client: TestClient, session: Session, job_id: str, status: JobStatus
) -> None:
    set_status(session, job_id, status)
    for response in (
        decide(client, job_id, STUDENT, decision="accept"),
        client.patch(
            f"/v1/jobs/{job_id}/examples", json={"items": [{"position": 1, "decision": "accept"}]}
        ),
    ):
        assert response.status_code == 409
        assert (
            f"is {status.value}: only a succeeded or cancelled job is reviewed"
            in (response.json()["detail"])
        )
    set_status(session, job_id, JobStatus.CANCELLED)
    assert decide(client, job_id, STUDENT, decision="accept").status_code == 200


def test_the_report_link_does_not_write(
    api: FastAPI, client: TestClient, session: Session, job_id: str
) -> None:
    link = client.get(f"/v1/jobs/{job_id}").json()["links"]["report_html"]
    access = link.split("?", 1)[1]
    with TestClient(api) as browser:  # a browser with the link, and no key
        assert browser.get(link).status_code == 200
        for response in (
            browser.patch(
                f"/v1/jobs/{job_id}/examples/{STUDENT}?{access}", json={"decision": "accept"}
            ),
            browser.patch(
                f"/v1/jobs/{job_id}/examples?{access}",
                json={"items": [{"position": STUDENT, "decision": "accept"}]},
            ),
        ):
            assert response.status_code == 401
    assert stored(session) == {}


def test_an_anonymous_decision_says_so(api: FastAPI, session: Session, broker_url: str) -> None:
    api.dependency_overrides[get_queue] = lambda: Recorder([])
    api.dependency_overrides[get_settings] = lambda: Settings(
        broker_url=broker_url, students=STUDENTS, allow_anonymous=True
    )
    with TestClient(api) as anyone:  # no key: the default workspace
        job_id = finished_job(anyone, session)
        review = decide(anyone, job_id, STUDENT, decision="accept").json()["review"]
    assert (review["reviewed_by"], review["api_key_id"]) == ("anonymous", None)


# --- many at once -----------------------------------------------------------------------------


def test_many_decisions_at_once(client: TestClient, session: Session, job_id: str) -> None:
    items = [
        {"position": STUDENT, "decision": "override", "answer": "Ann Vey", "note": "a typo"},
        {"position": IDK_ROW, "decision": "reject"},
    ]
    response = client.patch(f"/v1/jobs/{job_id}/examples", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "updated": 2,
        "reviews": {
            "reviewed": 2,
            "unreviewed": 0,
            "decisions": {"accept": 0, "reject": 1, "override": 1},
        },
    }
    assert stored(session) == {
        STUDENT: (Decision.OVERRIDE, "Ann Vey"),
        IDK_ROW: (Decision.REJECT, None),
    }


def test_one_bad_item_stores_nothing_and_is_named(
    client: TestClient, session: Session, job_id: str
) -> None:
    items = [
        {"position": STUDENT, "decision": "accept"},
        {"position": KNOWN, "decision": "accept"},
        {"position": IDK_ROW, "decision": "reject"},
        {"position": STUDENT, "decision": "reject"},
        {"position": UNAUDITED, "decision": "accept"},
    ]
    response = client.patch(f"/v1/jobs/{job_id}/examples", json={"items": items})
    assert response.status_code == 422
    assert [(e["loc"], e["msg"]) for e in response.json()["detail"]] == [
        (
            ["body", "items", 1, "position"],
            "example 0 is not flagged: only flagged examples are reviewed",
        ),
        (
            ["body", "items", 3, "position"],
            "position 1 is also item 0's: one decision an example",
        ),
        (
            ["body", "items", 4, "position"],
            f"job {job_id} has no audited example at position 4",
        ),
    ]
    assert stored(session) == {}
    # A refused shape is named by index and field too.
    items = [{"position": STUDENT, "decision": "accept"}, {"position": IDK_ROW, "decision": "?"}]
    response = client.patch(f"/v1/jobs/{job_id}/examples", json={"items": items})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "items", 1, "decision"]]
    assert client.patch(f"/v1/jobs/{job_id}/examples", json={"items": []}).status_code == 422
    assert stored(session) == {}


# --- the reviewed export ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unreviewed", "expected"),
    [
        (None, ["Quell", ["Ann Vey"], IDK, "Ora", "1820"]),
        ("suggested", ["Quell", ["Ann Vey"], IDK, "Ora", "1820"]),
        ("keep", ["Quell", ["Ann Vey"], "Lutz", "Ora", "1820"]),
        ("drop", ["Quell", ["Ann Vey"], "Ora", "1820"]),
    ],
)
def test_the_reviewed_export_applies_the_decisions(
    client: TestClient, job_id: str, unreviewed: str | None, expected: list[Any]
) -> None:
    """Example 1 is overridden; example 2 has no decision and is written as `unreviewed` says."""
    decide(client, job_id, STUDENT, decision="override", answer="Ann Vey")
    params = {"unreviewed": unreviewed} if unreviewed else {}
    count, records = export(client, job_id, **params)
    assert answers(records) == expected
    assert count == len(expected)


def test_accept_writes_the_suggestion_and_reject_the_teachers_answer(
    client: TestClient, job_id: str
) -> None:
    decide(client, job_id, STUDENT, decision="accept")
    decide(client, job_id, IDK_ROW, decision="reject")
    _, records = export(client, job_id, unreviewed="drop")
    assert [r["id"] for r in records] == ["a", "b", "c", "d", "e"]
    assert answers(records)[1:3] == [["Bo Ek"], "Lutz"]


def test_unreviewed_goes_with_the_reviewed_policy(client: TestClient, job_id: str) -> None:
    response = client.get(
        f"/v1/jobs/{job_id}/export", params={"policy": "suggested", "unreviewed": "drop"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "unreviewed"]
    response = client.get(
        f"/v1/jobs/{job_id}/export", params={"policy": "reviewed", "unreviewed": "all"}
    )
    assert response.status_code == 422


# --- carrying decisions to another job --------------------------------------------------------


def test_decisions_carry_over_to_a_job_of_the_same_dataset(
    client: TestClient, session: Session, job_id: str
) -> None:
    dataset_id = client.get(f"/v1/jobs/{job_id}").json()["dataset_id"]
    decide(client, job_id, STUDENT, decision="accept", note="seen")
    decide(client, job_id, IDK_ROW, decision="override", answer="Lutz-on-Tarn")
    source = session.get_one(Job, uuid.UUID(job_id))

    # The same suggestions: both decisions carry over, with who, when and why.
    same = session.get_one(Job, uuid.UUID(finished_job(client, session, dataset_id)))
    assert copy_decisions(session, source, same) == 2
    copied = client.get(f"/v1/jobs/{same.id}/examples").json()["items"]
    original = client.get(f"/v1/jobs/{job_id}/examples").json()["items"]
    assert [e["review"] for e in copied] == [e["review"] for e in original]

    # Another suggestion at 1 (the accepted answer is not the one suggested), 2 not flagged,
    # and a decision of the job's own at 1 already: nothing to copy.
    rescored = submit(client, dataset_id)["id"]
    add_verdicts(
        session,
        rescored,
        [
            AUDITS[0],
            audit(Category.UNKNOWN, SuggestedAction.RELABEL_STUDENT, "Bo Eck", 0.95),
            audit(Category.WEAKLY_KNOWN, SuggestedAction.KEEP, "Vark", 0.3),
        ],
    )
    set_status(session, rescored, JobStatus.SUCCEEDED, finished_at=utcnow())
    other = session.get_one(Job, uuid.UUID(rescored))
    assert copy_decisions(session, source, other) == 0
    decide(client, rescored, STUDENT, decision="reject")
    decide(client, job_id, STUDENT, decision="reject")
    assert copy_decisions(session, source, other) == 0  # its own decision stays
    reviews = client.get(f"/v1/jobs/{rescored}/examples").json()["items"]
    assert [e["review"] and e["review"]["decision"] for e in reviews] == [None, "reject", None]


def test_decisions_carry_over_only_within_a_dataset(
    client: TestClient, session: Session, job_id: str
) -> None:
    other = session.get_one(Job, uuid.UUID(finished_job(client, session)))
    with pytest.raises(ValueError, match="audit different datasets"):
        copy_decisions(session, session.get_one(Job, uuid.UUID(job_id)), other)


def test_deleting_a_job_deletes_its_decisions(
    client: TestClient, session: Session, job_id: str
) -> None:
    decide(client, job_id, STUDENT, decision="accept")
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert session.scalar(select(func.count()).select_from(Review)) == 0


def test_more_decisions_at_once_than_postgresql_takes_parameters(
    client: TestClient, session: Session, job_id: str
) -> None:
    """70,000 decisions in one batch: positions travel as one array, not one parameter each
    (PostgreSQL takes at most 65,535)."""
    job = session.get_one(Job, uuid.UUID(job_id))
    many = 70_000
    session.execute(
        text(
            "INSERT INTO example (dataset_id, position, line, record_id, raw) "
            "SELECT :dataset, i, i + 1, 'many-' || i, '{}'::json "
            "FROM generate_series(5, :last) AS i"
        ),
        {"dataset": job.dataset_id, "last": many + 4},
    )
    session.execute(
        text(
            "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, answers) "
            "SELECT :job, i, 'Unknown', true, false, CAST(:audit AS jsonb), '{}'::jsonb "
            "FROM generate_series(5, :last) AS i"
        ),
        {"job": job.id, "last": many + 4, "audit": AUDITS[1].model_dump_json()},
    )
    session.commit()
    items = [{"position": p, "decision": "reject"} for p in range(5, many + 5)]
    response = client.patch(f"/v1/jobs/{job_id}/examples", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json()["reviews"]["decisions"]["reject"] == many
    assert session.scalar(select(func.count()).select_from(Review)) == many
