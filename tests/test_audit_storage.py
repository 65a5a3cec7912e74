"""How audits are stored: the generation cache, verdicts with every answer of the student, and
the migration that gave answers their compact form. On the real database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.audit.domain import Tally, judge
from app.audit.repository import (
    SqlGenerationStore,
    answers_json,
    tally_from_answers,
    write_verdicts,
)
from app.audit.schemas import AuditConfig, Category
from app.datasets.domain import Example
from app.db import alembic_config, autocommit_connection, driver_connection, migrate
from app.models import Dataset, Generation, Job, Verdict
from tests.conftest import fresh_database, new_workspace

CONFIG = AuditConfig()


def test_answers_are_kept_as_distinct_texts_and_indices() -> None:
    tally = Tally(["Paris", "Lyon", "Paris"], [["Paris", "Nice"], ["Lyon", "Lyon"], ["", "Nice"]])
    stored = json.loads(answers_json(tally))
    assert stored == {
        "texts": ["Paris", "Lyon", "Nice", ""],
        "greedy": [0, 1, 0],
        "samples": [[0, 2], [1, 1], [3, 2]],
    }
    assert tally_from_answers(stored) == tally


answer_texts = st.text(alphabet=st.sampled_from(["a", "b", "é", '"', "\\", " ", "\n"]), max_size=3)


@given(
    st.integers(1, 5).flatmap(
        lambda prompts: st.tuples(
            st.lists(answer_texts, min_size=prompts, max_size=prompts),
            st.integers(0, 4).flatmap(
                lambda samples: st.lists(
                    st.lists(answer_texts, min_size=samples, max_size=samples),
                    min_size=prompts,
                    max_size=prompts,
                )
            ),
        )
    )
)
def test_every_tally_comes_back_as_it_was(answers: tuple[list[str], list[list[str]]]) -> None:
    tally = Tally(*answers)
    assert tally_from_answers(json.loads(answers_json(tally))) == tally


def test_the_cache_commits_each_write_at_once_and_keeps_the_first_answers(
    sessions: sessionmaker[Session],
) -> None:
    first, second, unknown = (bytes([i]) * 32 for i in range(3))
    with autocommit_connection(sessions) as connection:
        store = SqlGenerationStore(connection)
        store.put_many("student", {first: ["Paris", 'Zürich "x"'], second: []})
        store.put_many("student", {first: ["Lyon", "Lyon"]})
        # Nothing waits in a transaction: another session sees both rows.
        assert (
            driver_connection(connection).info.transaction_status
            == psycopg.pq.TransactionStatus.IDLE
        )
        with sessions() as other:
            assert other.scalar(select(func.count()).select_from(Generation)) == 2
        assert store.get_many([first, second, unknown]) == {
            first: ["Paris", 'Zürich "x"'],
            second: [],
        }
        assert store.get_many([]) == {}


def test_the_cache_keeps_any_text_as_it_was_made(sessions: sessionmaker[Session]) -> None:
    """The rows go to COPY as text written by hand: its escapes and JSON's both hold."""
    texts = ["a\\b", "tab\there", "line\nbreak\r", 'quote " \\" \\\\', "\u2028 é 東京 \x00", ""]
    keys = [bytes([i]) * 32 for i in range(len(texts) + 1)]
    items = {key: [text, text, "x"] for key, text in zip(keys, texts, strict=False)}
    items[keys[-1]] = texts
    with autocommit_connection(sessions) as connection:
        store = SqlGenerationStore(connection)
        store.put_many("model\\ with\ttab", items)
        assert store.get_many(keys) == items
    with sessions() as session:
        assert set(session.scalars(select(Generation.model_id))) == {"model\\ with\ttab"}


@pytest.fixture
def job_id(sessions: sessionmaker[Session]) -> uuid.UUID:
    with sessions.begin() as session:
        workspace_id = new_workspace(session)
        dataset = Dataset(workspace_id=workspace_id, name="d", format="qa", num_examples=3)
        session.add(dataset)
        session.flush()
        job = Job(
            workspace_id=workspace_id,
            dataset_id=dataset.id,
            student={"name": "s", "engine": "hf", "model": "s"},
            config=CONFIG.model_dump(mode="json"),
            total=3,
        )
        session.add(job)
        session.flush()
        return job.id


def stored_verdicts(sessions: sessionmaker[Session], job_id: uuid.UUID) -> list[Verdict]:
    with sessions() as session:
        return list(
            session.scalars(
                select(Verdict).where(Verdict.job_id == job_id).order_by(Verdict.position)
            )
        )


def test_verdicts_written_again_replace_the_first(
    sessions: sessionmaker[Session], job_id: uuid.UUID
) -> None:
    example = Example("q", "What is the capital of France?", "Paris")
    known = Tally(["Paris"] * 10)
    unknown = Tally(["Lyon"] * 10, [["Nice"] * 16 for _ in range(10)])
    with sessions.begin() as session:
        write_verdicts(
            session, job_id, [(p, judge(example, unknown, CONFIG), unknown) for p in range(3)]
        )
    with sessions.begin() as session:  # the chunk run again, its student now knowing
        write_verdicts(session, job_id, [(p, judge(example, known, CONFIG), known) for p in (1, 2)])
    rows = stored_verdicts(sessions, job_id)
    assert [(v.position, v.category) for v in rows] == [
        (0, Category.UNKNOWN.value),
        (1, Category.HIGHLY_KNOWN.value),
        (2, Category.HIGHLY_KNOWN.value),
    ]
    assert [tally_from_answers(v.answers) for v in rows] == [unknown, known, known]
    assert rows[0].audit == judge(example, unknown, CONFIG).audit.model_dump(mode="json")
    assert rows[0].flagged and not rows[1].flagged


@pytest.fixture
def database_before_compact_answers(postgres_admin_url: str) -> Iterator[str]:
    """A database at the migration before the one that compacts answers."""
    with fresh_database(postgres_admin_url) as url:
        command.downgrade(alembic_config(url), "0005-1")
        yield url


def test_the_migration_compacts_stored_answers_and_back(
    database_before_compact_answers: str,
) -> None:
    url = database_before_compact_answers
    old = [
        {"greedy": ["Paris", "Lyon"], "samples": [["Lyon", "Nice", "Paris"], ["Lyon", "", "é"]]},
        {"greedy": ["Paris", "Paris"], "samples": [[], []]},
    ]
    with psycopg.connect(url) as conn:
        workspace = conn.execute(
            "INSERT INTO workspace (id, name, webhook_secret, created_at) "
            "VALUES (gen_random_uuid(), 'w', 's', now()) RETURNING id"
        ).fetchone()
        dataset = conn.execute(
            "INSERT INTO dataset (id, workspace_id, name, format, num_examples, created_at) "
            "VALUES (gen_random_uuid(), %s, 'd', 'qa', 2, now()) RETURNING id",
            workspace,
        ).fetchone()
        job = conn.execute(
            "INSERT INTO job (id, workspace_id, dataset_id, status, student, config, total, "
            "created_at, done, highly_known, maybe_known, weakly_known, unknown, flagged, "
            "generations, cached_generations) VALUES (gen_random_uuid(), %s, %s, 'running', "
            "'{}', '{}', 2, now(), 0, 0, 0, 0, 0, 0, 0, 0) RETURNING id",
            (workspace[0], dataset[0]),
        ).fetchone()
        for position, answers in enumerate(old):
            conn.execute(
                "INSERT INTO verdict (job_id, position, category, flagged, conflict, audit, "
                "answers) VALUES (%s, %s, 'Unknown', true, false, '{}', %s)",
                (job[0], position, psycopg.types.json.Jsonb(answers)),
            )
        conn.execute("INSERT INTO generation (key, model_id, texts) VALUES ('\\x00', 'm', '[]')")

    migrate(url, "0005")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT answers FROM verdict ORDER BY position").fetchall()
        assert [tally_from_answers(answers) for (answers,) in rows] == [
            Tally(a["greedy"], a["samples"]) for a in old
        ]
        assert rows[0][0]["texts"] == ["Paris", "Lyon", "Nice", "", "é"]
        assert conn.execute("SELECT count(*) FROM generation").fetchone() == (0,)

    command.downgrade(alembic_config(url), "0005-1")
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT answers FROM verdict ORDER BY position").fetchall()
        assert [answers for (answers,) in rows] == old
