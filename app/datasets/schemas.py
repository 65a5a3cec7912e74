"""Dataset I/O: the upload's answer and the shape of an invalid upload's 422."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.datasets.domain import RecordFormat, unstorable_text

UploadFormat = Literal["auto", RecordFormat]
"""`auto` takes the first record's format as the file's; a named format reads every record so."""


def storable(value: Any) -> Any:
    """A `BeforeValidator` for text the database must hold: no NUL, no lone surrogate."""
    # Before pydantic's own check, which refuses a lone surrogate without saying so.
    if isinstance(value, str) and (problem := unstorable_text(value)):
        raise ValueError(problem)
    return value


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str
    format: str = Field(description="The record format the dataset was read with.")
    num_examples: int
    created_at: datetime


class DatasetPage(BaseModel):
    items: list[DatasetRead]
    next_cursor: uuid.UUID | None = Field(description="Pass as `cursor` for the next page.")


class LineErrorRead(BaseModel):
    line: int = Field(description="1-based line number in the uploaded file.")
    field: str | None = Field(description="The record field at fault; null for the whole line.")
    message: str


class InvalidDataset(BaseModel):
    message: str
    errors: list[LineErrorRead] = Field(description="The first invalid lines, in file order.")
    more_errors: int = Field(description="Invalid lines found beyond those listed.")


class InvalidDatasetRead(BaseModel):
    detail: InvalidDataset
