"""The SliCK method as pure functions: prompts, matching, categories, adaptive sampling, relabels.

Everything here works on plain data, so a finished audit can be re-scored (another matcher,
other thresholds) from its stored generations without a model.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from app.audit.schemas import (
    Audit,
    AuditConfig,
    Category,
    ConflictRead,
    GroupCounts,
    ReportCounts,
    SuggestedAction,
)
from app.datasets.domain import Example, with_answer
from app.models import Decision
from app.reviews.domain import DEFAULT_UNREVIEWED, Review, Unreviewed

# --- matching ---------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")


class _PunctuationToSpaces(dict[int, int]):
    """A `str.translate` table: Unicode punctuation (category P*) to a space, every other
    character to itself; filled in as characters are first met."""

    def __missing__(self, char: int) -> int:
        mapped = self[char] = ord(" ") if unicodedata.category(chr(char)).startswith("P") else char
        return mapped


_PUNCTUATION_TO_SPACES = _PunctuationToSpaces()


@functools.lru_cache(maxsize=1 << 12)
def normalize(text: str) -> str:
    """Lowercase, punctuation to spaces, drop a/an/the, collapse whitespace.

    Cached: an example's answers are mostly a few strings said over and over.
    """
    text = text.lower().translate(_PUNCTUATION_TO_SPACES)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _token_f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class AnswerKey:
    """One example's gold answers, normalized once, and the config's matcher to compare answers
    with them: `normalized_exact` (equal normalized forms), `contains` (one's words a run of the
    other's, either way) or `token_f1` (the F1 of their words at least `f1_threshold`)."""

    __slots__ = ("f1_threshold", "matcher", "ref_words", "refs")

    def __init__(self, golds: Iterable[str], config: AuditConfig) -> None:
        self.matcher = config.matcher
        self.f1_threshold = config.f1_threshold
        self.refs = {normalize(gold) for gold in golds}
        self.ref_words = [ref.split() for ref in self.refs]

    def matches(self, prediction: str) -> bool:
        """Whether the prediction matches any gold answer; an empty one never does."""
        pred = normalize(prediction)
        if not pred:
            return False
        if self.matcher == "normalized_exact":
            return pred in self.refs
        words = pred.split()
        if self.matcher == "contains":
            return any(_contains(words, ref) or _contains(ref, words) for ref in self.ref_words)
        return any(_token_f1(words, ref) >= self.f1_threshold for ref in self.ref_words)

    def any_match(self, predictions: Iterable[str]) -> bool:
        """Whether any prediction matches; each distinct one is looked at once."""
        return any(self.matches(p) for p in set(predictions))


# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exemplar:
    question: str
    answer: str


ExemplarSets = dict[str, list[list[Exemplar]]]
"""Per group: `n_exemplar_sets` candidate lists of `shots + 1` exemplars each."""


def group_key(example: Example) -> str:
    return example.group or ""


@dataclass(frozen=True)
class ExemplarDraw:
    """Which examples one group's exemplar sets hold, as indices into the pool they come from."""

    whole_dataset: bool
    """The pool is every example of the dataset (the group is too small), else the group's own."""
    sets: list[list[int]]
    """Per exemplar set, its candidates in draw order: indices into the pool (in position order)."""


def draw_exemplar_indices(
    group_sizes: Mapping[str, int], config: AuditConfig
) -> dict[str, ExemplarDraw]:
    """Each group's exemplar draw from the seed, knowing only how many examples each group has.

    A set holds one candidate more than `shots`, so the question itself can be left out of its
    own prompt while every other question of the group shares the same prefixes. A group too small
    to fill a set draws from the whole dataset. `random.sample` makes the same draws on a pool's
    indices as on the pool itself (its draws depend only on the pool's size), so this can be
    computed before a single example is read.
    """
    total = sum(group_sizes.values())
    size = config.shots + 1
    draws: dict[str, ExemplarDraw] = {}
    for key in sorted(group_sizes):
        whole_dataset = group_sizes[key] < size
        n = total if whole_dataset else group_sizes[key]
        rng = random.Random(f"{config.seed}:{key}")
        sets = [rng.sample(range(n), min(size, n)) for _ in range(config.n_exemplar_sets)]
        draws[key] = ExemplarDraw(whole_dataset, sets)
    return draws


def draw_exemplar_sets(examples: Sequence[Example], config: AuditConfig) -> ExemplarSets:
    """Draw each group's exemplar sets once, from the seed (see `draw_exemplar_indices`).

    `examples` is the whole dataset in position order; `app.audit.repository` draws the same sets
    without loading it.
    """
    by_group: dict[str, list[Exemplar]] = {}
    for ex in examples:
        by_group.setdefault(group_key(ex), []).append(Exemplar(ex.question, ex.answer))
    everyone = [Exemplar(ex.question, ex.answer) for ex in examples]
    draws = draw_exemplar_indices({key: len(pool) for key, pool in by_group.items()}, config)
    sets: ExemplarSets = {}
    for key, draw in draws.items():
        pool = everyone if draw.whole_dataset else by_group[key]
        sets[key] = [[pool[i] for i in indices] for indices in draw.sets]
    return sets


def exemplar_sets_to_json(sets: ExemplarSets) -> dict[str, Any]:
    return {
        key: [[{"question": e.question, "answer": e.answer} for e in s] for s in group]
        for key, group in sets.items()
    }


def exemplar_sets_from_json(data: Mapping[str, Any]) -> ExemplarSets:
    return {
        key: [[Exemplar(e["question"], e["answer"]) for e in s] for s in group]
        for key, group in data.items()
    }


@dataclass(frozen=True)
class Message:
    """One turn of a chat prompt."""

    role: Literal["system", "user", "assistant"]
    content: str


Prompt = str | tuple[Message, ...]
"""What the student is asked: plain text it continues, or chat messages, which each engine
renders its own way (the model's chat template, a server's chat endpoint)."""


def build_prompts(
    examples: Sequence[Example], sets: ExemplarSets, config: AuditConfig
) -> list[list[Prompt]]:
    """Each example's few-shot prompts, one per exemplar set, never showing its own question;
    with `chat_template`, each as one user message.

    A set shows its first `shots` candidates to every question of its group but those among
    them, so that text is written once per set, not once per question.
    """
    template = config.prompt

    def written(shots: Iterable[Exemplar]) -> str:
        return "".join(
            template.exemplar.format(question=c.question, answer=c.answer) for c in shots
        )

    def asked(text: str) -> Prompt:
        return (Message("user", text),) if config.chat_template else text

    # Per group, per set: the text of its first `shots` candidates, and their questions.
    shared: dict[str, list[tuple[str, set[str]]]] = {}
    prompts: list[list[Prompt]] = []
    for example in examples:
        key = group_key(example)
        if key not in shared:
            shared[key] = [
                (written(s[: config.shots]), {c.question for c in s[: config.shots]})
                for s in sets[key]
            ]
        question = example.question
        query = template.query.format(question=question)
        per_example = []
        for candidates, (prefix, shown) in zip(sets[key], shared[key], strict=True):
            if question in shown:
                prefix = written([c for c in candidates if c.question != question][: config.shots])
            per_example.append(asked(prefix + query))
        prompts.append(per_example)
    return prompts


@functools.lru_cache(maxsize=1 << 12)
def clean_answer(text: str) -> str:
    """The answer in a completion: its first line, stripped.

    Cached: an example's answers are mostly a few strings said over and over.
    """
    return text.split("\n", 1)[0].strip()


# --- categories and adaptive sampling ---------------------------------------------------------


def categorize(p_greedy: float, p_sample: float | None) -> Category:
    if p_greedy == 1.0:
        return Category.HIGHLY_KNOWN
    if p_greedy > 0.0:
        return Category.MAYBE_KNOWN
    if p_sample:
        return Category.WEAKLY_KNOWN
    return Category.UNKNOWN


@dataclass
class Tally:
    """What the student answered to one example: per prompt, its greedy and sampled answers."""

    greedy: list[str]
    samples: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples:
            self.samples = [[] for _ in self.greedy]

    @property
    def drawn(self) -> int:
        """Samples drawn per prompt so far."""
        return len(self.samples[0]) if self.samples else 0

    @property
    def generations(self) -> int:
        return len(self.greedy) + sum(map(len, self.samples))

    def outputs(self) -> Iterator[str]:
        """Every answer: the greedy ones, then each prompt's samples."""
        return itertools.chain(self.greedy, *self.samples)


def worst_case_generations(config: AuditConfig, examples: int) -> int:
    """The most completions an audit of `examples` examples can take under the config.

    Each example has one prompt per exemplar set, each a greedy answer and `samples` samples. Full
    mode always takes this many; adaptive mode can, when the student knows none of the answers.
    """
    return examples * config.n_exemplar_sets * (1 + config.samples)


def sampling_rounds(samples: int) -> list[int]:
    """Cumulative samples per prompt after each adaptive round: 1, 4, 16, 64, ... up to `samples`.

    Few rounds keep the engine calls per step constant; growing rounds stop most questions
    the student weakly knows after one cheap round.
    """
    rounds, drawn = [], 1
    while drawn < samples:
        rounds.append(drawn)
        drawn *= 4
    if samples:
        rounds.append(samples)
    return rounds


def samples_to_draw(found: bool, drawn: int, config: AuditConfig) -> int:
    """How many more samples per prompt an example needs now; 0 once its category is settled.

    `found`: a correct answer is among the example's answers so far (greedy or sampled).
    Full mode draws every sample at once. Adaptive mode draws none when a greedy answer is
    correct (P0 > 0 settles the category), stops at the first correct sample (WeaklyKnown), and
    otherwise goes on round by round: only all-wrong questions are sampled to the end (Unknown).
    """
    if config.mode == "full":
        return config.samples - drawn
    if found:
        return 0
    for target in sampling_rounds(config.samples):
        if target > drawn:
            return target - drawn
    return 0


def student_answer(counts: Mapping[str, int]) -> tuple[str, float]:
    """The student's most frequent answer (by normalized form) and the share of outputs that agree.

    `counts` holds how often each output was given, in the order the outputs were first seen
    (greedy answers first). Ties go to the answer seen first; the surface form returned is the
    most common spelling of the winning normalized answer.
    """
    total = sum(counts.values())
    if not total:
        return "", 0.0
    by_form: dict[str, int] = {}
    for output, count in counts.items():
        form = normalize(output)
        by_form[form] = by_form.get(form, 0) + count
    best = max(by_form, key=by_form.__getitem__)
    spelling = max((o for o in counts if normalize(o) == best), key=counts.__getitem__)
    return spelling, by_form[best] / total


@dataclass(frozen=True)
class Verdict:
    audit: Audit
    conflict: bool
    """The student consistently gives another answer than the teacher: the teacher may be wrong."""


def judge(example: Example, tally: Tally, config: AuditConfig) -> Verdict:
    """The example's category, the student's answer and the suggested action.

    Each distinct output is matched once: an example's outputs are mostly a few strings.
    """
    key = AnswerKey(example.golds, config)
    counts = Counter(tally.outputs())
    correct = {output: key.matches(output) for output in counts}
    greedy_correct = sum(map(correct.__getitem__, tally.greedy))
    generations = tally.generations
    sampled = generations - len(tally.greedy)
    sampled_correct = sum(n for output, n in counts.items() if correct[output]) - greedy_correct
    p_greedy = greedy_correct / len(tally.greedy)
    p_sample = sampled_correct / sampled if sampled else None
    category = categorize(p_greedy, p_sample)
    flagged = category in config.flag_categories
    answer, agreement = student_answer(counts)
    consistent = bool(normalize(answer)) and agreement >= config.student_answer_min_agreement
    conflict = consistent and not correct[answer]
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
        generations=generations,
    )
    return Verdict(audit, conflict)


def replay(example: Example, table: Tally, config: AuditConfig) -> Verdict:
    """Run the sampling schedule against answers already generated, and judge what it read.

    `table` holds every answer full mode would draw. This is how the schedule's promise is
    checked: adaptive mode reaches the category full mode reaches, on the same answers.
    """
    key = AnswerKey(example.golds, config)
    seen = Tally(list(table.greedy))
    found = key.any_match(seen.greedy)
    while more := samples_to_draw(found, seen.drawn, config):
        drawn, upto = seen.drawn, seen.drawn + more
        seen.samples = [row[:upto] for row in table.samples]
        found = found or key.any_match(o for row in seen.samples for o in row[drawn:])
    return judge(example, seen, config)


# --- export -----------------------------------------------------------------------------------

ExportPolicy = Literal["suggested", "drop", "idk", "student", "annotate", "reviewed"]
EXPORT_POLICIES: tuple[ExportPolicy, ...] = get_args(ExportPolicy)


def export_record(
    raw: dict[str, Any],
    audit: Audit,
    policy: ExportPolicy,
    idk_text: str,
    format: str,
    review: Review | None = None,
    unreviewed: Unreviewed = DEFAULT_UNREVIEWED,
) -> dict[str, Any] | None:
    """The record as the policy writes it back, in its own `format`; None when it is dropped.

    `reviewed` applies the example's `review`: accept writes the suggested relabel, reject
    keeps the teacher's answer, override writes the reviewer's answer; a flagged example without
    a review is written as `unreviewed` says (its suggestion, dropped, or kept as it was).
    """
    if policy == "annotate":
        return {**raw, "audit": audit.model_dump(mode="json")}
    if not audit.flagged:
        return raw
    if policy == "drop":
        return None
    if policy == "idk":
        return with_answer(format, raw, idk_text)
    if policy == "student":
        return with_answer(format, raw, audit.student_answer or idk_text)
    if policy == "reviewed":
        if review is None:
            if unreviewed == "drop":
                return None
            if unreviewed == "keep":
                return raw
        elif review.decision == Decision.REJECT:
            return raw
        elif review.decision == Decision.OVERRIDE:
            assert review.answer is not None
            return with_answer(format, raw, review.answer)
    assert audit.suggested_answer is not None
    return with_answer(format, raw, audit.suggested_answer)


@dataclass(frozen=True)
class VerdictTally:
    """Verdicts that share a group, category, flag, suggested action and conflict flag."""

    group: str
    category: Category
    flagged: bool
    suggested_action: SuggestedAction
    conflict: bool
    count: int
    generations: int
    """The sum of their audits' `generations`."""


def summarize_tallies(tallies: Iterable[VerdictTally]) -> ReportCounts:
    """The report's counts from verdict tallies, however they were summed (Python or SQL).

    Every category and every suggested action appears, 0 when none; groups are sorted by name.
    """
    categories = dict.fromkeys(Category, 0)
    actions = dict.fromkeys(SuggestedAction, 0)
    groups: dict[str, GroupCounts] = {}
    num_examples = flagged = conflicts = generations = 0
    for t in tallies:
        group = groups.setdefault(
            t.group, GroupCounts(categories=dict.fromkeys(Category, 0), flagged=0, examples=0)
        )
        group.categories[t.category] += t.count
        group.examples += t.count
        categories[t.category] += t.count
        actions[t.suggested_action] += t.count
        num_examples += t.count
        generations += t.generations
        if t.flagged:
            group.flagged += t.count
            flagged += t.count
        if t.conflict:
            conflicts += t.count
    return ReportCounts(
        num_examples=num_examples,
        categories=categories,
        groups=dict(sorted(groups.items())),
        flagged=flagged,
        suggested_actions=actions,
        conflicts=conflicts,
        generations_used=generations,
    )


def summarize(examples: Sequence[Example], verdicts: Sequence[Verdict]) -> ReportCounts:
    """The report's counts over the examples' verdicts: per category, per group ("" for examples
    without one), flagged, suggested actions, conflicts, generations used."""
    sums: dict[tuple[str, Category, bool, SuggestedAction, bool], list[int]] = {}
    for ex, v in zip(examples, verdicts, strict=True):
        key = (
            group_key(ex),
            v.audit.category,
            v.audit.flagged,
            v.audit.suggested_action,
            v.conflict,
        )
        counts = sums.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += v.audit.generations
    return summarize_tallies(
        VerdictTally(*key, count=count, generations=generations)
        for key, (count, generations) in sums.items()
    )


def conflict_item(position: int, example: Example, audit: Audit) -> ConflictRead:
    return ConflictRead(
        position=position,
        id=example.id,
        question=example.question,
        teacher_answer=example.answer,
        student_answer=audit.student_answer,
        agreement=audit.agreement,
        category=audit.category,
    )


def find_conflicts(examples: Sequence[Example], verdicts: Sequence[Verdict]) -> list[ConflictRead]:
    """The conflicts among the verdicts, by position."""
    return [
        conflict_item(position, ex, v.audit)
        for position, (ex, v) in enumerate(zip(examples, verdicts, strict=True))
        if v.conflict
    ]
