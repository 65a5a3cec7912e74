"""The runner's batching and schedule, against a fake engine (logic only; real models elsewhere)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from app.audit.domain import Message, draw_exemplar_sets
from app.audit.schemas import AuditConfig, Category
from app.datasets.domain import Example
from workers.engines.base import GenerationRequest, GenerationResult
from workers.engines.fake import FakeEngine
from workers.runner import audit_batch


def world(n: int) -> list[Example]:
    """Questions whose number decides what the fake student knows: 0 known, 1 weakly, 2 not."""
    return [Example(str(i), f"question {i}?", f"answer {i}", group=f"g{i % 2}") for i in range(n)]


def student(request: GenerationRequest) -> GenerationResult:
    number = int(request.prompt.rsplit("question ", 1)[1].split("?")[0])
    kind = number % 3
    if request.options.greedy:
        text = f" answer {number}\nQ:" if kind == 0 else " nope\n"
        return GenerationResult([text])
    texts = [" nope"] * request.options.n
    if kind == 1 and request.options.n > 1:  # found from the second round on
        texts[-1] = f" answer {number}"
    return GenerationResult(texts)


@pytest.mark.parametrize("mode", ["adaptive", "full"])
def test_engine_calls_per_step_do_not_grow_with_the_batch(mode: str) -> None:
    config = AuditConfig(mode=mode)
    calls = []
    for n in (6, 60):
        examples = world(n)
        engine = FakeEngine(student)
        audit_batch(examples, draw_exemplar_sets(examples, config), engine, config)
        calls.append(len(engine.calls))
    assert calls[0] == calls[1]
    assert calls[0] == (4 if mode == "adaptive" else 2)  # greedy + 3 rounds, or greedy + all


def test_categories_and_generations() -> None:
    examples = world(30)
    config = AuditConfig()
    engine = FakeEngine(student)
    result = audit_batch(examples, draw_exemplar_sets(examples, config), engine, config)
    expected = {0: Category.HIGHLY_KNOWN, 1: Category.WEAKLY_KNOWN, 2: Category.UNKNOWN}
    for example, verdict in zip(examples, result.verdicts, strict=True):
        assert verdict.audit.category == expected[int(example.id) % 3]
    assert result.stats.greedy_generations == 300
    # Weakly known: greedy, then round one (1 sample/prompt) misses, round two (3 more) hits.
    weakly = 10 * (1 + 3)
    unknown = 10 * 16
    assert result.stats.sampled_generations == 10 * weakly + 10 * unknown
    assert [v.audit.generations for v in result.verdicts[:3]] == [10, 10 + weakly, 10 + unknown]


def test_every_sampling_field_is_passed() -> None:
    examples = world(3)
    config = AuditConfig(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=12)
    engine = FakeEngine(student)
    audit_batch(examples, draw_exemplar_sets(examples, config), engine, config)
    greedy = engine.calls[0][0].options
    assert (greedy.n, greedy.temperature, greedy.max_tokens, greedy.stop) == (1, 0.0, 12, ("\n",))
    sampled = engine.calls[1][0].options
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.max_tokens) == (
        0.7,
        20,
        0.9,
        12,
    )


def test_the_chat_template_option_asks_every_prompt_as_one_user_message() -> None:
    examples = world(6)
    plain_config = AuditConfig()
    chat_config = AuditConfig(chat_template=True)
    sets = draw_exemplar_sets(examples, plain_config)

    def chat_student(request: GenerationRequest) -> GenerationResult:
        [message] = request.prompt
        assert isinstance(message, Message) and message.role == "user"
        return student(replace(request, prompt=message.content))

    plain, chat = FakeEngine(student), FakeEngine(chat_student)
    expected = audit_batch(examples, sets, plain, plain_config).verdicts
    assert audit_batch(examples, sets, chat, chat_config).verdicts == expected
    asked = [[(r.prompt, r.options) for r in call] for call in plain.calls]
    assert len(asked) > 1
    assert [[(r.prompt[0].content, r.options) for r in call] for call in chat.calls] == asked


def test_an_engine_that_returns_too_few_samples_is_an_error() -> None:
    examples = world(3)
    config = AuditConfig()

    def short(request: GenerationRequest) -> GenerationResult:
        return GenerationResult([" nope"] * max(1, request.options.n - 1))

    with pytest.raises(RuntimeError, match="asked for 3"):
        audit_batch(examples, draw_exemplar_sets(examples, config), FakeEngine(short), config)
