"""Parquet and hf files: the Arrow schema of an export's records, learnt one record at a time,
and the files written in batches."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.exports import files
from app.exports.domain import ColumnTypes, UnwritableRecords
from app.exports.files import arrow_schema


def schema_of(*records: dict[str, Any]) -> pa.Schema:
    types = ColumnTypes()
    for record in records:
        types.add(record)
    return arrow_schema(types)


def test_columns_in_the_order_keys_first_appear() -> None:
    schema = schema_of({"id": "a", "question": "q?"}, {"answers": ["x"], "id": "b"})
    assert schema == pa.schema(
        [("id", pa.string()), ("question", pa.string()), ("answers", pa.list_(pa.string()))]
    )


def test_chat_messages_are_a_list_of_structs_with_every_key_seen() -> None:
    schema = schema_of(
        {"messages": [{"role": "user", "content": "q?"}]},
        {"messages": [{"role": "assistant", "content": "a", "weight": 1}]},
    )
    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("weight", pa.int64())])
    assert schema == pa.schema([("messages", pa.list_(message))])


def test_null_fits_any_type_and_integers_with_numbers_are_numbers() -> None:
    schema = schema_of(
        {"score": 1, "p": None, "tags": [], "ok": True},
        {"score": 0.5, "p": "x", "tags": [None, "t"], "ok": None},
    )
    assert schema == pa.schema(
        [
            ("score", pa.float64()),
            ("p", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("ok", pa.bool_()),
        ]
    )
    assert schema_of({"n": None, "e": []}) == pa.schema(
        [("n", pa.null()), ("e", pa.list_(pa.null()))]
    )


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [{"id": 7}, {"id": "x8"}],
            "field 'id' of record 2 is a string, and an integer in an earlier record",
        ),
        (
            [
                {"messages": [{"content": "a"}]},
                {"messages": [{"content": "b"}, {"content": ["c"]}]},
            ],
            "field 'messages[1].content' of record 2 is a list, and a string in an earlier record",
        ),
        ([{"ok": True}, {"ok": 1}], "field 'ok' of record 2 is an integer, and a boolean"),
        (
            [{"meta": {"a": 1}}, {"meta": "x"}],
            "field 'meta' of record 2 is a string, and an object",
        ),
    ],
)
def test_a_field_of_two_types_is_refused_by_name(
    records: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(UnwritableRecords, match=re.escape(message)):
        schema_of(*records)


def test_an_object_that_never_has_a_field_is_refused() -> None:
    with pytest.raises(UnwritableRecords, match=re.escape("field 'turns[].meta' is an empty")):
        schema_of({"turns": [{"meta": {}}]}, {"turns": []})


@pytest.mark.parametrize("export_format", ["parquet", "hf"])
def test_a_file_in_many_batches_holds_every_record_in_order(
    export_format: Literal["parquet", "hf"], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The schema is the whole export's: a key first seen in the last record is a column."""
    monkeypatch.setattr(files, "BATCH_ROWS", 1_000)
    monkeypatch.setattr(files, "ROW_GROUP_ROWS", 2_000)
    records: list[dict[str, Any]] = [{"id": str(i), "n": i} for i in range(4_999)]
    records.append({"id": "last", "n": 0.5, "late": ["x"]})
    written = files.write_export(iter(records), export_format)
    path = tmp_path / "export"
    with written.file as source:
        path.write_bytes(source.read())
    assert written.record_count == 5_000 and written.size == path.stat().st_size
    assert files.downloaded_rows(path, export_format, tmp_path / "unpacked") == 5_000
    if export_format == "parquet":
        assert pq.ParquetFile(path).metadata.num_row_groups == 3
        rows = pq.read_table(path).to_pylist()
    else:
        with pa.memory_map(str(tmp_path / "unpacked" / files.HF_DATA_FILE)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
    assert rows == [{"late": None, **r} | {"n": float(r["n"])} for r in records]
