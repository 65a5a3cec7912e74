"""The method's pure rules: categories, matchers, prompts, exemplar sets, the adaptive schedule."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.audit.domain import (
    AnswerKey,
    Tally,
    build_prompts,
    categorize,
    clean_answer,
    draw_exemplar_sets,
    export_record,
    judge,
    normalize,
    replay,
    sampling_rounds,
    student_answer,
    worst_case_generations,
)
from app.audit.schemas import AuditConfig, Category, SuggestedAction
from app.datasets.domain import Example

# --- categories -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p_greedy", "p_sample", "expected"),
    [
        (1.0, None, Category.HIGHLY_KNOWN),
        (1.0, 0.0, Category.HIGHLY_KNOWN),
        (0.9, None, Category.MAYBE_KNOWN),
        (0.1, 0.0, Category.MAYBE_KNOWN),
        (1e-9, None, Category.MAYBE_KNOWN),
        (0.0, 1e-9, Category.WEAKLY_KNOWN),
        (0.0, 1.0, Category.WEAKLY_KNOWN),
        (0.0, 0.0, Category.UNKNOWN),
        (0.0, None, Category.UNKNOWN),
    ],
)
def test_category_table(p_greedy: float, p_sample: float | None, expected: Category) -> None:
    assert categorize(p_greedy, p_sample) == expected


# --- matchers ---------------------------------------------------------------------------------


def test_normalize() -> None:
    assert normalize("  The   Eiffel-Tower! ") == "eiffel tower"
    assert normalize("An apple, a pear.") == "apple pear"
    assert normalize("Theatre") == "theatre"  # "the" only as a word
    assert normalize("«Paris»") == "paris"


@pytest.mark.parametrize(
    ("prediction", "golds", "expected"),
    [
        ("Paris", ["paris"], True),
        ("the Paris.", ["Paris"], True),
        ("PARIS!", ["Paris"], True),
        ("Paris, France", ["Paris"], False),
        ("Lutetia", ["Paris", "Lutetia"], True),
        ("", ["Paris"], False),
        ("the", ["a"], False),  # both normalize to nothing
    ],
)
def test_normalized_exact(prediction: str, golds: list[str], expected: bool) -> None:
    assert AnswerKey(golds, AuditConfig(matcher="normalized_exact")).matches(prediction) is expected


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("in 1789", "1789", True),
        ("1789", "17", False),  # word boundaries: "17" is not in "1789"
        ("17", "1789", False),
        ("Paris", "Paris, France", True),  # either way round
        ("Paris, France", "paris", True),
        ("New York City", "York", True),
        ("Yorkshire", "York", False),
        ("", "York", False),
    ],
)
def test_contains(prediction: str, gold: str, expected: bool) -> None:
    assert AnswerKey([gold], AuditConfig(matcher="contains")).matches(prediction) is expected


def test_token_f1() -> None:
    def key(threshold: float) -> AnswerKey:
        return AnswerKey(["New York"], AuditConfig(matcher="token_f1", f1_threshold=threshold))

    # "new york city" against "new york": precision 2/3, recall 1, F1 0.8.
    assert key(0.8).matches("the New York City")
    assert not key(0.81).matches("New York City")
    assert key(0.5).matches("York, New")  # words, in any order
    assert not key(0.01).matches("Boston")


def test_clean_answer() -> None:
    assert clean_answer(" Paris\nQ: next") == "Paris"
    assert clean_answer("  \n") == ""


# --- prompts and exemplar sets ----------------------------------------------------------------


def _examples(groups: dict[str, int]) -> list[Example]:
    return [
        Example(id=f"{g}-{i}", question=f"{g} question {i}?", answer=f"{g} answer {i}", group=g)
        for g, n in groups.items()
        for i in range(n)
    ]


def test_default_prompt_text_byte_for_byte() -> None:
    config = AuditConfig(shots=2, n_exemplar_sets=1)
    examples = [
        Example("1", "What is the capital of France?", "Paris"),
        Example("2", "Who wrote Hamlet?", "William Shakespeare"),
        Example("3", "What is 2+2?", "4"),
    ]
    sets = draw_exemplar_sets(examples, config)
    [(prompt,)] = build_prompts([examples[2]], sets, config)
    shown = [ex for ex in examples[:2]]
    # The order of exemplars is the draw's; check the exact text for that order.
    first, second = sorted(shown, key=lambda ex: prompt.index(ex.question))
    assert prompt == (
        f"Q: {first.question}\nA: {first.answer}\n\n"
        f"Q: {second.question}\nA: {second.answer}\n\n"
        "Q: What is 2+2?\nA:"
    )


def test_prompt_template_is_an_option() -> None:
    config = AuditConfig(
        shots=1,
        n_exemplar_sets=1,
        prompt={
            "exemplar": "Question: {question}\nAnswer: {answer}\n",
            "query": "Question: {question}\nAnswer:",
        },
    )
    examples = [Example("1", "q1?", "a1"), Example("2", "q2?", "a2")]
    [(prompt,)] = build_prompts([examples[1]], draw_exemplar_sets(examples, config), config)
    assert prompt == "Question: q1?\nAnswer: a1\nQuestion: q2?\nAnswer:"


def test_prompt_template_needs_its_fields() -> None:
    with pytest.raises(ValueError, match="answer"):
        AuditConfig(prompt={"exemplar": "Q: {question}\n"})
    with pytest.raises(ValueError, match="question"):
        AuditConfig(prompt={"query": "A: {answer}"})


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("Q: {question:>1000000000}\nA:", "format spec"),
        ("Q: {question!r}\nA:", "conversion"),
        ("Q: {question.__class__}\nA:", "attribute or index access"),
        ("Q: {question[0]}\nA:", "attribute or index access"),
        ("Q: {}\nA:", "positional field"),
        ("Q: {0}\nA:", "positional field"),
        ("Q: {question} {context}\nA:", "unknown field {context}"),
        ("Q: {question\nA:", "write a literal brace as {{ or }}"),
        ("Q: {question}}", "write a literal brace as {{ or }}"),
        ("Q: " + "x" * 4000 + "{question}", "at most 4000 characters"),
    ],
)
def test_prompt_template_takes_plain_fields_only(query: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)) as refused:
        AuditConfig(prompt={"query": query})
    assert [e["loc"] for e in refused.value.errors()] == [("prompt", "query")]


def test_prompt_template_keeps_escaped_braces() -> None:
    config = AuditConfig(
        shots=1,
        n_exemplar_sets=1,
        prompt={"exemplar": "{{Q}} {question} {{A}} {answer}\n", "query": "{{Q}} {question}"},
    )
    examples = [Example("1", "q1?", "a1"), Example("2", "q2?", "a2")]
    [(prompt,)] = build_prompts([examples[1]], draw_exemplar_sets(examples, config), config)
    assert prompt == "{Q} q1? {A} a1\n{Q} q2?"


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 1001},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
        {"idk_text": "x" * 1001},
        {"flag_categories": []},
        {"flag_categories": ["Unknown", "Unknown"]},
        {"temperature": float("nan")},
        {"top_p": float("inf")},
    ],
)
def test_every_config_number_is_bounded(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AuditConfig(**options)


@pytest.mark.parametrize("mode", ["adaptive", "full"])
def test_worst_case_generations(mode: str) -> None:
    assert worst_case_generations(AuditConfig(mode=mode), 40) == 40 * 10 * 17
    assert worst_case_generations(AuditConfig(samples=0, n_exemplar_sets=3), 7) == 21
    big = AuditConfig(n_exemplar_sets=100, samples=1024, max_new_tokens=512, mode=mode)
    assert worst_case_generations(big, 40) == 4_100_000


def test_exemplar_sets_never_contain_the_question_itself() -> None:
    config = AuditConfig()
    examples = _examples({"P17": 7, "P36": 30, "tiny": 3})
    sets = draw_exemplar_sets(examples, config)
    for example, prompts in zip(examples, build_prompts(examples, sets, config), strict=True):
        assert len(prompts) == config.n_exemplar_sets
        for prompt in prompts:
            shown = prompt.split("\n\n")
            assert len(shown) == config.shots + 1
            assert all(example.question not in block for block in shown[:-1])
            assert shown[-1] == f"Q: {example.question}\nA:"


def test_exemplars_come_from_the_same_group() -> None:
    config = AuditConfig()
    examples = _examples({"P17": 12, "P36": 12})
    sets = draw_exemplar_sets(examples, config)
    for prompt in build_prompts(examples[:1], sets, config)[0]:
        assert prompt.count("P17 question") == config.shots + 1
        assert "P36" not in prompt


def test_a_group_shares_its_prefixes() -> None:
    config = AuditConfig()
    examples = _examples({"P17": 40})
    sets = draw_exemplar_sets(examples, config)
    in_a_set = {c.question for s in sets["P17"] for c in s}
    outsiders = [ex for ex in examples if ex.question not in in_a_set]
    assert len(outsiders) >= 2
    a, b = build_prompts(outsiders[:2], sets, config)
    assert [p.rsplit("Q: ", 1)[0] for p in a] == [p.rsplit("Q: ", 1)[0] for p in b]


def test_exemplar_sets_are_drawn_from_the_seed() -> None:
    examples = _examples({"P17": 30})
    assert draw_exemplar_sets(examples, AuditConfig(seed=1)) == draw_exemplar_sets(
        examples, AuditConfig(seed=1)
    )
    assert draw_exemplar_sets(examples, AuditConfig(seed=1)) != draw_exemplar_sets(
        examples, AuditConfig(seed=2)
    )


def test_a_group_smaller_than_a_set_borrows_from_the_dataset() -> None:
    config = AuditConfig()
    examples = _examples({"big": 10, "small": 2})
    sets = draw_exemplar_sets(examples, config)
    small = examples[-1]
    for prompt in build_prompts([small], sets, config)[0]:
        assert prompt.count("Q: ") == config.shots + 1


# --- adaptive schedule ------------------------------------------------------------------------


def test_sampling_rounds() -> None:
    assert sampling_rounds(16) == [1, 4, 16]
    assert sampling_rounds(1) == [1]
    assert sampling_rounds(5) == [1, 4, 5]
    assert sampling_rounds(0) == []


GOLD = Example("x", "q?", "right")


@st.composite
def outcome_tables(draw: st.DrawFn) -> tuple[AuditConfig, Tally]:
    prompts = draw(st.integers(1, 6))
    samples = draw(st.integers(0, 20))
    answer = st.sampled_from(["right", "wrong", "also wrong", ""])
    # Bias towards all-wrong tables so the sampling rounds are exercised.
    greedy = draw(st.lists(answer, min_size=prompts, max_size=prompts))
    if draw(st.booleans()):
        greedy = ["wrong"] * prompts
    sample_answer = st.sampled_from(["wrong"] * 6 + ["right", "also wrong"])
    rows = draw(
        st.lists(
            st.lists(sample_answer, min_size=samples, max_size=samples),
            min_size=prompts,
            max_size=prompts,
        )
    )
    config = AuditConfig(n_exemplar_sets=prompts, samples=samples)
    return config, Tally(greedy, rows)


@settings(max_examples=400, deadline=None)
@given(outcome_tables())
def test_adaptive_gives_the_category_full_gives(case: tuple[AuditConfig, Tally]) -> None:
    config, table = case
    full = replay(GOLD, table, config.model_copy(update={"mode": "full"}))
    adaptive = replay(GOLD, table, config)
    assert adaptive.audit.category == full.audit.category
    assert adaptive.audit.generations <= full.audit.generations
    assert full.audit.generations == table.generations


def test_adaptive_stops_at_a_correct_greedy_answer() -> None:
    table = Tally(["wrong", "right"], [["wrong"] * 16, ["wrong"] * 16])
    verdict = replay(GOLD, table, AuditConfig(n_exemplar_sets=2))
    assert verdict.audit.category == Category.MAYBE_KNOWN
    assert verdict.audit.generations == 2
    assert verdict.audit.p_sample is None


def test_adaptive_stops_at_the_first_round_with_a_correct_sample() -> None:
    rows = [["wrong"] * 16, ["wrong", "wrong", "right"] + ["wrong"] * 13]
    verdict = replay(GOLD, Tally(["wrong", "wrong"], rows), AuditConfig(n_exemplar_sets=2))
    assert verdict.audit.category == Category.WEAKLY_KNOWN
    assert verdict.audit.generations == 2 + 2 * 4  # greedy, then rounds to 1 and 4 samples


def test_unknown_draws_everything() -> None:
    table = Tally(["wrong"] * 3, [["wrong"] * 16] * 3)
    verdict = replay(GOLD, table, AuditConfig(n_exemplar_sets=3))
    assert verdict.audit.category == Category.UNKNOWN
    assert verdict.audit.generations == 3 + 48
    assert verdict.audit.p_sample == 0.0


# --- the student's answer and the suggestion --------------------------------------------------


def test_student_answer_counts_normalized_forms() -> None:
    answer, agreement = student_answer(Counter(["Blemton", "blemton.", "the Blemton", "Zorv"]))
    assert normalize(answer) == "blemton"
    assert answer == "Blemton" or answer in {"blemton.", "the Blemton"}
    assert agreement == 0.75


def test_student_answer_ties_go_to_the_first_seen() -> None:
    assert student_answer(Counter(["b", "a", "a", "b"])) == ("b", 0.5)
    assert student_answer(Counter()) == ("", 0.0)


def test_flagged_consistent_student_gets_its_own_answer_and_a_conflict() -> None:
    tally = Tally(["Zorv"] * 10, [["Zorv"] * 16] * 10)
    verdict = judge(GOLD, tally, AuditConfig())
    assert verdict.audit.flagged
    assert verdict.audit.suggested_action == SuggestedAction.RELABEL_STUDENT
    assert verdict.audit.suggested_answer == "Zorv"
    assert verdict.audit.agreement == 1.0
    assert verdict.conflict


def test_flagged_unsure_student_gets_idk() -> None:
    tally = Tally(["Zorv", "Quin"] * 5, [["Zorv", "Quin"] * 8] * 10)
    verdict = judge(GOLD, tally, AuditConfig(idk_text="No idea."))
    assert verdict.audit.suggested_action == SuggestedAction.RELABEL_IDK
    assert verdict.audit.suggested_answer == "No idea."
    assert not verdict.conflict


def test_agreement_threshold_boundary() -> None:
    outputs = ["Zorv"] * 9 + ["Quin"]
    at = judge(GOLD, Tally(outputs), AuditConfig(n_exemplar_sets=10))
    assert at.audit.agreement == 0.9
    assert at.audit.suggested_action == SuggestedAction.RELABEL_STUDENT
    above = judge(GOLD, Tally(outputs), AuditConfig(student_answer_min_agreement=0.91))
    assert above.audit.suggested_action == SuggestedAction.RELABEL_IDK


def test_empty_student_answer_is_never_suggested() -> None:
    verdict = judge(GOLD, Tally([""] * 10, [[""] * 16] * 10), AuditConfig())
    assert verdict.audit.suggested_action == SuggestedAction.RELABEL_IDK


def test_known_examples_are_kept() -> None:
    verdict = judge(GOLD, Tally(["right"] * 10), AuditConfig())
    assert verdict.audit.category == Category.HIGHLY_KNOWN
    assert verdict.audit.suggested_action == SuggestedAction.KEEP
    assert verdict.audit.suggested_answer is None
    assert not verdict.conflict


def test_flag_categories_is_an_option() -> None:
    tally = Tally(["wrong"] * 9 + ["right"])
    config = AuditConfig(flag_categories=["Unknown", "MaybeKnown"])
    assert judge(GOLD, tally, config).audit.flagged
    assert not judge(GOLD, tally, AuditConfig()).audit.flagged


def test_rescoring_with_another_matcher_needs_no_generation() -> None:
    example = Example("x", "Where?", "New York")
    tally = Tally(["New York City"] * 10, [["New York City"] * 16] * 10)
    assert judge(example, tally, AuditConfig()).audit.category == Category.UNKNOWN
    contains = AuditConfig(matcher="contains")
    assert judge(example, tally, contains).audit.category == Category.HIGHLY_KNOWN


# --- export policies --------------------------------------------------------------------------


def test_export_policies() -> None:
    raw = {"id": "x", "question": "q?", "answer": "right", "extra": 1}
    flagged = judge(GOLD, Tally(["Zorv"] * 10, [["Zorv"] * 16] * 10), AuditConfig()).audit
    kept = judge(GOLD, Tally(["right"] * 10), AuditConfig()).audit
    idk = "I don't know."
    assert export_record(raw, kept, "drop", idk, "qa") == raw
    assert export_record(raw, flagged, "drop", idk, "qa") is None
    assert export_record(raw, flagged, "suggested", idk, "qa") == {**raw, "answer": "Zorv"}
    assert export_record(raw, flagged, "idk", idk, "qa") == {**raw, "answer": idk}
    assert export_record(raw, flagged, "student", idk, "qa") == {**raw, "answer": "Zorv"}
    annotated = export_record(raw, flagged, "annotate", idk, "qa")
    assert annotated is not None
    assert annotated["answer"] == "right"
    assert set(annotated["audit"]) == {
        "category",
        "flagged",
        "p_greedy",
        "p_sample",
        "student_answer",
        "agreement",
        "suggested_action",
        "suggested_answer",
        "generations",
    }


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="samples"):
        AuditConfig(samples=-1)
    with pytest.raises(ValueError, match="top_k"):
        AuditConfig(top_k=0)
    with pytest.raises(ValueError, match="flag_categories"):
        AuditConfig(flag_categories=["Unsure"])
    with pytest.raises(ValueError, match="extra"):
        AuditConfig(shot=4)
