"""The openai engine: its HTTP logic against a mock transport, then against a real `vllm serve`
of the tiny student, whose greedy answers must match the in-process vLLM engine's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.audit.domain import Message, build_prompts, clean_answer, draw_exemplar_sets
from app.audit.schemas import AuditConfig
from kma.cli.processes import free_port, wait_until_ready
from kma.tiny_student import write_dataset
from workers.engines import load_engine
from workers.engines.base import (
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)
from workers.engines.openai import CompletionServerError, OpenAIEngine
from workers.local_audit import read_dataset
from workers.runner import greedy_options, sample_options

BASE_URL = "http://served:8000/v1"
Handler = Callable[[httpx.Request], Any]


def completion(*texts: str, reverse: bool = False) -> httpx.Response:
    choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
    return httpx.Response(200, json={"choices": choices[::-1] if reverse else choices})


@contextmanager
def mock_engine(handler: Handler, **options: Any) -> Iterator[OpenAIEngine]:
    options.setdefault("backoff_seconds", 0.0)
    engine = OpenAIEngine(
        "student", base_url=BASE_URL, transport=httpx.MockTransport(handler), **options
    )
    try:
        yield engine
    finally:
        engine.close()


def test_every_sampling_field_is_sent() -> None:
    bodies: list[dict[str, Any]] = []
    headers: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and str(request.url) == f"{BASE_URL}/completions"
        bodies.append(json.loads(request.content))
        headers.append(request.headers)
        return completion("a", "b")

    options = SamplingOptions(n=2, temperature=0.7, top_k=20, top_p=0.9, max_tokens=16)
    with mock_engine(handler, api_key="secret") as engine:
        engine.generate([GenerationRequest("Q: x\nA:", options)])
    assert bodies == [
        {
            "model": "student",
            "prompt": "Q: x\nA:",
            "n": 2,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.9,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": 16,
            "stop": ["\n"],
            "stream": False,
        }
    ]
    assert headers[0]["authorization"] == "Bearer secret"


def test_chat_requests_go_to_chat_completions_with_every_sampling_field() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST" and str(request.url) == f"{BASE_URL}/chat/completions"
        bodies.append(json.loads(request.content))
        choices = [
            {"index": 1, "message": {"role": "assistant", "content": "Blai\nQ:"}},
            {"index": 0, "message": {"role": "assistant", "content": "Zorv"}},
        ]
        return httpx.Response(200, json={"choices": choices})

    options = SamplingOptions(n=2, temperature=0.7, top_k=20, top_p=0.9, max_tokens=16)
    prompt = (Message("system", "Answer in one line."), Message("user", "Q: x\nA:"))
    with mock_engine(handler) as engine:
        [result] = engine.generate([GenerationRequest(prompt, options)])
    assert result.texts == ["Zorv", "Blai"]
    assert bodies == [
        {
            "model": "student",
            "messages": [
                {"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Q: x\nA:"},
            ],
            "n": 2,
            "temperature": 0.7,
            "top_k": 20,
            "top_p": 0.9,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": 16,
            "stop": ["\n"],
            "stream": False,
        }
    ]


def test_order_is_kept_with_many_requests_in_flight() -> None:
    in_flight, most_in_flight, finished = 0, 0, []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most_in_flight
        prompt = json.loads(request.content)["prompt"]
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.001 * (int(prompt[1:]) * 7 % 13))  # finish out of order
        in_flight -= 1
        finished.append(prompt)
        return completion(f"answer to {prompt}")

    prompts = [f"p{i}" for i in range(200)]
    with mock_engine(handler, max_in_flight=16) as engine:
        results = engine.generate([GenerationRequest(p, SamplingOptions()) for p in prompts])
    assert results == [GenerationResult([f"answer to {p}"]) for p in prompts]
    assert most_in_flight == 16
    assert finished != prompts


def test_choices_sorted_by_index_and_cut_at_stop() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return completion("Zorv\nQ: next", "Blai. Then", "Krou", reverse=True)

    options = SamplingOptions(n=3, temperature=1.0, stop=("\n", "."))
    with mock_engine(handler) as engine:
        [result] = engine.generate([GenerationRequest("Q: x\nA:", options)])
    assert result.texts == ["Zorv", "Blai", "Krou"]


def test_retries_connection_errors_and_503() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if calls == 2:
            return httpx.Response(503, text="loading")
        return completion("Zorv")

    with mock_engine(handler) as engine:
        results = engine.generate([GenerationRequest("Q", SamplingOptions())])
    assert results == [GenerationResult(["Zorv"])]
    assert calls == 3


def test_gives_up_after_the_last_attempt() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(429, text="slow down")

    with mock_engine(handler, attempts=3) as engine, pytest.raises(EngineUnavailable) as err:
        engine.generate([GenerationRequest("Q", SamplingOptions())])
    assert calls == 3
    assert "429 slow down (after 3 attempts)" in str(err.value)


def test_a_refused_request_is_a_clear_error_at_once() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"message": "max_tokens is too large"})

    with mock_engine(handler) as engine, pytest.raises(CompletionServerError) as err:
        engine.generate([GenerationRequest("Q", SamplingOptions())])
    assert calls == 1
    assert f"POST {BASE_URL}/completions: 400" in str(err.value)
    assert "max_tokens is too large" in str(err.value)


def test_model_id_names_the_weights_not_the_server() -> None:
    with mock_engine(lambda request: completion("a"), revision="v2") as engine:
        assert engine.model_id == "student@v2"


def test_the_openai_engine_needs_its_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMA_OPENAI_BASE_URL", "http://fleet:8000/v1/")  # no fallback any more
    with pytest.raises(ValueError, match="needs a server"):
        load_engine("openai", "student")
    with pytest.raises(ValueError, match="openai engine"):
        load_engine("hf", "student", base_url=BASE_URL)
    with pytest.raises(ValueError, match="openai engine"):
        load_engine("hf", "student", api_key="secret")


def test_an_engine_name_outside_the_list_is_refused() -> None:
    with pytest.raises(ValueError, match="no engine is named 'tpu'; the engines: auto, hf, vllm"):
        load_engine("tpu", "student")  # type: ignore[arg-type]
    engine = load_engine("openai", "student", base_url=BASE_URL)
    assert isinstance(engine, OpenAIEngine)
    assert engine.url == f"{BASE_URL}/completions"
    engine.close()


# ---------------------------------------------------------------------------------------------
# Against a real `vllm serve` of the tiny student, on this CPU
# ---------------------------------------------------------------------------------------------


@contextmanager
def vllm_server(model: Path, log_path: Path, timeout: float = 240) -> Iterator[str]:
    """`vllm serve` of `model` on a free port: its base URL; stopped, with its children, after."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
             "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
             "--enforce-eager", "--port", str(port), "--host", "127.0.0.1",
             "--generation-config", "vllm"],
            stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the engine core goes with it
        )  # fmt: skip
    try:
        wait_until_ready(f"{base_url}/models", server, timeout)
        yield base_url
    finally:
        server.terminate()
        with suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
        with suppress(ProcessLookupError):  # whatever of the group is left, the parent included
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@dataclass
class Served:
    greedy: list[GenerationRequest]
    greedy_results: list[GenerationResult]
    sampled: list[GenerationRequest]
    sampled_results: list[GenerationResult]
    startup_seconds: float


@pytest.fixture(scope="module")
def served(student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The server's answers; the server is gone before the in-process engine loads."""
    pytest.importorskip("vllm", reason="vLLM is installed by scripts/test")
    folder = tmp_path_factory.mktemp("served")
    write_dataset(folder / "teacher.jsonl", n_trained=20, n_unseen=10)
    config = AuditConfig()
    examples = [r.example for r in read_dataset(folder / "teacher.jsonl")]
    sets = draw_exemplar_sets(examples, config)
    prompts = [p for per_example in build_prompts(examples, sets, config) for p in per_example]
    greedy = [GenerationRequest(p, greedy_options(config)) for p in prompts]
    sampled = [GenerationRequest(p, sample_options(config, 4)) for p in prompts[:20]]

    started = time.monotonic()
    with vllm_server(student_dir, folder / "vllm-serve.log") as base_url:
        startup_seconds = time.monotonic() - started
        engine = load_engine("openai", str(student_dir), base_url=base_url)
        try:
            return Served(
                greedy,
                engine.generate(greedy),
                sampled,
                engine.generate(sampled),
                startup_seconds,
            )
        finally:
            engine.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_served_greedy_answers_match_in_process_vllm(served: Served, student_dir: Path) -> None:
    from workers.engines.vllm import VLLMEngine

    engine = VLLMEngine(str(student_dir), max_model_len=512)
    try:
        local = engine.generate(served.greedy)
    finally:
        engine.close()
    remote = [clean_answer(r.texts[0]) for r in served.greedy_results]
    local_answers = [clean_answer(r.texts[0]) for r in local]
    agree = sum(a == b for a, b in zip(remote, local_answers, strict=True)) / len(remote)
    print(f"vllm serve up in {served.startup_seconds:.0f} s; greedy agreement {agree:.1%}")
    assert len(served.greedy) == 300
    assert agree >= 0.95, f"greedy answers agree on {agree:.1%} of prompts"


@pytest.mark.slow
@pytest.mark.vllm
def test_served_samples_n_texts(served: Served) -> None:
    assert len(served.sampled_results) == len(served.sampled)
    for result in served.sampled_results:
        assert len(result.texts) == 4
        assert not any("\n" in t for t in result.texts)
    # Sampling at temperature 1 does not return four copies of the greedy answer everywhere.
    assert any(len(set(r.texts)) > 1 for r in served.sampled_results)
