"""Dataset use cases: a streamed, fully validated upload, and reading one back."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from sqlalchemy.orm import Session

from app.datasets import repository
from app.datasets.domain import DatasetError, Limits, valid_records
from app.datasets.schemas import UploadFormat
from app.errors import NotFound
from app.models import Dataset


def get_dataset(session: Session, dataset_id: uuid.UUID) -> Dataset:
    dataset = repository.get_dataset(session, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def create_dataset(
    session: Session,
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
    dataset = Dataset(name=name, format=upload_format, num_examples=0)
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
