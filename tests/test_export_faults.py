"""The kill trial: `kma download` from a real API process that is SIGKILLed part way through.

The download must end non-zero and leave no file at all, neither the output nor a partial one.
The numbers (time to the kill, bytes received by then, exit status) go to
tests/artifacts/export_faults.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from app.audit.schemas import Audit, AuditConfig, Category, SuggestedAction
from app.db import make_engine
from app.models import Dataset, Job, JobStatus, utcnow
from kma.cli.common import EXIT_OK, EXIT_SERVER
from kma.cli.processes import free_port, stop_process, wait_until_ready
from tests.conftest import fresh_database, new_workspace
from tests.servers import clean_env, kill, make_key, start_kma

pytestmark = pytest.mark.slow

EXAMPLES = 200_000
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def finished_job(postgres_admin_url: str) -> Iterator[tuple[str, str]]:
    """A database holding a succeeded job over EXAMPLES small qa examples, each with a verdict:
    its URL and the job's id."""
    with fresh_database(postgres_admin_url) as url:
        engine = make_engine(url)
        with Session(engine) as session:
            dataset = Dataset(
                workspace_id=new_workspace(session, "default"),
                name="many.jsonl",
                format="qa",
                num_examples=EXAMPLES,
            )
            session.add(dataset)
            session.flush()
            job = Job(
                id=uuid.uuid4(),
                workspace_id=dataset.workspace_id,
                dataset_id=dataset.id,
                status=JobStatus.SUCCEEDED,
                student={"name": "tiny", "engine": "hf", "model": "tiny"},
                config=AuditConfig().model_dump(mode="json"),
                total=EXAMPLES,
                finished_at=utcnow(),
            )
            session.add(job)
            session.flush()
            keep = Audit(
                category=Category.HIGHLY_KNOWN,
                flagged=False,
                p_greedy=1.0,
                p_sample=None,
                student_answer="A",
                agreement=1.0,
                suggested_action=SuggestedAction.KEEP,
                suggested_answer=None,
                generations=10,
            )
            ids = {"dataset_id": dataset.id, "job_id": job.id, "n": EXAMPLES}
            session.execute(
                text(
                    "INSERT INTO example (dataset_id, position, line, record_id, raw) "
                    "SELECT :dataset_id, i, i + 1, 'q' || i, json_build_object("
                    "'id', 'q' || i, 'question', 'What is fact ' || i || '?', "
                    "'answer', 'Answer ' || i) FROM generate_series(0, :n - 1) AS i"
                ),
                ids,
            )
            session.execute(
                text(
                    "INSERT INTO verdict (job_id, position, category, flagged, conflict, "
                    "audit, answers) SELECT :job_id, i, 'HighlyKnown', false, false, "
                    "CAST(:audit AS jsonb), '{}'::jsonb FROM generate_series(0, :n - 1) AS i"
                ),
                {**ids, "audit": json.dumps(keep.model_dump(mode="json"))},
            )
            session.commit()
            job_id = str(job.id)
        engine.dispose()
        yield url, job_id


@pytest.fixture
def api(
    finished_job: tuple[str, str], broker_url: str, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes], str]]:
    database_url, _ = finished_job
    port = free_port()
    env = clean_env(KMA_DATABASE_URL=database_url, KMA_BROKER_URL=broker_url)
    args = ["api", "--host", "127.0.0.1", "--port", str(port)]
    process = start_kma(args, env, tmp_path / "api.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/healthz", process, timeout=30)
        yield url, process, make_key(database_url)
    finally:
        if process.poll() is None:
            stop_process(process)


def download(job_id: str, out: Path, server: str, key: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kma.cli", "download", job_id, "-o", str(out), "--server", server],
        env=clean_env(KMA_API_KEY=key),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def partial_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.part"))


def test_a_killed_server_leaves_no_file(
    finished_job: tuple[str, str],
    api: tuple[str, subprocess.Popen[bytes], str],
    tmp_path: Path,
) -> None:
    _, job_id = finished_job
    url, server, key = api
    whole = tmp_path / "whole"
    whole.mkdir()
    started = time.monotonic()
    control = download(job_id, whole / "out.jsonl", url, key)
    _, stderr = control.communicate(timeout=60)
    whole_seconds = time.monotonic() - started
    assert control.returncode == EXIT_OK, stderr
    assert f"wrote {EXAMPLES} records" in stderr

    folder = tmp_path / "killed"
    folder.mkdir()
    out = folder / "out.jsonl"
    started = time.monotonic()
    downloading = download(job_id, out, url, key)
    while partial_bytes(folder) < 1 << 20:  # the body is flowing: a MiB has arrived
        assert downloading.poll() is None, downloading.communicate()
        assert time.monotonic() - started < 30, "the download did not start"
        time.sleep(0.01)
    received = partial_bytes(folder)
    kill(server)
    killed_after = time.monotonic() - started
    _, stderr = downloading.communicate(timeout=30)
    exited_after = time.monotonic() - started

    assert downloading.returncode == EXIT_SERVER, stderr
    assert "incomplete" in stderr and f"of {EXAMPLES} records" in stderr, stderr
    assert list(folder.iterdir()) == []  # neither out.jsonl nor a partial file

    ARTIFACTS.mkdir(exist_ok=True)
    results = {
        "examples": EXAMPLES,
        "whole_download_seconds": round(whole_seconds, 2),
        "whole_download_bytes": (whole / "out.jsonl").stat().st_size,
        "killed_after_seconds": round(killed_after, 2),
        "bytes_received_before_kill": received,
        "download_exited_after_seconds": round(exited_after, 2),
        "download_exit_status": downloading.returncode,
        "download_message": stderr.strip().splitlines()[-1],
    }
    (ARTIFACTS / "export_faults.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
