"""The service through real processes: `kma serve` on the embedded default, and the command
line client against it. Faults are tried in tests/test_faults.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from app.webhooks import SIGNATURE_HEADER, verify
from app.workspaces.domain import KEY_FILE
from kma.cli.processes import free_port, stop_process, wait_until_ready
from kma.client import Client
from kma.tiny_student import write_dataset

pytestmark = pytest.mark.slow


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kma.cli", *args], env=env, stdout=out, stderr=out
        )


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMA_")}
    return {**env, **values}


class Receiver(BaseHTTPRequestHandler):
    """A webhook endpoint that fails its first delivery, so kma has to retry."""

    deliveries: ClassVar[list[tuple[bytes, str]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.deliveries.append((body, self.headers[SIGNATURE_HEADER]))
        self.send_response(500 if len(self.deliveries) == 1 else 204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[bytes, str]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.deliveries = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook", Receiver.deliveries
    server.shutdown()


def read_export(client: Client, job_id: str, policy: str, tmp: Path) -> list[dict[str, Any]]:
    path = tmp / f"{policy}.jsonl"
    client.download(job_id, path, policy=policy)
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, student_dir: Path) -> Iterator[str]:
    """`kma serve` with no configuration but its students: embedded PostgreSQL and Redis under
    KMA_DATA_DIR; the tiny student as `tiny`, and `broken`, whose model is not there.

    Its first start saves a key in the data folder; this module's clients and commands use it
    through KMA_API_KEY, as a user's shell would.
    """
    data_dir = tmp_path_factory.mktemp("kma-data")
    port = free_port()
    students = {
        "tiny": {"engine": "hf", "model": str(student_dir)},
        "broken": {"engine": "hf", "model": str(data_dir / "no-model")},
    }
    env = clean_env(
        KMA_DATA_DIR=str(data_dir),
        KMA_STUDENTS=json.dumps(students),
        KMA_WEBHOOK_BACKOFF_SECONDS="0.5",
        KMA_WEBHOOK_ALLOW_NETWORKS='["127.0.0.0/8"]',  # the test's receiver is local
    )
    server = start(["serve", "--port", str(port)], env, data_dir / "log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{url}/readyz", server, timeout=180)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("KMA_API_KEY", (data_dir / KEY_FILE).read_text().strip())
            yield url
    finally:
        stop_process(server, timeout=60)
        print((data_dir / "log").read_text()[-3000:])


def test_serve_audits_over_http(
    served: str,
    student_dir: Path,
    tmp_path: Path,
    receiver: tuple[str, list[tuple[bytes, str]]],
) -> None:
    client = Client(served)
    path = tmp_path / "teacher.jsonl"
    facts = write_dataset(path, n_trained=30, n_unseen=20)
    dataset = client.upload_dataset(path)
    assert dataset["num_examples"] == 50
    student = "tiny"
    hook_url, deliveries = receiver
    job = client.create_job(dataset["id"], student, webhook_url=hook_url)
    job = client.wait(job["id"], timeout=600)
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] == 50
    assert job["student"] == {
        "name": "tiny", "engine": "hf", "model": str(student_dir), "revision": None
    }  # fmt: skip

    deadline = time.monotonic() + 30
    while len(deliveries) < 2:  # the first delivery was answered 500: kma tries again
        assert time.monotonic() < deadline, f"{len(deliveries)} webhook deliveries"
        time.sleep(0.2)
    secret = client.workspace()["webhook_secret"]  # the workspace's own, never a default
    for body, signature in deliveries:
        assert verify(body, signature, secret)
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert signature == f"sha256={expected}"
    delivered = json.loads(deliveries[-1][0])
    assert (delivered["id"], delivered["status"]) == (job["id"], "succeeded")

    seen = {f.id: trained for f, trained in facts}
    annotated = read_export(client, job["id"], "annotate", tmp_path)
    assert [r["id"] for r in annotated] == [f.id for f, _ in facts]
    flagged = {r["id"] for r in annotated if r["audit"]["flagged"]}
    unseen_flagged = sum(not seen[i] for i in flagged) / 20
    trained_kept = sum(seen[r["id"]] and r["id"] not in flagged for r in annotated) / 30
    assert unseen_flagged >= 0.95 and trained_kept >= 0.95, (unseen_flagged, trained_kept)

    uploaded = [json.loads(line) for line in path.read_text().splitlines()]
    dropped = read_export(client, job["id"], "drop", tmp_path)
    assert dropped == [r for r in uploaded if r["id"] not in flagged]
    by_id = {r["id"]: r["audit"] for r in annotated}
    idk = read_export(client, job["id"], "idk", tmp_path)
    student_answers = read_export(client, job["id"], "student", tmp_path)
    suggested = read_export(client, job["id"], "suggested", tmp_path)
    for row, i, s, g in zip(uploaded, idk, student_answers, suggested, strict=True):
        audit = by_id[row["id"]]
        if audit["flagged"]:
            assert i == {**row, "answer": "I don't know."}
            assert s == {**row, "answer": audit["student_answer"] or "I don't know."}
            assert g == {**row, "answer": audit["suggested_answer"]}
        else:
            assert i == s == g == row

    report = client.report(job["id"])
    assert not report.partial
    assert report.flagged == len(flagged)
    assert report.generations > 0

    again = client.wait(client.create_job(dataset["id"], student)["id"], timeout=600)
    assert again["status"] == "succeeded"
    second = client.report(again["id"])
    assert second.generations == 0
    assert second.generations_cached == report.generations_used
    assert second.categories == report.categories


def kma(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kma.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(KMA_API_KEY=os.environ["KMA_API_KEY"]),
    )


def test_the_command_line_client(served: str, tmp_path: Path) -> None:
    path = tmp_path / "teacher.jsonl"
    facts = write_dataset(path, n_trained=12, n_unseen=8)
    submitted = kma(
        "submit", str(path), "--student", "tiny",
        "--config", "samples=8", "--wait", "--server", served,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert "uploaded 20 examples (qa)" in submitted.stderr
    assert "100%" in submitted.stderr and "20/20" in submitted.stderr  # the progress bar
    assert f"job {job_id} succeeded" in submitted.stderr

    status = kma("status", job_id, "--server", served)
    assert status.returncode == 0
    job = json.loads(status.stdout)
    assert job["status"] == "succeeded"
    assert job["config"]["samples"] == 8

    out = tmp_path / "kept.jsonl"
    downloaded = kma("download", job_id, "--policy", "drop", "-o", str(out), "--server", served)
    assert downloaded.returncode == 0, downloaded.stderr
    kept = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert kept == [f.id for f, _ in facts if f.id in set(kept)]
    assert len(kept) == len(facts) - job["progress"]["flagged"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_command_line_exit_codes(served: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q2?"}\n')
    refused = kma("submit", str(bad), "--student", "tiny", "--server", served)
    assert refused.returncode == 2
    assert "line 2, field 'answer': missing" in refused.stderr

    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "Q?", "answer": "A"}\n{"question": "Q2?", "answer": "B"}\n')
    bad_config = kma("submit", str(good), "--student", "tiny", "--config", "samples=-1",
                     "--server", served)  # fmt: skip
    assert bad_config.returncode == 2
    assert "config.samples" in bad_config.stderr

    unknown = kma("submit", str(good), "--student", "/etc/passwd", "--server", served)
    assert unknown.returncode == 2
    assert "body.student" in unknown.stderr
    unregistered = kma("submit", str(good), "--student", "qwen", "--server", served)
    assert unregistered.returncode == 2
    assert "body.student: student 'qwen' is not registered (registered students: broken, tiny)" in (
        unregistered.stderr
    )

    failed = kma("submit", str(good), "--student", "broken", "--wait", "--server", served)
    assert failed.returncode == 1, failed.stderr
    assert "the student 'broken' could not be loaded by the hf engine" in failed.stderr
    assert "no-model" not in failed.stderr

    client = Client(served)
    dataset = client.upload_dataset(good)
    job = client.create_job(dataset["id"], "tiny")
    client.cancel(job["id"])
    assert kma("status", job["id"], "--server", served).returncode == 3

    missing = kma("status", "00000000-0000-0000-0000-000000000000", "--server", served)
    assert missing.returncode == 4
    assert "404" in missing.stderr
    unreachable = kma("status", job["id"], "--server", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 4
    assert "cannot reach" in unreachable.stderr
