"""Dataset endpoints: upload a JSONL file; list, read and delete the workspace's datasets."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator

from app.datasets import service
from app.datasets.domain import Limits, unstorable_text
from app.datasets.schemas import DatasetPage, DatasetRead, InvalidDatasetRead, UploadFormat
from app.deps import SessionDep, SettingsDep, WorkspaceDep
from app.errors import AUTH, NOT_FOUND, UNPARSABLE, ErrorRead, ValidationErrorRead

UPLOAD_CHUNK_BYTES = 1 << 20

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=AUTH)


def storable(value: Any) -> Any:
    # Before pydantic's own check, which refuses a lone surrogate without saying so.
    if isinstance(value, str) and (problem := unstorable_text(value)):
        raise ValueError(problem)
    return value


@router.post(
    "",
    status_code=201,
    summary="Upload a dataset",
    responses={
        **UNPARSABLE,
        422: {
            "model": InvalidDatasetRead | ValidationErrorRead,
            "description": "Invalid lines, with their numbers and reasons; nothing was stored."
            " (A missing file or an invalid form field, `name` or the file's name, answers"
            " FastAPI's usual validation error.)",
        },
        413: {
            "model": ErrorRead,
            "description": "The request body is larger than the server takes"
            " (`KMA_MAX_UPLOAD_BYTES`); nothing was stored.",
        },
    },
)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    workspace: WorkspaceDep,
    file: Annotated[UploadFile, File(description="JSONL, one record per line.")],
    upload_format: Annotated[
        UploadFormat,
        Form(
            alias="format",
            description="The record format: qa, messages (OpenAI chat), alpaca or sharegpt;"
            " auto takes the first record's format and expects it on every line.",
        ),
    ] = "auto",
    name: Annotated[
        str | None,
        Form(min_length=1, max_length=255, description="Default: the file name."),
        BeforeValidator(storable),
    ] = None,
) -> DatasetRead:
    """Validate every line of the file and store the dataset, or store nothing.

    The file is read in chunks and its examples are written as they are validated, so an upload
    of any size runs in constant memory.
    """
    if file.filename and (problem := unstorable_text(file.filename)):
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "file"), "msg": f"its name {problem}"}]
        )
    chunks = iter(partial(file.file.read, UPLOAD_CHUNK_BYTES), b"")
    limits = Limits(settings.max_line_bytes, settings.max_json_depth, settings.max_examples)
    dataset = service.create_dataset(
        session,
        workspace.id,
        name or (file.filename or "dataset.jsonl")[:255],
        upload_format,
        chunks,
        settings.max_upload_errors,
        limits,
    )
    session.commit()
    return DatasetRead.model_validate(dataset)


@router.get("", summary="List datasets")
def list_datasets(
    session: SessionDep,
    workspace: WorkspaceDep,
    cursor: Annotated[uuid.UUID | None, Query(description="`next_cursor` of a page.")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Items per page.")] = 50,
) -> DatasetPage:
    """The workspace's datasets, newest first."""
    return service.list_datasets(session, workspace.id, cursor, limit)


@router.get("/{dataset_id}", summary="Get a dataset", responses=NOT_FOUND)
def get_dataset(session: SessionDep, workspace: WorkspaceDep, dataset_id: uuid.UUID) -> DatasetRead:
    return DatasetRead.model_validate(service.get_dataset(session, workspace.id, dataset_id))


@router.delete("/{dataset_id}", status_code=204, summary="Delete a dataset", responses=NOT_FOUND)
def delete_dataset(session: SessionDep, workspace: WorkspaceDep, dataset_id: uuid.UUID) -> None:
    """Delete the dataset and everything made from it: its examples, its jobs (cancelled first
    if they still run), their verdicts and reports."""
    service.delete_dataset(session, workspace.id, dataset_id)
    session.commit()
