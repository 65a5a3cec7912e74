"""`kma review` and `kma download --format` against a real server, as a pipeline runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from app.models import Dataset, Decision, Job, Review
from kma.cli.common import EXIT_OK, EXIT_REFUSED
from tests.servers import clean_env
from tests.test_report_page import IDK, insert_audited_job

FLAGGED = {1: "b", 2: "c", 5: "f"}
"""The audited job's flagged examples, by position: their ids."""


@pytest.fixture
def job_id(db_engine: Engine) -> Iterator[str]:
    """A finished, audited job, committed for the server; deleted after."""
    with Session(db_engine) as session:
        job_id = insert_audited_job(session)
        dataset_id = session.get_one(Job, job_id).dataset_id
    yield str(job_id)
    with Session(db_engine) as session:
        session.execute(delete(Dataset).where(Dataset.id == dataset_id))
        session.commit()


def kma(server: str, key: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kma.cli", *args, "--server", server],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(KMA_API_KEY=key),
    )


def decisions(db_engine: Engine, job_id: str) -> dict[int, tuple[Decision, str | None]]:
    with Session(db_engine) as session:
        reviews = session.scalars(select(Review).where(Review.job_id == uuid.UUID(job_id)))
        return {r.position: (r.decision, r.answer) for r in reviews}


def test_kma_review_one_example(
    server_url: str, committed_key: str, job_id: str, db_engine: Engine
) -> None:
    done = kma(server_url, committed_key, "review", job_id, "1", "--accept", "--note", "ok")
    assert done.returncode == EXIT_OK, done.stderr
    example = json.loads(done.stdout)
    assert (example["id"], example["review"]["decision"]) == ("b", "accept")
    assert (example["review"]["note"], example["review"]["reviewed_by"]) == ("ok", "reviewer")
    done = kma(server_url, committed_key, "review", job_id, "2", "--override", "Lutz-on-Tarn")
    assert done.returncode == EXIT_OK, done.stderr
    assert decisions(db_engine, job_id) == {
        1: (Decision.ACCEPT, None),
        2: (Decision.OVERRIDE, "Lutz-on-Tarn"),
    }

    refused = kma(server_url, committed_key, "review", job_id, "0", "--reject")
    assert refused.returncode == EXIT_REFUSED
    assert "path.position: example 0 is not flagged" in refused.stderr
    for usage in (["review", job_id, "1"], ["review", job_id, "--accept"]):
        refused = kma(server_url, committed_key, *usage)
        assert refused.returncode == EXIT_REFUSED
        assert "give a POSITION and one of --accept, --reject, --override ANSWER" in refused.stderr


def test_kma_review_from_a_file_stores_all_or_nothing(
    server_url: str, committed_key: str, job_id: str, db_engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "decisions.jsonl"
    path.write_text(
        '{"position": 1, "decision": "reject"}\n'
        "\n"
        '{"position": 0, "decision": "accept"}\n'
        '{"position": 5, "decision": "override"}\n'
    )
    refused = kma(server_url, committed_key, "review", job_id, "--from", str(path))
    assert refused.returncode == EXIT_REFUSED
    assert "line 4, field 'answer': Value error, is required with decision override" in (
        refused.stderr
    )
    path.write_text(path.read_text().replace('"override"', '"reject"'))
    refused = kma(server_url, committed_key, "review", job_id, "--from", str(path))
    assert refused.returncode == EXIT_REFUSED
    assert "line 3, field 'position': example 0 is not flagged" in refused.stderr
    assert decisions(db_engine, job_id) == {}

    lines = [
        {"position": 1, "decision": "reject"},
        {"position": 2, "decision": "accept", "note": "fine"},
        {"position": 5, "decision": "override", "answer": "Sollo Bay"},
    ]
    stdin = "\n".join(json.dumps(line) for line in lines)
    done = kma(server_url, committed_key, "review", job_id, "--from", "-", stdin=stdin)
    assert done.returncode == EXIT_OK, done.stderr
    assert "stored 3 decisions; 3 flagged examples reviewed, 0 to go" in done.stderr
    assert json.loads(done.stdout)["reviews"]["decisions"] == {
        "accept": 1,
        "reject": 1,
        "override": 1,
    }
    assert decisions(db_engine, job_id) == {
        1: (Decision.REJECT, None),
        2: (Decision.ACCEPT, None),
        5: (Decision.OVERRIDE, "Sollo Bay"),
    }

    path.write_text("{not json\n")
    refused = kma(server_url, committed_key, "review", job_id, "--from", str(path))
    assert refused.returncode == EXIT_REFUSED
    assert f"{path}, line 1: not valid JSON" in refused.stderr


def test_kma_download_reviewed_in_every_format(
    server_url: str, committed_key: str, job_id: str, tmp_path: Path
) -> None:
    datasets = pytest.importorskip("datasets")
    done = kma(server_url, committed_key, "review", job_id, "5", "--override", "Sollo Bay")
    assert done.returncode == EXIT_OK, done.stderr
    expected = {  # by id: "b" and "c" unreviewed (their suggestion), "f" overridden
        "a": "Quell",
        "b": ["Bo Ek"],
        "c": IDK,
        "d": "Ora",
        "e": "1820",
        "f": "Sollo Bay",
        "g": "Vel",
    }

    def answers(rows: list[dict[str, object]]) -> dict[object, object]:
        return {row["id"]: row["answer"] if row.get("answer") else row["answers"] for row in rows}

    for export_format, out in (("jsonl", "r.jsonl"), ("parquet", "r.parquet"), ("hf", "r-hf")):
        args = ["download", job_id, "--policy", "reviewed", "--format", export_format]
        done = kma(server_url, committed_key, *args, "-o", str(tmp_path / out))
        assert done.returncode == EXIT_OK, done.stderr
        assert f"wrote 7 records to {tmp_path / out}" in done.stderr
    jsonl = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert answers(jsonl) == expected
    assert answers(pq.read_table(tmp_path / "r.parquet").to_pylist()) == expected
    assert answers(datasets.load_from_disk(str(tmp_path / "r-hf")).to_list()) == expected

    args = ["download", job_id, "--policy", "reviewed", "--unreviewed", "drop", "--format", "hf"]
    done = kma(server_url, committed_key, *args, "-o", str(tmp_path / "dropped"))
    assert done.returncode == EXIT_OK, done.stderr
    kept = datasets.load_from_disk(str(tmp_path / "dropped")).to_list()
    assert [row["id"] for row in kept] == ["a", "d", "e", "f", "g"]
    # An hf download never writes into a folder that holds files.
    done = kma(server_url, committed_key, *args, "-o", str(tmp_path / "dropped"))
    assert done.returncode == EXIT_REFUSED
    assert "exists and is not an empty folder" in done.stderr
