"""Queries the audit workers run: chunks, verdict upserts, the generation cache."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import Integer, Text, bindparam, func, literal, select
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from app.audit.domain import Exemplar, ExemplarSets, draw_exemplar_indices
from app.audit.schemas import AuditConfig
from app.datasets.domain import parse_record
from app.models import Chunk, ChunkStatus, Example, Generation, Job, JobStatus, Verdict, utcnow


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id, with_for_update=True)


def queued_job_ids(session: Session) -> list[uuid.UUID]:
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED)))


def iter_examples(
    session: Session, dataset_id: uuid.UUID, start: int = 0, stop: int | None = None
) -> Iterator[Example]:
    query = (
        select(Example)
        .where(Example.dataset_id == dataset_id, Example.position >= start)
        .order_by(Example.position)
    )
    if stop is not None:
        query = query.where(Example.position < stop)
    yield from session.scalars(query.execution_options(yield_per=5000))


def draw_exemplar_sets(
    session: Session, dataset_id: uuid.UUID, record_format: str, config: AuditConfig
) -> ExemplarSets:
    """The dataset's exemplar sets, exactly as `app.audit.domain.draw_exemplar_sets` draws them.

    It reads each group's size, draws indices from them, and then reads only the examples drawn,
    so memory stays flat however large the dataset is. Groups are read from the `group` column,
    which the upload fills with each record's parsed group.
    """
    key = func.coalesce(Example.group, "")
    sizes = session.execute(
        select(key, func.count()).where(Example.dataset_id == dataset_id).group_by(key)
    )
    draws = draw_exemplar_indices({k: n for k, n in sizes}, config)
    in_group = {(k, i) for k, d in draws.items() if not d.whole_dataset for s in d.sets for i in s}
    in_dataset = {("", i) for d in draws.values() if d.whole_dataset for s in d.sets for i in s}
    from_group = _read_ranked(session, dataset_id, record_format, in_group, by_group=True)
    from_dataset = _read_ranked(session, dataset_id, record_format, in_dataset, by_group=False)
    return {
        k: [
            [from_dataset["", i] if d.whole_dataset else from_group[k, i] for i in indices]
            for indices in d.sets
        ]
        for k, d in draws.items()
    }


def _read_ranked(
    session: Session,
    dataset_id: uuid.UUID,
    record_format: str,
    wanted: set[tuple[str, int]],
    *,
    by_group: bool,
) -> dict[tuple[str, int], Exemplar]:
    """The examples at the wanted (group, rank) pairs: rank is the 0-based index in position order
    within the group (`by_group`), or within the whole dataset (the group is then "")."""
    if not wanted:
        return {}
    key = func.coalesce(Example.group, "") if by_group else literal("")
    rank = func.row_number().over(partition_by=key if by_group else None, order_by=Example.position)
    ranked = (
        select(Example.position, key.label("key"), (rank - 1).label("rank"))
        .where(Example.dataset_id == dataset_id)
        .subquery()
    )
    keys, ranks = zip(*wanted, strict=True)
    picks = (
        func.unnest(
            bindparam("keys", list(keys), type_=ARRAY(Text)),
            bindparam("ranks", list(ranks), type_=ARRAY(Integer)),
        )
        .table_valued("key", "rank")
        .render_derived(name="pick")
    )
    rows = session.execute(
        select(ranked.c.key, ranked.c.rank, Example.line, Example.raw)
        .join(picks, (picks.c.key == ranked.c.key) & (picks.c.rank == ranked.c.rank))
        .join(
            Example,
            (Example.dataset_id == dataset_id) & (Example.position == ranked.c.position),
        )
    )
    found: dict[tuple[str, int], Exemplar] = {}
    for k, i, line, raw in rows:
        example = parse_record(record_format, raw, line)
        found[k, i] = Exemplar(example.question, example.answer)
    return found


def add_chunks(session: Session, job_id: uuid.UUID, total: int, size: int) -> int:
    """Split the job's `total` examples into chunks of `size`, in one statement."""
    count = len(range(0, total, size))
    index = func.generate_series(0, count - 1, type_=Integer).column_valued("index")
    session.execute(
        insert(Chunk).from_select(
            [Chunk.job_id, Chunk.index, Chunk.start, Chunk.stop],
            select(
                literal(job_id),
                index,
                index * size,
                func.least(index * size + size, total),
            ),
        )
    )
    return count


def pending_chunks(session: Session, job_id: uuid.UUID) -> list[int]:
    return list(
        session.scalars(
            select(Chunk.index)
            .where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.PENDING)
            .order_by(Chunk.index)
        )
    )


def get_chunk(session: Session, job_id: uuid.UUID, index: int) -> Chunk | None:
    return session.get(Chunk, (job_id, index))


def upsert_verdicts(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Write verdicts; a chunk run again overwrites its own rows instead of adding more."""
    if not rows:
        return
    statement = insert(Verdict).values(list(rows))
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[Verdict.job_id, Verdict.position],
            set_={
                c: statement.excluded[c]
                for c in ("category", "flagged", "conflict", "audit", "answers")
            },
        )
    )


def iter_verdicts(session: Session, job_id: uuid.UUID) -> Iterator[tuple[Verdict, Example]]:
    job = session.get(Job, job_id)
    assert job is not None
    query = (
        select(Verdict, Example)
        .join(
            Example,
            (Example.dataset_id == job.dataset_id) & (Example.position == Verdict.position),
        )
        .where(Verdict.job_id == job_id)
        .order_by(Verdict.position)
        .execution_options(yield_per=5000)
    )
    for row in session.execute(query):
        yield row[0], row[1]


def mark_failed(session: Session, job_id: uuid.UUID, error: str) -> Job | None:
    """Fail the job unless it already finished; returns it when this call failed it."""
    job = lock_job(session, job_id)
    if job is None or job.status.finished:
        return None
    job.status, job.error, job.finished_at = JobStatus.FAILED, error, utcnow()
    return job


class SqlGenerationStore:
    """The generation cache in PostgreSQL. Writes join the caller's transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]:
        found: dict[bytes, list[str]] = {}
        for start in range(0, len(keys), 5000):
            batch = keys[start : start + 5000]
            rows = self.session.execute(
                select(Generation.key, Generation.texts).where(Generation.key.in_(batch))
            )
            found.update({key: texts for key, texts in rows})
        return found

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None:
        rows = [{"key": k, "model_id": model_id, "texts": v} for k, v in items.items()]
        for start in range(0, len(rows), 5000):
            self.session.execute(
                insert(Generation).values(rows[start : start + 5000]).on_conflict_do_nothing()
            )
