"""Schema fuzzing: every operation the published OpenAPI schema lists, with generated requests.

Schemathesis reads `/openapi.json`, draws requests from it, valid and invalid (its coverage
phase: each field's boundaries and wrong types; then random ones), and sends them to the app in
process, on a real PostgreSQL and Redis, with an API key. No answer may be a server error, and
each must be what the schema documents: its status code, content type, headers and body (all of
Schemathesis' checks, auth enforcement included: a request whose case breaks the key, or sent
again without it, must answer 401; only `JUDGED_ON_CONTENT` may refuse a schema-valid request).
Valid ids name a seeded dataset and its jobs (succeeded, queued, cancelled) more often than
not, and valid uploads and submissions carry real JSONL and a registered student, so requests
reach past the 404s and 422s. A second test chains requests along the links Schemathesis infers.

Derandomized: CI sends the same requests every run. `KMA_FUZZ_EXAMPLES` sets the random
examples per operation and the workflows (default 20), e.g. `KMA_FUZZ_EXAMPLES=1000` for a long
run. The requests made are printed at the end, by operation and status code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation.meta import TestPhase
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, session_scope
from app.main import create_app
from app.models import ApiKey, Job
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.workspaces.domain import hash_key, new_key, shown_prefix
from app.workspaces.service import ensure_workspace
from tests.conftest import TEST_WORKSPACE, bearer, fresh_database
from tests.test_api_jobs import STUDENTS, Recorder
from tests.test_report_page import AUDITED, insert_audited_job

EXAMPLES = int(os.environ.get("KMA_FUZZ_EXAMPLES", "20"))

KEY = new_key()
"""The key cases carry. Made at import: Schemathesis builds its coverage cases, auth included,
as it collects the tests."""

STUDENT = sorted(STUDENTS)[0]
VALID_UPLOAD = "".join(json.dumps(raw) + "\n" for raw, *_ in AUDITED)

JUDGED_ON_CONTENT = [
    "POST /v1/datasets",
    "GET /v1/datasets",
    "POST /v1/jobs",
    "GET /v1/jobs",
    "POST /v1/jobs/{job_id}/rescore",
    "POST /v1/estimates",
    "PATCH /v1/jobs/{job_id}/examples",
    "PATCH /v1/jobs/{job_id}/examples/{position}",
    "GET /v1/comparisons",
    "GET /v1/comparisons/examples",
    "GET /v1/comparisons/export",
    "GET /v1/comparisons/report.html",
]
"""Operations that refuse some requests their schema allows, with a documented 422: a file whose
lines are no records, a student not registered, a webhook to a private address (a submission's,
a rescore's), a cursor that names no row, a blank reviewer's answer, a list of job ids that is
not one. There a 422 for a schema-valid request is no failure."""

app = create_app()
schema = schemathesis.openapi.from_asgi(
    "/openapi.json",
    app,
    config=schemathesis.Config.from_dict(
        {
            "operations": [
                {
                    "include-name": JUDGED_ON_CONTENT,
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                }
            ]
        }
    ),
)


@dataclass
class Seeded:
    """The rows the running test seeded, which `flatmap_case` draws from."""

    dataset_id: str = ""
    job_ids: tuple[str, ...] = ()


seeded = Seeded()
answers: Counter[tuple[str, int]] = Counter()
"""Requests made, by operation and status code."""


@schema.auth()
class Key:
    """The key, on every case that does not mean to break the Authorization header."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return KEY

    def set(self, case: schemathesis.Case, key: str, context: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {key}"


@schema.hook
def flatmap_case(
    context: schemathesis.HookContext, case: schemathesis.Case
) -> st.SearchStrategy[schemathesis.Case]:
    """Valid parts of a random case are made to matter, each more often than not: ids name the
    seeded rows, a submission or an estimate the seeded dataset and a registered student (with
    the default options and no webhook, or with the drawn ones), a rescore a judging option, an
    upload holds JSONL. Parts
    the case means to be invalid stay as they are, and so do the ids of a workflow's step."""
    assert case.meta is not None
    # A container of the case, with the values that may be put over it.
    overlays: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    linked = case.meta.phase.name == TestPhase.STATEFUL  # its path holds an answer's id
    if not case.meta.is_negative_at(ParameterLocation.PATH) and not linked:
        if "dataset_id" in case.path_parameters:
            overlays.append((case.path_parameters, [{"dataset_id": seeded.dataset_id}]))
        if "job_id" in case.path_parameters:
            overlays.append((case.path_parameters, [{"job_id": id_} for id_ in seeded.job_ids]))
    if isinstance(case.body, dict) and not case.meta.is_negative_at(ParameterLocation.BODY):
        if case.operation.label in ("POST /v1/jobs", "POST /v1/estimates"):
            valid = {"dataset_id": seeded.dataset_id, "student": STUDENT}
            overlays.append((case.body, [valid, {**valid, "config": {}, "webhook_url": None}]))
        if case.operation.label == "POST /v1/jobs/{job_id}/rescore":
            overlays.append((case.body, [{"config": {"matcher": "contains"}, "webhook_url": None}]))
        if case.operation.label == "POST /v1/datasets":
            overlays.append((case.body, [{"file": VALID_UPLOAD}]))

    def put(picked: tuple[dict[str, Any], ...]) -> schemathesis.Case:
        for (container, _), overlay in zip(overlays, picked, strict=True):
            container.update(overlay)
        return case

    return st.tuples(*(st.sampled_from([{}, *options]) for _, options in overlays)).map(put)


@schema.hook
def after_call(
    context: schemathesis.HookContext, case: schemathesis.Case, response: schemathesis.Response
) -> None:
    answers[case.operation.label, response.status_code] += 1


socket_getaddrinfo = socket.getaddrinfo


def offline(host: Any, *args: Any, **kwargs: Any) -> Any:
    """`getaddrinfo` for addresses only: a webhook host name the cases make up does not
    resolve, and no DNS query leaves the machine."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return socket_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(scope="module")
def served(
    postgres_admin_url: str, broker_url: str, request: pytest.FixtureRequest
) -> Iterator[Engine]:
    """The app on a database of its own, where its requests commit as a server's do, with
    `KEY` a key of the `tests` workspace; prints the requests made at the end."""
    with fresh_database(postgres_admin_url) as url, pytest.MonkeyPatch.context() as patch:
        engine = make_engine(url, statement_timeout_seconds=30)
        sessions = sessionmaker(engine, expire_on_commit=False)

        def request_session() -> Iterator[Session]:
            with sessions() as session:
                yield session

        # No rate limit in reach: a 429 would hide the operation behind it.
        settings = Settings(broker_url=broker_url, students=STUDENTS, rate_limit_per_minute=10**9)
        app.dependency_overrides[session_scope] = request_session
        app.dependency_overrides[get_settings] = lambda: settings
        app.dependency_overrides[get_queue] = lambda: Recorder([])
        patch.setattr(socket, "getaddrinfo", offline)
        with sessions() as session:
            workspace = ensure_workspace(session, TEST_WORKSPACE)
            session.add(
                ApiKey(
                    workspace_id=workspace.id,
                    name="fuzz",
                    prefix=shown_prefix(KEY),
                    key_hash=hash_key(KEY),
                )
            )
            session.commit()
        started = time.monotonic()
        yield engine
        seconds = time.monotonic() - started
        app.dependency_overrides.clear()
        engine.dispose()
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + summary(seconds))


def summary(seconds: float) -> str:
    operations = sorted({operation for operation, _ in answers})
    server_errors = sum(n for (_, status), n in answers.items() if status >= 500)
    lines = [
        f"schema fuzzing: {answers.total()} requests over {len(operations)} operations in"
        f" {seconds:.0f} s, {server_errors} server errors"
    ]
    for operation in operations:
        statuses = sorted(
            (status, n) for (label, status), n in answers.items() if label == operation
        )
        lines.append(f"  {operation}: " + ", ".join(f"{n} x {status}" for status, n in statuses))
    return "\n".join(lines)


@pytest.fixture
def seed(served: Engine) -> None:
    """Fresh rows for each operation: its cases may delete them."""
    seed_rows(served)


def seed_rows(engine: Engine) -> None:
    """A dataset with a succeeded, a queued and a cancelled job."""
    with Session(engine) as session:
        succeeded = insert_audited_job(session)
        dataset_id = str(session.get_one(Job, succeeded).dataset_id)
    with TestClient(app, headers=bearer(KEY)) as client:
        submit = {"dataset_id": dataset_id, "student": STUDENT}
        queued, cancelled = (client.post("/v1/jobs", json=submit).json()["id"] for _ in range(2))
        assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200
    seeded.dataset_id = dataset_id
    seeded.job_ids = (str(succeeded), queued, cancelled)


@pytest.mark.usefixtures("seed")
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    # The seeded rows are meant to be shared by the cases of one operation.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_operation_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()


def test_workflows_answer_as_documented(served: Engine) -> None:
    """Requests chained by the links Schemathesis infers from the schema: an upload's id to its
    reads and its delete, a job's id to its cancel, examples, export, report and delete."""

    class Workflow(schema.as_state_machine()):
        def setup(self) -> None:
            """Each workflow starts on the same rows, so that Hypothesis can replay it."""
            with served.begin() as connection:
                connection.execute(text("TRUNCATE dataset, job CASCADE"))
            seed_rows(served)

    Workflow.run(
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=6,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )
