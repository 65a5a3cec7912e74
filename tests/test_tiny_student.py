"""Fast checks of the tiny student's invented world and teacher datasets (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kma import tiny_student
from kma.tiny_student import make_world, write_dataset


def test_make_world_is_deterministic_and_seeded() -> None:
    world = make_world(0)
    assert world == make_world(0)
    assert world != make_world(1)
    assert len(world.trained) >= 150
    assert len(world.unseen) >= 60
    assert len({f.relation for f in world.unseen}) >= 4


def test_ids_and_answers_are_unique() -> None:
    trained, unseen, filler = tiny_student._make_facts(0)
    facts = trained + unseen + filler
    assert len({f.id for f in facts}) == len(facts)
    assert len({f.answer for f in facts}) == len(facts)
    assert len({f.question for f in facts}) == len(facts)


def test_unseen_facts_never_appear_in_training_text() -> None:
    world = make_world(0)
    corpus = tiny_student._training_corpus(0)
    for fact in world.trained:
        assert f"Q: {fact.question}\nA: {fact.answer}\n" in corpus
    for fact in world.unseen:
        assert fact.answer not in corpus
        assert fact.question not in corpus


def test_write_dataset(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "qa.jsonl"
    items = write_dataset(path, n_trained=60, n_unseen=40)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(items) == 100
    assert sum(trained for _, trained in items) == 60
    world = make_world(0)
    known = {f.id for f in world.trained}
    for row, (fact, trained) in zip(rows, items, strict=True):
        assert row == {
            "id": fact.id,
            "group": fact.relation,
            "question": fact.question,
            "answer": fact.answer,
        }
        assert (fact.id in known) == trained
    assert min(sum(r["group"] == g for r in rows) for g in {r["group"] for r in rows}) >= 20
    assert [t for _, t in items] != sorted((t for _, t in items), reverse=True)  # mixed
    assert write_dataset(tmp_path / "again.jsonl", n_trained=60, n_unseen=40) == items
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "big.jsonl", n_trained=10_000, n_unseen=0)


def test_the_second_student_knows_other_facts_of_the_same_world() -> None:
    a, b = make_world(0), make_world(0, "b")
    assert b == make_world(0, "b")
    facts_a = {f.id for f in a.trained + a.unseen}
    assert {f.id for f in b.trained + b.unseen} == facts_a  # the same facts, split otherwise
    trained_a, trained_b = {f.id for f in a.trained}, {f.id for f in b.trained}
    kinds = {
        "both": trained_a & trained_b,
        "a only": trained_a - trained_b,
        "b only": trained_b - trained_a,
        "neither": facts_a - trained_a - trained_b,
    }
    assert {kind: len(ids) for kind, ids in kinds.items()} == {
        "both": 100, "a only": 100, "b only": 40, "neither": 40,
    }  # fmt: skip
    for ids in kinds.values():  # every relation has facts of every kind
        assert {i.split("-")[0] for i in ids} == {"capital", "currency", "founder", "river"}
    corpus = tiny_student._training_corpus(0, "b")
    for fact in b.trained:
        assert f"Q: {fact.question}\nA: {fact.answer}\n" in corpus
    for fact in b.unseen:
        assert fact.question not in corpus and fact.answer not in corpus
