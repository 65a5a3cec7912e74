"""Planning a job on the real database: exemplar sets drawn without loading the dataset, chunks."""

from __future__ import annotations

import json
import random
import time
import tracemalloc
import uuid
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.audit import domain, repository
from app.audit.schemas import AuditConfig
from app.datasets import service as datasets_service
from app.datasets.domain import Example as DomainExample
from app.datasets.domain import Limits, parse_record
from app.models import Chunk, ChunkStatus, Dataset, Job
from tests.conftest import new_workspace


@pytest.mark.parametrize("seed", range(20))
def test_sampling_indices_picks_what_sampling_the_pool_picks(seed: int) -> None:
    """The claim the SQL draw rests on: `sample` draws depend only on the pool's size."""
    chooser = random.Random(seed)
    for n in [*range(1, 40), 100, 1000, 123_457]:
        k = chooser.randint(0, min(n, 40))
        pool = [f"item {chooser.random()}" for _ in range(n)]
        on_pool = random.Random(f"{seed}:{n}").sample(pool, k)
        on_indices = random.Random(f"{seed}:{n}").sample(range(n), k)
        assert on_pool == [pool[i] for i in on_indices]


def random_records(chooser: random.Random, shots: int) -> list[dict[str, Any]]:
    """Groups of many sizes, some smaller than a set; examples without a group, or with a
    relation, an integer group or an empty one; answers given as `answer` or `answers`, aliases."""
    groups: list[str | int | None] = [None, "", 7]
    groups += [f"relation {i}" for i in range(chooser.randint(1, 12))]
    sizes = {g: chooser.choice([1, 2, shots, shots + 1, shots + 2, 9, 30, 80]) for g in groups}
    sizes["too small"], sizes["big enough"] = shots, 3 * shots + 1
    members = [g for g, size in sizes.items() for _ in range(size)]
    chooser.shuffle(members)
    records: list[dict[str, Any]] = []
    for i, group in enumerate(members):
        record: dict[str, Any] = {"id": f"q{i}", "question": f"Question {i} {chooser.random()}?"}
        if chooser.random() < 0.5:
            record["answer"] = f"answer {i}"
        else:
            record["answers"] = [f"answer {i}", *(f"other {i}.{j}" for j in range(3))]
        if chooser.random() < 0.3:
            record["aliases"] = [f"alias {i}"]
        if group is not None:
            record["relation" if chooser.random() < 0.3 else "group"] = group
        records.append(record)
    return records


def upload(session: Session, records: list[dict[str, Any]]) -> uuid.UUID:
    """Store records through the upload's own path, so `group` is stored as uploads store it."""
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    dataset = datasets_service.create_dataset(
        session, new_workspace(session), "random", "qa", [body], 50, Limits()
    )
    session.flush()
    return dataset.id


@pytest.mark.parametrize("seed", range(8))
def test_the_sql_draw_is_the_pure_draw(session: Session, seed: int) -> None:
    chooser = random.Random(seed)
    shots = [1, 4, 7][seed % 3]
    config = AuditConfig(shots=shots, n_exemplar_sets=chooser.choice([1, 3, 10]), seed=seed)
    records = random_records(chooser, shots)
    dataset_id = upload(session, records)
    examples = [parse_record("qa", r, line) for line, r in enumerate(records, 1)]

    expected = domain.draw_exemplar_sets(examples, config)
    drawn = repository.draw_exemplar_sets(session, dataset_id, "qa", config)

    assert drawn == expected
    assert list(drawn) == list(expected)  # the same group order, so the same stored JSON
    sizes = Counter(domain.group_key(e) for e in examples)
    whole_dataset = [d.whole_dataset for d in domain.draw_exemplar_indices(sizes, config).values()]
    assert any(whole_dataset) and not all(whole_dataset)  # both kinds of pool were drawn from


@pytest.mark.parametrize("n", [1, 3])
def test_a_dataset_smaller_than_a_set(session: Session, n: int) -> None:
    records = [{"question": f"Q{i}?", "answer": f"A{i}", "group": "g"} for i in range(n)]
    dataset_id = upload(session, records)
    config = AuditConfig()
    examples = [parse_record("qa", r, line) for line, r in enumerate(records, 1)]
    drawn = repository.draw_exemplar_sets(session, dataset_id, "qa", config)
    assert drawn == domain.draw_exemplar_sets(examples, config)
    assert all(len(s) == n for s in drawn["g"])


def test_an_empty_dataset_draws_nothing(session: Session) -> None:
    dataset = Dataset(
        workspace_id=new_workspace(session), name="empty", format="qa", num_examples=0
    )
    session.add(dataset)
    session.flush()
    assert repository.draw_exemplar_sets(session, dataset.id, "qa", AuditConfig()) == {}
    assert domain.draw_exemplar_sets([], AuditConfig()) == {}


def test_a_chat_dataset_is_read_in_its_format(session: Session) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": f"Answer {i}"},
            ],
            "group": f"g{i % 3}",
        }
        for i in range(20)
    ]
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    dataset = datasets_service.create_dataset(
        session, new_workspace(session), "chat", "auto", [body], 50, Limits()
    )
    session.flush()
    config = AuditConfig(seed=3)
    examples = [parse_record("messages", r, line) for line, r in enumerate(records, 1)]
    drawn = repository.draw_exemplar_sets(session, dataset.id, dataset.format, config)
    assert drawn == domain.draw_exemplar_sets(examples, config)


N_LARGE = 200_000


def tiny(i: int) -> bool:
    return i % 50_000 == 7


def large_group(i: int) -> str | None:
    """97 groups of about 2,000, examples without a group, and a group of 4 (< shots + 1)."""
    if tiny(i):
        return "tiny"
    return None if i % 1000 == 0 else f"g{i % 97}"


def test_a_large_dataset_draws_with_flat_memory(session: Session) -> None:
    dataset = Dataset(
        workspace_id=new_workspace(session), name="large", format="qa", num_examples=N_LARGE
    )
    session.add(dataset)
    session.flush()
    session.execute(
        text(
            """
            INSERT INTO example (dataset_id, position, line, record_id, "group", raw)
            SELECT :dataset_id, i, i + 1, 'e' || i,
                   CASE WHEN i % 50000 = 7 THEN 'tiny'
                        WHEN i % 1000 = 0 THEN NULL
                        ELSE 'g' || (i % 97) END,
                   json_build_object('id', 'e' || i, 'question', 'What is number ' || i || '?',
                                     'answer', i::text)
            FROM generate_series(0, :n - 1) AS i
            """
        ),
        {"dataset_id": dataset.id, "n": N_LARGE},
    )
    config = AuditConfig(seed=11)

    tracemalloc.start()
    started = time.perf_counter()
    drawn = repository.draw_exemplar_sets(session, dataset.id, "qa", config)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"draw of {N_LARGE} examples: {seconds:.2f} s, peak {peak / 2**20:.2f} MiB")

    assert peak < 20 * 2**20  # the dataset's examples alone would take far more
    examples = [
        DomainExample(f"e{i}", f"What is number {i}?", str(i), group=large_group(i))
        for i in range(N_LARGE)
    ]
    assert drawn == domain.draw_exemplar_sets(examples, config)
    assert len(drawn) == 97 + 2


@pytest.mark.parametrize(("total", "size"), [(10, 4), (8, 4), (3, 100), (0, 4), (1, 1)])
def test_chunks_cover_the_job_in_order(session: Session, total: int, size: int) -> None:
    workspace_id = new_workspace(session)
    dataset = Dataset(workspace_id=workspace_id, name="d", format="qa", num_examples=total)
    session.add(dataset)
    session.flush()
    job = Job(
        workspace_id=workspace_id,
        dataset_id=dataset.id,
        student={"name": "m", "engine": "hf", "model": "m"},
        config={},
        total=total,
    )
    session.add(job)
    session.flush()

    count = repository.add_chunks(session, job.id, total, size)

    rows = session.scalars(select(Chunk).where(Chunk.job_id == job.id).order_by(Chunk.index))
    chunks = [
        (c.index, c.start, c.stop, c.status, c.attempts, c.generations, c.engine_seconds)
        for c in rows
    ]
    starts = range(0, total, size)
    assert count == len(starts)
    assert chunks == [
        (i, start, min(start + size, total), ChunkStatus.PENDING, 0, 0, 0.0)
        for i, start in enumerate(starts)
    ]
