"""Parquet files and Hugging Face `datasets` folders, written from a stream of records.

Both need the whole export's schema before their first row, so the records go to a temporary
JSONL file first while their schema is learnt, then into the file in batches: memory holds one
batch, whatever the export's size. What is sent is counted as it is written.

The only module that imports pyarrow (about 45 MB and a second to load): import it where a
Parquet or hf export is made or read, not where JSONL is.
"""

from __future__ import annotations

import json
import secrets
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from app.exports.domain import ColumnTypes, Shape, UnwritableRecords, field_path

BATCH_ROWS = 2_000
BATCH_BYTES = 64 << 20
"""A batch ends at whichever comes first: the rows are Python objects until then, and an Arrow
string array holds at most 2 GiB."""
ROW_GROUP_ROWS = 64_000
"""Batches are written to Parquet together, as row groups of about this many rows."""
CHUNK_BYTES = 1 << 16

HF_DATA_FILE = "data-00000-of-00001.arrow"
HF_INFO_FILE = "dataset_info.json"
HF_STATE_FILE = "state.json"


@dataclass(frozen=True)
class ExportFile:
    """A written export, open for reading; its folder is gone, so closing it frees the disk."""

    record_count: int
    size: int
    file: IO[bytes]

    def chunks(self) -> Iterator[bytes]:
        with self.file:
            while chunk := self.file.read(CHUNK_BYTES):
                yield chunk


def write_export(
    records: Iterable[dict[str, Any]], export_format: Literal["parquet", "hf"]
) -> ExportFile:
    """The records as one Parquet file, or as a tar of a folder `datasets.load_from_disk` opens.

    Raises `UnwritableRecords` when no one schema holds them all.
    """
    with tempfile.TemporaryDirectory(prefix="kma-export-") as temporary:
        folder = Path(temporary)
        lines = folder / "records.jsonl"
        types = ColumnTypes()
        with lines.open("wb") as out:
            for record in records:
                types.add(record)
                out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        schema = arrow_schema(types)
        batches = _batches(lines, schema)
        if export_format == "parquet":
            path = folder / "export.parquet"
            _write_parquet(path, schema, batches)
        else:
            path = folder / "export.tar"
            _write_hf_archive(path, folder / "dataset", schema, batches)
        file = path.open("rb")
        size = path.stat().st_size
    return ExportFile(types.records, size, file)


def arrow_schema(types: ColumnTypes) -> pa.Schema:
    """The Arrow schema of the columns learnt; UnwritableRecords for an object column that
    never had a field (Parquet cannot hold one)."""
    return pa.schema(
        [pa.field(key, _arrow(shape, key)) for key, shape in types.columns.fields.items()]
    )


def _arrow(shape: Shape | None, at: str) -> pa.DataType:
    if shape is None or shape.kind == "null":
        return pa.null()
    if shape.kind == "list":
        return pa.list_(_arrow(shape.item, f"{at}[]"))
    if shape.kind == "struct":
        if not shape.fields:
            raise UnwritableRecords(
                f"field '{at}' is an empty object in every record: a column of objects needs "
                "a field"
            )
        return pa.struct(
            [pa.field(key, _arrow(item, field_path(at, key))) for key, item in shape.fields.items()]
        )
    return {
        "bool": pa.bool_(),
        "int": pa.int64(),
        "float": pa.float64(),
        "string": pa.string(),
    }[shape.kind]


def _write_parquet(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    group: list[pa.RecordBatch] = []
    rows = 0
    with pq.ParquetWriter(path, schema) as writer:
        for batch in batches:
            group.append(batch)
            rows += batch.num_rows
            if rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(group, schema))
                group, rows = [], 0
        if group:
            writer.write_table(pa.Table.from_batches(group, schema))


def _batches(lines: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    rows: list[dict[str, Any]] = []
    size = 0
    with lines.open("rb") as f:
        for line in f:
            rows.append(json.loads(line))
            size += len(line)
            if len(rows) == BATCH_ROWS or size >= BATCH_BYTES:
                yield pa.RecordBatch.from_pylist(rows, schema=schema)
                rows, size = [], 0
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


def _write_hf_archive(
    path: Path, folder: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]
) -> None:
    """What `Dataset.save_to_disk` writes (the table as an Arrow stream, its info, its state),
    as an uncompressed tar with the files at its root."""
    folder.mkdir()
    with (
        pa.OSFile(str(folder / HF_DATA_FILE), "wb") as sink,
        pa.ipc.new_stream(sink, schema) as writer,
    ):
        for batch in batches:
            writer.write_batch(batch)
    # No features: `datasets` reads them from the Arrow schema.
    info = {"citation": "", "description": "", "features": None, "homepage": "", "license": ""}
    state: dict[str, Any] = {
        "_data_files": [{"filename": HF_DATA_FILE}],
        "_fingerprint": secrets.token_hex(8),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / HF_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (folder / HF_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in (HF_DATA_FILE, HF_INFO_FILE, HF_STATE_FILE):
            tar.add(folder / name, arcname=name, filter=_anyone)


def _anyone(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A plain file that unpacks as the user who unpacks it."""
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    member.mode = 0o644
    return member


def downloaded_rows(path: Path, export_format: Literal["parquet", "hf"], folder: Path) -> int:
    """The rows of a Parquet export at `path`, or of an hf export's tar at `path` once unpacked
    into `folder` (made here). ValueError when the file is not whole."""
    try:
        if export_format == "parquet":
            return int(pq.ParquetFile(path).metadata.num_rows)  # from the footer, at its end
        folder.mkdir()
        with tarfile.open(path) as tar:
            tar.extractall(folder, filter="data")
        return hf_rows(folder)
    except (pa.ArrowException, tarfile.TarError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"the file that arrived cannot be read ({exc})") from exc


def hf_rows(folder: Path) -> int:
    """The rows of a `datasets` folder, read through every data file its state lists."""
    state: dict[str, Any] = json.loads((folder / HF_STATE_FILE).read_text())
    rows = 0
    for data_file in state["_data_files"]:
        with pa.memory_map(str(folder / data_file["filename"])) as source:
            rows += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
    return rows
