"""The student registry: its validation, where it is declared, what a job stores of a student,
and the worker sending an openai student's key to that student's server alone."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from app.settings import Settings
from app.students.schemas import RegisteredStudent, Student
from kma.cli.server import TINY_STUDENT, default_students
from workers import jobs, tasks
from workers.engines.base import GenerationRequest, SamplingOptions
from workers.engines.openai import OpenAIEngine

TINY = {"engine": "hf", "model": "/models/tiny"}


@pytest.fixture(autouse=True)
def no_registry_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMA_STUDENTS", raising=False)
    monkeypatch.delenv("KMA_STUDENTS_FILE", raising=False)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"engine": "tpu", "model": "m"}, "Input should be 'auto', 'hf', 'vllm' or 'openai'"),
        ({"model": "m"}, "Field required"),
        ({"engine": "hf", "model": ""}, "at least 1 character"),
        ({"engine": "openai", "model": "m"}, "the openai engine needs base_url"),
        (
            {"engine": "hf", "model": "m", "base_url": "http://fleet/v1"},
            "base_url is for the openai engine, not hf",
        ),
        (
            {"engine": "vllm", "model": "m", "api_key_env": "KEY"},
            "api_key_env is for the openai engine, not vllm",
        ),
        (
            {"engine": "openai", "model": "m", "base_url": "ftp://fleet/v1"},
            "URL scheme should be 'http' or 'https'",
        ),
        (
            {"engine": "openai", "model": "m", "base_url": "http://f/v1", "api_key_env": "A-B"},
            "String should match pattern",
        ),
        ({"engine": "hf", "model": "m", "api_key": "secret"}, "Extra inputs are not permitted"),
    ],
)
def test_an_invalid_entry_is_refused_at_load(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        RegisteredStudent.model_validate(entry)
    with pytest.raises(ValidationError, match=message) as err:
        Settings(students={"s": entry})  # type: ignore[dict-item]
    assert err.value.errors()[0]["loc"][:2] == ("students", "s")


def test_a_name_must_be_a_plain_name() -> None:
    assert set(Settings(students={"Qwen/Qwen2.5-0.5B:main": TINY}).students)  # type: ignore[dict-item]
    for bad in ("", "-x", "a b", "x" * 129):
        with pytest.raises(ValidationError, match="String should match pattern"):
            Settings(students={bad: TINY})  # type: ignore[dict-item]


def test_the_registry_comes_from_the_environment_and_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = {"engine": "openai", "model": "qwen", "base_url": "http://fleet:8000/v1"}
    path = tmp_path / "students.json"
    path.write_text(json.dumps({"fleet": {**fleet, "api_key_env": "FLEET_KEY"}}))
    monkeypatch.setenv("KMA_STUDENTS", json.dumps({"tiny": TINY}))
    monkeypatch.setenv("KMA_STUDENTS_FILE", str(path))
    students = Settings().students
    assert sorted(students) == ["fleet", "tiny"]
    assert students["tiny"] == RegisteredStudent(engine="hf", model="/models/tiny")
    assert str(students["fleet"].base_url) == "http://fleet:8000/v1"
    assert students["fleet"].api_key_env == "FLEET_KEY"

    monkeypatch.setenv("KMA_STUDENTS", json.dumps({"fleet": TINY}))
    with pytest.raises(
        ValidationError, match=f"declared both in KMA_STUDENTS and in {path}: fleet"
    ):
        Settings()


def test_a_bad_registry_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "students.json"
    with pytest.raises(ValidationError, match=f"cannot read {path}"):
        Settings(students_file=path)
    path.write_text(json.dumps({"a": {"engine": "openai", "model": "m"}, "b": []}))
    with pytest.raises(ValidationError) as err:
        Settings(students_file=path)
    message = str(err.value)
    assert (
        f"{path}: a: the openai engine needs base_url, its server; b: Input should be an "
        "object" in message
    )
    path.write_text("{not json")
    with pytest.raises(ValidationError, match="Invalid JSON"):
        Settings(students_file=path)


def test_a_job_stores_no_server_and_no_key() -> None:
    fleet = RegisteredStudent(
        engine="openai",
        model="qwen",
        revision="v2",
        base_url="http://10.0.0.7:8000/v1",  # type: ignore[arg-type]
        api_key_env="FLEET_KEY",
    )
    assert fleet.spec("fleet") == {
        "name": "fleet",
        "engine": "openai",
        "model": "qwen",
        "revision": "v2",
        "api_key_set": True,
    }
    shown = Student.model_validate(fleet.spec("fleet")).model_dump()
    assert shown == {"name": "fleet", "engine": "openai", "model": "qwen", "revision": "v2"}


def test_a_job_stored_before_the_registry_is_named_by_its_model() -> None:
    old = {"model": "/models/tiny", "engine": "hf", "revision": None, "base_url": None}
    assert Student.model_validate(old).name == "/models/tiny"


def test_kma_serve_registers_the_tiny_student_by_default(tmp_path: Path) -> None:
    assert default_students(tmp_path) == {
        TINY_STUDENT: RegisteredStudent(
            engine="hf", model=str(tmp_path / "models" / "tiny-student-v1")
        )
    }


class Completions(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers "Quell" and records the keys it was sent."""

    keys: ClassVar[list[str | None]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.keys.append(self.headers.get("Authorization"))
        body = json.dumps({"choices": [{"index": 0, "text": " Quell\n"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def completions() -> Iterator[tuple[str, list[str | None]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Completions)
    Completions.keys = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", Completions.keys
    server.shutdown()
    tasks.close_engines()


def use_registry(monkeypatch: pytest.MonkeyPatch, students: dict[str, Any]) -> None:
    settings = Settings(students=students)
    monkeypatch.setattr(tasks, "get_settings", lambda: settings)


def test_the_worker_sends_a_student_key_to_its_own_server_only(
    completions: tuple[str, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, keys = completions
    monkeypatch.setenv("FLEET_KEY", "fleet-secret")
    monkeypatch.setenv("KMA_OPENAI_API_KEY", "global-secret")  # no longer sent anywhere
    fleet = {"engine": "openai", "model": "qwen", "base_url": url}
    use_registry(
        monkeypatch,
        {"fleet": {**fleet, "api_key_env": "FLEET_KEY"}, "open": fleet},
    )
    request = GenerationRequest("Q: Capital of Zorvania?\nA:", SamplingOptions())
    for name in ("fleet", "open"):
        spec = tasks.get_settings().students[name].spec(name)
        engine = tasks.engine_for(spec)
        assert isinstance(engine, OpenAIEngine)
        assert engine.generate([request])[0].texts == [" Quell"]
    assert keys == ["Bearer fleet-secret", None]


def test_the_worker_fails_a_student_it_cannot_give(
    monkeypatch: pytest.MonkeyPatch, completions: tuple[str, list[str | None]]
) -> None:
    url, _ = completions
    use_registry(
        monkeypatch,
        {
            "tiny": TINY,
            "fleet": {"engine": "openai", "model": "q", "base_url": url, "api_key_env": "NO_KEY"},
        },
    )
    monkeypatch.delenv("NO_KEY", raising=False)
    gone = {"name": "gone", "engine": "hf", "model": "/secret/path", "revision": None}
    with pytest.raises(jobs.PermanentError) as err:
        tasks.engine_for(gone)
    assert str(err.value) == "the student 'gone' is not registered on the worker"

    moved = {"name": "tiny", "engine": "hf", "model": "/models/old-tiny", "revision": None}
    with pytest.raises(jobs.PermanentError, match="registered on the worker with another"):
        tasks.engine_for(moved)

    worker: Any = type("W", (), {"engine_for": staticmethod(tasks.engine_for)})
    keyless = tasks.get_settings().students["fleet"].spec("fleet")
    with pytest.raises(jobs.PermanentError) as err:
        jobs.load_engine(worker, keyless)
    assert str(err.value) == "the student 'fleet' could not be loaded by the openai engine"
