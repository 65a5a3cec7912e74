"""Schema fuzzing: every operation the published OpenAPI schema lists, with generated requests.

Schemathesis reads `/openapi.json`, draws requests from it, valid and invalid, and sends them to
the app in process, on a real PostgreSQL and Redis, with an API key. No answer may be a server
error, and each must be what the schema documents: its status code, content type, headers and
body (all of Schemathesis' checks, auth enforcement included). The ids it draws are as often
those of a seeded dataset and its jobs (succeeded, queued, cancelled) as random ones, so the
requests reach past the 404s; uploads and submissions are as often valid ones.

Derandomized: CI sends the same requests every run. `KMA_FUZZ_EXAMPLES` sets the generated
examples per operation, e.g. `KMA_FUZZ_EXAMPLES=2000` for a long run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, session_scope
from app.main import create_app
from app.models import Job
from app.queue import get_queue
from app.settings import Settings, get_settings
from app.workspaces.service import create_key
from tests.conftest import TEST_WORKSPACE, bearer, fresh_database
from tests.test_api_jobs import STUDENTS, Recorder
from tests.test_report_page import AUDITED, insert_audited_job

EXAMPLES = int(os.environ.get("KMA_FUZZ_EXAMPLES", "20"))

JUDGED_ON_CONTENT = ["POST /v1/datasets", "POST /v1/jobs", "GET /v1/datasets", "GET /v1/jobs"]
"""Operations that refuse some requests their schema allows, with a documented 422: a file whose
lines are no records, a student not registered, a webhook to a private address, a cursor that
names no row. There a 422 for a schema-valid request is no failure."""

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
    """The key of the running module and the rows of the running test, which the hooks below
    send."""

    key: str = ""
    dataset_id: str = ""
    job_ids: tuple[str, ...] = ()


seeded = Seeded()
requests_made: Counter[str] = Counter()

STUDENT = sorted(STUDENTS)[0]
VALID_UPLOAD = "".join(json.dumps(raw) + "\n" for raw, *_ in AUDITED)


@schema.auth()
class ApiKey:
    """The key, on every request whose Authorization header the case does not mean to break."""

    def get(self, case: schemathesis.Case, context: schemathesis.AuthContext) -> str:
        return seeded.key

    def set(self, case: schemathesis.Case, key: str, context: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {key}"


@schema.hook
def flatmap_case(
    context: schemathesis.HookContext, case: schemathesis.Case
) -> st.SearchStrategy[schemathesis.Case]:
    """Valid parts of a case are made to matter, each more often than not: ids name the seeded
    rows, a submission the seeded dataset and a registered student, an upload holds JSONL."""
    assert case.meta is not None
    choices: list[tuple[dict[str, Any], str, Sequence[str]]] = []
    if not case.meta.is_negative_at(ParameterLocation.PATH):
        for name, values in (("dataset_id", [seeded.dataset_id]), ("job_id", seeded.job_ids)):
            if name in case.path_parameters:
                choices.append((case.path_parameters, name, values))
    if isinstance(case.body, dict) and not case.meta.is_negative_at(ParameterLocation.BODY):
        if case.operation.label == "POST /v1/jobs":
            choices.append((case.body, "dataset_id", [seeded.dataset_id]))
            choices.append((case.body, "student", [STUDENT]))
        if case.operation.label == "POST /v1/datasets":
            choices.append((case.body, "file", [VALID_UPLOAD]))

    def replace(picks: tuple[str | None, ...]) -> schemathesis.Case:
        for (container, name, _), pick in zip(choices, picks, strict=True):
            if pick is not None:
                container[name] = pick
        return case

    return st.tuples(*(st.sampled_from([None, *values]) for *_, values in choices)).map(replace)


@schema.hook
def after_call(context: schemathesis.HookContext, case: schemathesis.Case, response: Any) -> None:
    requests_made[case.operation.label] += 1


@pytest.fixture(scope="module")
def engine(postgres_admin_url: str) -> Iterator[Engine]:
    """A database of the fuzzer's own: its requests commit, as a server's do."""
    with fresh_database(postgres_admin_url) as url:
        engine = make_engine(url, statement_timeout_seconds=30)
        yield engine
        engine.dispose()


@pytest.fixture(scope="module")
def key(engine: Engine, broker_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The app on that database, and a key of its `tests` workspace; the requests made are
    printed at the end."""
    sessions = sessionmaker(engine, expire_on_commit=False)

    def request_session() -> Iterator[Session]:
        with sessions() as session:
            yield session

    # No rate limit in reach: a 429 would hide the operation behind it.
    settings = Settings(broker_url=broker_url, students=STUDENTS, rate_limit_per_minute=10**9)
    app.dependency_overrides[session_scope] = request_session
    app.dependency_overrides[get_settings] = lambda: settings
    app.dependency_overrides[get_queue] = lambda: Recorder([])
    with sessions() as session:
        seeded.key = create_key(session, "fuzz", TEST_WORKSPACE)[1]
        session.commit()
    started = time.monotonic()
    yield seeded.key
    app.dependency_overrides.clear()
    seconds = time.monotonic() - started
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(
            f"\nschema fuzzing: {requests_made.total()} requests over {len(requests_made)}"
            f" operations in {seconds:.0f} s"
        )


@pytest.fixture
def seed(engine: Engine, key: str) -> None:
    """A dataset with a succeeded, a queued and a cancelled job, fresh for each operation (its
    examples may delete them)."""
    with Session(engine) as session:
        succeeded = insert_audited_job(session)
        dataset_id = str(session.get_one(Job, succeeded).dataset_id)
    with TestClient(app, headers=bearer(key)) as client:
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
    # The seeded rows are meant to be shared by the examples of one operation.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_every_operation_answers_as_documented(case: schemathesis.Case) -> None:
    case.call_and_validate()
