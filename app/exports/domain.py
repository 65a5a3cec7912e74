"""Export formats, and the one Arrow schema that holds every record of an export.

JSONL writes records as they are. Parquet and the Hugging Face `datasets` folder are columnar:
each top-level key becomes a column, nested objects structs and lists lists (a chat's
`messages` is a list of structs), with one type per column across all records.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

ExportFormat = Literal["jsonl", "parquet", "hf"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
MEDIA_TYPES: dict[ExportFormat, str] = {
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
    "hf": "application/x-tar",
}
SUFFIXES: dict[ExportFormat, str] = {"jsonl": ".jsonl", "parquet": ".parquet", "hf": ".tar"}

_NAMES = {
    "bool": "a boolean",
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "list": "a list",
    "struct": "an object",
}


class UnwritableRecords(ValueError):
    """Records no single Arrow schema holds: a field whose type differs between records, or an
    object that never has a field."""


class Shape:
    """What one field has held so far: a kind (null, bool, int, float, string, list, struct;
    null until a value is seen), a list's items, an object's fields in the order they first
    appeared."""

    __slots__ = ("fields", "item", "kind")

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.item: Shape | None = None
        self.fields: dict[str, Shape] = {}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "struct"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


class ColumnTypes:
    """The one type of each column of records, learnt one record at a time in constant memory.

    Integers and numbers in one field make a float column; null fits any type; a key a record
    lacks reads back as null. Anything else that differs raises UnwritableRecords naming the
    field and the record.
    """

    def __init__(self) -> None:
        self.columns = Shape("struct")
        """The records as one struct: its fields are the columns."""
        self.records = 0

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        self._absorb(self.columns, record, "")

    def _absorb(self, shape: Shape | None, value: Any, at: str) -> Shape:
        kind = _kind(value)
        if shape is None or shape.kind == "null":
            shape = Shape(kind)
        elif kind == "null":
            return shape
        elif kind != shape.kind:
            if {kind, shape.kind} != {"int", "float"}:
                raise UnwritableRecords(
                    f"field '{at}' of record {self.records} is {_NAMES[kind]}, and "
                    f"{_NAMES[shape.kind]} in an earlier record: a column holds one type"
                )
            shape.kind = "float"
        if kind == "list":
            for i, item in enumerate(value):
                shape.item = self._absorb(shape.item, item, f"{at}[{i}]")
        elif kind == "struct":
            for key, item in value.items():
                shape.fields[key] = self._absorb(shape.fields.get(key), item, field_path(at, key))
        return shape


def field_path(at: str, key: str) -> str:
    """How errors name a field: `messages[3].content`."""
    return f"{at}.{key}" if at else key
