"""Dataset use cases: a streamed, fully validated upload; reading, listing and deleting a
workspace's datasets."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy.orm import Session

from app.datasets import repository
from app.datasets.domain import DatasetError, Limits, valid_records
from app.datasets.schemas import DatasetPage, DatasetRead, UploadFormat
from app.errors import InvalidQuery, NotFound
from app.jobs import lifecycle
from app.models import Dataset


def get_dataset(session: Session, workspace_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """The workspace's dataset; another workspace's answers as if it did not exist."""
    dataset = repository.get_dataset(session, dataset_id)
    if dataset is None or dataset.workspace_id != workspace_id:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def record_format(session: Session, dataset_id: uuid.UUID) -> str:
    """The format of a dataset a job names (the job was checked, so no workspace here)."""
    dataset = repository.get_dataset(session, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset.format


def list_datasets(
    session: Session, workspace_id: uuid.UUID, cursor: uuid.UUID | None, limit: int
) -> DatasetPage:
    """The workspace's datasets, newest first."""
    after = None
    if cursor is not None:
        after = repository.get_dataset(session, cursor)
        if after is None or after.workspace_id != workspace_id:
            raise InvalidQuery("cursor", f"cursor {cursor} names no dataset")
    datasets = repository.list_datasets(session, workspace_id, after, limit + 1)
    page = datasets[:limit]
    return DatasetPage(
        items=[DatasetRead.model_validate(d) for d in page],
        next_cursor=page[-1].id if len(datasets) > limit else None,
    )


def delete_dataset(session: Session, workspace_id: uuid.UUID, dataset_id: uuid.UUID) -> None:
    """Remove the dataset and all that came of it: examples, jobs, verdicts. Its jobs still
    running are cancelled first, so no worker writes after the delete."""
    dataset = get_dataset(session, workspace_id, dataset_id)
    for job in repository.lock_jobs_of(session, dataset_id):
        if not job.status.finished:
            lifecycle.cancel(job)
    session.flush()
    session.delete(dataset)


def create_dataset(
    session: Session,
    workspace_id: uuid.UUID,
    name: str,
    upload_format: UploadFormat,
    chunks: Iterable[bytes],
    max_errors: int,
    limits: Limits,
) -> Dataset:
    """Store the dataset read from `chunks`, or raise DatasetError listing its invalid lines.

    Valid lines are written as they come; on the first error writing stops (the caller rolls
    back) but validation goes on, so the 422 lists every problem up to `max_errors` and counts
    the rest. Memory holds one chunk and the listed errors, whatever the upload's size.
    """
    # The row must exist before its examples are copied in; with auto, the format it stores is
    # known once the first record is read.
    dataset = Dataset(workspace_id=workspace_id, name=name, format=upload_format, num_examples=0)
    session.add(dataset)
    session.flush()
    record_format: str = upload_format
    count = 0
    with repository.copy_examples(session, dataset.id) as write:
        for record in valid_records(
            chunks, upload_format, max_errors, check_ids=False, limits=limits
        ):
            write(count, record)
            record_format = record.format
            count += 1
    # Ids are checked by the database once every line is in: holding them all would make
    # memory grow with the upload.
    duplicates, more = repository.duplicate_ids(session, dataset.id, max_errors)
    if duplicates:
        raise DatasetError(duplicates, more)
    dataset.format = record_format
    dataset.num_examples = count
    return dataset
