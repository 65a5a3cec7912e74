"""Chat prompts: the cache keeps them apart from text, and the HF engine renders them in the tiny
student's chat template (or refuses a student that has none)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from app.audit.domain import Message
from workers.engines.base import GenerationRequest, SamplingOptions, render_chat, starts_with_bos
from workers.engines.cached import cache_key, key_prefix

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPT = "Q: Who wrote Hamlet?\nA: Shakespeare\n\nQ: Who wrote Faust?\nA:"
CHAT = (Message("user", PROMPT),)


@pytest.fixture
def chat_student(student_dir: Path, tmp_path: Path) -> Path:
    """The tiny student with a chat template added to its tokenizer_config.json."""
    folder = tmp_path / "chat-student"
    shutil.copytree(student_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


def test_chat_and_plain_requests_are_cached_apart() -> None:
    prefix = key_prefix("", "student", SamplingOptions())
    assert cache_key(prefix, PROMPT, 0) != cache_key(prefix, CHAT, 0)


def test_the_messages_are_rendered_in_the_template(chat_student: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_student)
    rendered = render_chat(tokenizer, CHAT, "chat-student")
    assert rendered == f"<s><|user|>{PROMPT}<|assistant|>"
    assert starts_with_bos(tokenizer, rendered)
    two = (Message("user", "Q: x"), Message("user", "A:"))
    assert render_chat(tokenizer, two, "chat-student") == "<s><|user|>Q: x<|user|>A:<|assistant|>"


def test_a_student_without_a_chat_template_is_refused(student_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    with pytest.raises(ValueError, match="model tiny has no chat template; turn chat_template off"):
        render_chat(tokenizer, CHAT, "tiny")


@pytest.mark.slow
def test_the_hf_engine_generates_from_the_rendered_template(chat_student: Path) -> None:
    from workers.engines.hf import HFEngine

    engine = HFEngine(str(chat_student), device="cpu")
    seen: list[list[int]] = []
    generate = engine.model.generate

    def spy(**kwargs: Any) -> Any:
        seen.extend(kwargs["input_ids"].tolist())
        return generate(**kwargs)

    engine.model.generate = spy
    try:
        greedy = SamplingOptions(max_tokens=4)
        sampled = SamplingOptions(n=3, temperature=0.7, top_k=20, max_tokens=4)
        requests = [
            GenerationRequest(CHAT, greedy),
            GenerationRequest((Message("user", "Q: x\nA:"),), greedy),
            GenerationRequest(PROMPT, greedy),  # text beside chat in one call
            GenerationRequest(CHAT, sampled),
        ]
        results = engine.generate(requests)
    finally:
        engine.close()
    assert [len(r.texts) for r in results] == [1, 1, 1, 3]
    tokenizer = engine.tokenizer
    expected = tokenizer(f"<s><|user|>{PROMPT}<|assistant|>", add_special_tokens=False)
    assert expected["input_ids"][0] == tokenizer.bos_token_id
    assert expected["input_ids"] in seen  # one BOS: the template's
    assert tokenizer(PROMPT)["input_ids"] in seen  # the text as the tokenizer takes it
    # By call: the greedy chat prompts, the text (this tokenizer adds no BOS), the sampled chat.
    assert [ids.count(tokenizer.bos_token_id) for ids in seen] == [1, 1, 0, 1]


@pytest.mark.slow
def test_the_hf_engine_refuses_chat_for_a_student_without_a_template(student_dir: Path) -> None:
    from workers.engines.hf import HFEngine

    engine = HFEngine(str(student_dir), device="cpu")
    try:
        with pytest.raises(ValueError, match="has no chat template; turn chat_template off"):
            engine.generate([GenerationRequest(CHAT, SamplingOptions())])
    finally:
        engine.close()
