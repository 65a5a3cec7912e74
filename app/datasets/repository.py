"""Dataset queries; examples are written with COPY, streamed as they are read."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from psycopg.types.json import Json
from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from app.datasets.domain import LineError, Record, duplicate_id
from app.db import driver_connection
from app.models import Dataset, Example, Job

COPY_EXAMPLES = 'COPY example (dataset_id, position, line, record_id, "group", raw) FROM STDIN'

ExampleWriter = Callable[[int, Record], None]
"""Writes one record at its position (0-based, upload order)."""


def get_dataset(session: Session, dataset_id: uuid.UUID) -> Dataset | None:
    return session.get(Dataset, dataset_id)


def list_datasets(
    session: Session, workspace_id: uuid.UUID, after: Dataset | None, limit: int
) -> Sequence[Dataset]:
    """Newest first; `after` is the last dataset of the previous page."""
    query = (
        select(Dataset)
        .where(Dataset.workspace_id == workspace_id)
        .order_by(Dataset.created_at.desc(), Dataset.id.desc())
        .limit(limit)
    )
    if after is not None:
        query = query.where(tuple_(Dataset.created_at, Dataset.id) < (after.created_at, after.id))
    return session.scalars(query).all()


def lock_jobs_of(session: Session, dataset_id: uuid.UUID) -> Sequence[Job]:
    return session.scalars(
        select(Job).where(Job.dataset_id == dataset_id).order_by(Job.id).with_for_update()
    ).all()


@contextmanager
def copy_examples(session: Session, dataset_id: uuid.UUID) -> Iterator[ExampleWriter]:
    """A writer of the dataset's examples, in the session's transaction.

    psycopg sends COPY data as its buffer fills, so memory stays flat however many rows pass.
    """
    connection = driver_connection(session.connection())
    # The COPY lasts as long as the client sends: the API's statement timeout is no bound to it.
    connection.execute("SET LOCAL statement_timeout = 0")
    with connection.cursor() as cursor, cursor.copy(COPY_EXAMPLES) as copy:

        def write(position: int, record: Record) -> None:
            example = record.example
            copy.write_row(
                (dataset_id, position, record.line, example.id, example.group, Json(record.raw))
            )

        yield write


def duplicate_ids(
    session: Session, dataset_id: uuid.UUID, limit: int
) -> tuple[list[LineError], int]:
    """Lines whose id an earlier line has: the first `limit` of them, and how many more."""
    first = func.min(Example.line).over(partition_by=Example.record_id).label("first")
    lines = (
        select(Example.line, Example.record_id, first)
        .where(Example.dataset_id == dataset_id)
        .subquery()
    )
    repeated = select(lines).where(lines.c.line != lines.c.first)
    found = session.execute(repeated.order_by(lines.c.line).limit(limit)).all()
    errors = [duplicate_id(line, record_id, first_line) for line, record_id, first_line in found]
    more = 0
    if len(errors) == limit:
        total = session.scalar(select(func.count()).select_from(repeated.subquery())) or 0
        more = total - limit
    return errors, more
