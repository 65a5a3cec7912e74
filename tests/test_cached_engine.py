"""The cache wrapper: keys by prompt, options and draw; the draws are its own count, not the
engine's business. tests/test_jobs.py runs it on PostgreSQL through the worker's steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import count

from app.audit.domain import Message
from workers.engines.base import GenerationRequest, GenerationResult, SamplingOptions
from workers.engines.cached import CachedEngine
from workers.engines.fake import FakeEngine

GREEDY = SamplingOptions()
SAMPLED = SamplingOptions(n=2, temperature=0.5, top_k=40)


class DictStore:
    def __init__(self) -> None:
        self.rows: dict[bytes, list[str]] = {}

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]:
        return {k: self.rows[k] for k in keys if k in self.rows}

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None:
        for key, texts in items.items():
            self.rows.setdefault(key, texts)


def numbered_engine() -> FakeEngine:
    """Each completion it makes is new: "1", "2", ..."""
    made = count(1)
    return FakeEngine(lambda r: GenerationResult([str(next(made)) for _ in range(r.options.n)]))


def sampled(prompt: str) -> GenerationRequest:
    return GenerationRequest(prompt, SAMPLED)


def test_a_prompts_later_sampling_rounds_are_drawn_anew() -> None:
    engine, store = numbered_engine(), DictStore()
    cached = CachedEngine(engine, store)
    first = cached.generate([sampled("p"), sampled("q")])
    second = cached.generate([sampled("p")])
    cached.save()
    assert [r.texts for r in first] == [["1", "2"], ["3", "4"]]
    assert [r.texts for r in second] == [["5", "6"]]
    assert len(engine.calls) == 2 and len(store.rows) == 3
    assert (cached.new_generations, cached.cached_generations) == (6, 0)


def test_the_same_calls_again_take_every_answer_from_the_cache() -> None:
    """A chunk run again (a new wrapper, as each run of a chunk has) asks the engine nothing."""
    engine, store = numbered_engine(), DictStore()
    calls = [
        [GenerationRequest("p", GREEDY), GenerationRequest("q", GREEDY)],
        [sampled("p"), sampled("q")],
        [sampled("p")],
    ]
    first = CachedEngine(engine, store)
    answers = [[r.texts for r in first.generate(call)] for call in calls]
    first.save()
    again = CachedEngine(engine, store)
    assert [[r.texts for r in again.generate(call)] for call in calls] == answers
    assert len(engine.calls) == len(calls)
    assert (again.new_generations, again.cached_generations) == (0, 2 + 4 + 2)


def test_requests_for_one_prompt_in_one_call_share_their_draw() -> None:
    """As identical prompts of one example do: the engine is asked once, each gets its answer."""
    engine = numbered_engine()
    cached = CachedEngine(engine, DictStore())
    results = cached.generate([sampled("p"), sampled("p"), GenerationRequest("p", GREEDY)])
    assert [r.texts for r in results] == [["1", "2"], ["1", "2"], ["3"]]
    assert engine.calls == [[sampled("p"), GenerationRequest("p", GREEDY)]]
    # Their samples count once: the next round of "p" is its second draw, not its third.
    assert cached.generate([sampled("p")])[0].texts == ["4", "5"]


def test_greedy_answers_are_one_entry_however_often_asked() -> None:
    engine = numbered_engine()
    cached = CachedEngine(engine, DictStore())
    for _ in range(3):
        assert cached.generate([GenerationRequest("p", GREEDY)])[0].texts == ["1"]
    assert len(engine.calls) == 1


def test_namespaces_options_and_chat_prompts_keep_entries_apart() -> None:
    engine, store = numbered_engine(), DictStore()

    def ask(namespace: str, request: GenerationRequest) -> None:
        cached = CachedEngine(engine, store, namespace=namespace)
        cached.generate([request])
        cached.save()

    ask("a", GenerationRequest("p", GREEDY))
    ask("b", GenerationRequest("p", GREEDY))
    longer = SamplingOptions(max_tokens=GREEDY.max_tokens + 1)
    ask("a", GenerationRequest("p", longer))
    ask("a", GenerationRequest((Message("user", "p"),), GREEDY))
    assert len(engine.calls) == 4 and len(store.rows) == 4


class CountingStore(DictStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []
        self.writes: list[int] = []

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]:
        self.reads.append(len(keys))
        return super().get_many(keys)

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None:
        self.writes.append(len(items))
        super().put_many(model_id, items)


def test_answers_wait_for_a_few_large_writes_and_are_found_while_they_wait() -> None:
    engine, store = numbered_engine(), CountingStore()
    cached = CachedEngine(engine, store, save_seconds=3600, save_generations=5)
    cached.generate([sampled("p")])  # 2 generations wait
    assert cached.generate([GenerationRequest("q", GREEDY)])[0].texts == ["3"]
    assert store.writes == []
    # Still waiting, and found there: the engine is not asked again.
    assert cached.generate([GenerationRequest("q", GREEDY)])[0].texts == ["3"]
    assert len(engine.calls) == 2
    cached.generate([sampled("r")])  # 5 generations wait: written
    assert store.writes == [3]
    cached.generate([GenerationRequest("s", GREEDY)])
    cached.save()
    cached.save()  # nothing left: no write
    assert store.writes == [3, 1] and len(store.rows) == 4


def test_the_answers_still_waiting_can_be_taken_to_be_written_elsewhere() -> None:
    engine, store = numbered_engine(), CountingStore()
    cached = CachedEngine(engine, store, save_seconds=3600)
    cached.generate([sampled("p"), GenerationRequest("q", GREEDY)])
    unsaved = cached.take_unsaved()
    assert sorted(unsaved.values()) == [["1", "2"], ["3"]]
    cached.save()  # taken: nothing is left to write here
    assert store.writes == [] and cached.take_unsaved() == {}
    # Still known to the wrapper: asked again, the engine is not.
    assert cached.generate([GenerationRequest("q", GREEDY)])[0].texts == ["3"]
    assert len(engine.calls) == 1


def test_without_a_delay_each_engine_call_is_written_after_it() -> None:
    """As with an engine call of a real model, which takes longer than `save_seconds`."""
    engine, store = numbered_engine(), CountingStore()
    cached = CachedEngine(engine, store, save_seconds=0)
    cached.generate([sampled("p"), sampled("q")])
    cached.generate([sampled("p")])
    assert store.writes == [2, 1]


def test_a_step_reads_the_cache_once_for_the_calls_after_its_first() -> None:
    """As the runner's steps come: calls of a few prompts each, then the same prompts again
    under other options (the samples), then at their next draw."""
    engine, store = numbered_engine(), CountingStore()
    steps = [
        [GenerationRequest(p, GREEDY) for p in "pqr"],
        [sampled(p) for p in "pqr"],
        [sampled(p) for p in "pqr"],
    ]
    first = CachedEngine(engine, store)
    answers = [[first.generate([r])[0].texts for r in step] for step in steps]
    # New prompts: a read each. A new step: one read for the prompts seen, none after it.
    assert store.reads == [1, 1, 1, 3, 3]
    assert answers[1] == [["4", "5"], ["6", "7"], ["8", "9"]]
    assert answers[2] == [["10", "11"], ["12", "13"], ["14", "15"]]
    first.save()
    again = CachedEngine(engine, store)
    assert [[again.generate([r])[0].texts for r in step] for step in steps] == answers
    assert len(engine.calls) == 9 and again.new_generations == 0
    assert again.cached_generations == 3 + 6 + 6
