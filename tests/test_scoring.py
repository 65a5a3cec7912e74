"""The scoring gives the verdicts of a plain reference, written here from the method's definitions
(DESIGN.md), on random answer tables: every matcher, both modes, through `replay` and through
the runner."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from app.audit.domain import (
    AnswerKey,
    ExemplarSets,
    Prompt,
    Tally,
    Verdict,
    build_prompts,
    clean_answer,
    draw_exemplar_sets,
    normalize,
    replay,
    sampling_rounds,
)
from app.audit.schemas import Audit, AuditConfig, Category, SuggestedAction
from app.datasets.domain import Example
from workers.engines.base import GenerationRequest, GenerationResult
from workers.engines.fake import FakeEngine
from workers.runner import audit_batch

# --- the reference ----------------------------------------------------------------------------


def reference_normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, drop a/an/the, collapse whitespace."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def reference_contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack)))


def reference_f1(prediction: str, gold: str) -> float:
    pred, ref = prediction.split(), gold.split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def reference_correct(answer: str, golds: tuple[str, ...], config: AuditConfig) -> bool:
    pred = reference_normalize(answer)
    if not pred:
        return False
    for gold in golds:
        ref = reference_normalize(gold)
        if config.matcher == "normalized_exact" and pred == ref:
            return True
        if config.matcher == "contains" and (
            reference_contains(pred.split(), ref.split())
            or reference_contains(ref.split(), pred.split())
        ):
            return True
        if config.matcher == "token_f1" and reference_f1(pred, ref) >= config.f1_threshold:
            return True
    return False


def reference_schedule(example: Example, table: Tally, config: AuditConfig) -> Tally:
    """The answers each mode reads: full mode every one; adaptive mode the greedy answers, then
    (only while every answer so far is wrong) the samples, round by round."""
    if config.mode == "full":
        return table
    seen = Tally(list(table.greedy))
    for upto in sampling_rounds(config.samples):
        if any(reference_correct(a, example.golds, config) for a in seen.outputs()):
            break
        seen = Tally(list(table.greedy), [row[:upto] for row in table.samples])
    return seen


def reference_verdict(example: Example, table: Tally, config: AuditConfig) -> Verdict:
    seen = reference_schedule(example, table, config)
    greedy_ok = [reference_correct(a, example.golds, config) for a in seen.greedy]
    samples = [a for row in seen.samples for a in row]
    sample_ok = [reference_correct(a, example.golds, config) for a in samples]
    p_greedy = sum(greedy_ok) / len(greedy_ok)
    p_sample = sum(sample_ok) / len(sample_ok) if sample_ok else None
    if p_greedy == 1.0:
        category = Category.HIGHLY_KNOWN
    elif p_greedy > 0.0:
        category = Category.MAYBE_KNOWN
    elif p_sample:
        category = Category.WEAKLY_KNOWN
    else:
        category = Category.UNKNOWN

    # The student's answer: its most frequent normalized answer, the first seen among equals,
    # written the way it was written most often (again the first seen among equals).
    outputs = seen.greedy + samples
    forms = [reference_normalize(o) for o in outputs]
    best = max(forms, key=forms.count)
    spellings = [o for o, form in zip(outputs, forms, strict=True) if form == best]
    answer = max(spellings, key=spellings.count)
    agreement = forms.count(best) / len(outputs)

    flagged = category in config.flag_categories
    consistent = best != "" and agreement >= config.student_answer_min_agreement
    if not flagged:
        action, suggested = SuggestedAction.KEEP, None
    elif consistent:
        action, suggested = SuggestedAction.RELABEL_STUDENT, answer
    else:
        action, suggested = SuggestedAction.RELABEL_IDK, config.idk_text
    audit = Audit(
        category=category,
        flagged=flagged,
        p_greedy=p_greedy,
        p_sample=p_sample,
        student_answer=answer,
        agreement=agreement,
        suggested_action=action,
        suggested_answer=suggested,
        generations=len(outputs),
    )
    return Verdict(audit, consistent and not reference_correct(answer, example.golds, config))


# --- random cases -----------------------------------------------------------------------------

GOLDS = ["Paris", "New York", "the Eiffel Tower", "1789", "São Paulo", "Zorv", "a"]
ANSWERS = [
    *GOLDS,
    "paris",
    "PARIS!",
    "the Paris.",
    "«Paris»",
    "Paris, France",
    "Lutetia",
    "New York City",
    "york",
    "Eiffel",
    "tower eiffel",
    "in 1789",
    "17",
    "Sao Paulo",
    "zorv.",
    "Blemton",
    "",
    "the",
    "  ",
    "I don't know",
]
answer_texts = st.sampled_from(ANSWERS) | st.text(max_size=12)


@st.composite
def configs(draw: st.DrawFn) -> AuditConfig:
    return AuditConfig(
        n_exemplar_sets=draw(st.integers(1, 5)),
        samples=draw(st.integers(0, 20)),
        matcher=draw(st.sampled_from(["normalized_exact", "contains", "token_f1"])),
        f1_threshold=draw(st.sampled_from([0.3, 0.5, 2 / 3, 1.0])),
        mode=draw(st.sampled_from(["adaptive", "full"])),
        flag_categories=tuple(draw(st.sets(st.sampled_from(list(Category)), min_size=1))),
        student_answer_min_agreement=draw(st.sampled_from([0.0, 0.5, 0.9, 1.0])),
    )


@st.composite
def audited(draw: st.DrawFn, config: AuditConfig, number: int) -> tuple[Example, Tally]:
    """An example with its gold answers, and the answers full mode would read: drawn from a few
    strings each, so that answers repeat and tie as a student's do."""
    golds = draw(st.lists(st.sampled_from(GOLDS), min_size=1, max_size=3, unique=True))
    example = Example(str(number), f"question {number}?", golds[0], aliases=tuple(golds[1:]))
    said = st.sampled_from(draw(st.lists(answer_texts, min_size=1, max_size=4)))
    prompts = config.n_exemplar_sets
    greedy = draw(st.lists(said, min_size=prompts, max_size=prompts))
    samples = [draw(st.lists(said, min_size=config.samples, max_size=config.samples))] * prompts
    if draw(st.booleans()):
        samples = draw(
            st.lists(
                st.lists(said, min_size=config.samples, max_size=config.samples),
                min_size=prompts,
                max_size=prompts,
            )
        )
    return example, Tally(greedy, samples)


Case = tuple[AuditConfig, list[tuple[Example, Tally]]]
"""A config, and examples with the answers full mode would read."""


@st.composite
def cases(draw: st.DrawFn, max_examples: int = 1) -> Case:
    config = draw(configs())
    count = draw(st.integers(1, max_examples))
    return config, [draw(audited(config, number)) for number in range(count)]


# --- the tests --------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(ANSWERS) | st.text())
def test_normalize_is_the_reference(text: str) -> None:
    assert normalize(text) == reference_normalize(text)


@settings(max_examples=1000, deadline=None)
@given(configs(), answer_texts, st.lists(answer_texts, min_size=1, max_size=3))
def test_matching_is_the_reference(config: AuditConfig, answer: str, golds: list[str]) -> None:
    key = AnswerKey(golds, config)
    assert key.matches(answer) == reference_correct(answer, tuple(golds), config)


@settings(max_examples=1000, deadline=None)
@given(cases())
def test_replay_gives_the_reference_verdict(case: Case) -> None:
    config, [(example, table)] = case
    assert replay(example, table, config) == reference_verdict(example, table, config)


def table_student(
    examples: list[Example], tables: list[Tally], config: AuditConfig
) -> tuple[ExemplarSets, FakeEngine]:
    """Exemplar sets, and a student that answers each prompt from its example's table: the
    greedy answer, then its samples in order, as many as asked for; each as a completion comes
    (a leading space, the next line)."""
    filler = [Example(f"f{i}", f"filler {i}?", f"answer {i}", group="g") for i in range(30)]
    sets = draw_exemplar_sets(filler, config)
    rows = {
        prompt: (table, row)
        for prompts, table in zip(build_prompts(examples, sets, config), tables, strict=True)
        for row, prompt in enumerate(prompts)
    }
    assert len(rows) == len(examples) * config.n_exemplar_sets  # every prompt its own
    drawn: Counter[Prompt] = Counter()

    def answer(request: GenerationRequest) -> GenerationResult:
        table, row = rows[request.prompt]
        if request.options.greedy:
            answers = [table.greedy[row]]
        else:
            start = drawn[request.prompt]
            drawn[request.prompt] += request.options.n
            answers = table.samples[row][start : start + request.options.n]
        return GenerationResult([f" {a}\nQ: next" for a in answers])

    return sets, FakeEngine(answer)


def cleaned(table: Tally) -> Tally:
    return Tally(
        [clean_answer(a) for a in table.greedy],
        [[clean_answer(a) for a in row] for row in table.samples],
    )


@settings(max_examples=300, deadline=None)
@given(cases(max_examples=4))
def test_the_runner_gives_the_reference_verdicts(case: Case) -> None:
    config, audits = case
    examples = [Example(ex.id, ex.question, ex.answer, ex.aliases, group="g") for ex, _ in audits]
    tables = [cleaned(table) for _, table in audits]
    sets, engine = table_student(examples, tables, config)
    result = audit_batch(examples, sets, engine, config)
    expected = [reference_verdict(ex, t, config) for ex, t in zip(examples, tables, strict=True)]
    assert result.verdicts == expected
    for tally, example, table in zip(result.tallies, examples, tables, strict=True):
        assert tally == reference_schedule(example, table, config)
