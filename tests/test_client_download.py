"""`Client.download` against a mock server: a file (or an hf folder) appears only when every
announced record came."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pyarrow.parquet as pq
import pytest

from app.exports.files import HF_DATA_FILE, HF_INFO_FILE, HF_STATE_FILE, hf_rows, write_export
from kma.client import Client, IncompleteExport, KmaError

LINE = b'{"question": "Q?", "answer": "A"}\n'


def broken_body(lines: int) -> Iterator[bytes]:
    yield LINE * lines
    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


def client(handler: httpx.MockTransport) -> Client:
    return Client("http://kma.test", transport=handler)


def serving(
    body: bytes | Iterator[bytes], headers: dict[str, str], status: int = 200
) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j1/export"
        if isinstance(body, bytes):
            return httpx.Response(status, headers=headers, content=body)
        return httpx.Response(status, headers=headers, stream=IteratorStream(body))

    return httpx.MockTransport(handle)


class IteratorStream(httpx.SyncByteStream):
    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks


def assert_nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == []


def test_a_whole_export_replaces_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    dest.write_bytes(b"old\n")
    mock = serving(LINE * 3, {"X-Kma-Record-Count": "3"})
    assert client(mock).download("j1", dest) == 3
    assert dest.read_bytes() == LINE * 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_fewer_records_than_announced(tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    with pytest.raises(IncompleteExport) as raised:
        client(serving(LINE * 3, {"X-Kma-Record-Count": "5"})).download("j1", dest)
    assert (raised.value.expected, raised.value.received) == (5, 3)
    assert "received 3 records, 5 announced" in str(raised.value)
    assert_nothing_written(tmp_path)


def test_connection_dropped_mid_body(tmp_path: Path) -> None:
    dest = tmp_path / "out.jsonl"
    mock = serving(broken_body(2), {"X-Kma-Record-Count": "5"})
    with pytest.raises(IncompleteExport) as raised:
        client(mock).download("j1", dest)
    assert (raised.value.expected, raised.value.received) == (5, 2)
    assert "the connection broke after 2 of 5 records" in str(raised.value)
    assert_nothing_written(tmp_path)


def test_a_server_that_announces_no_count(tmp_path: Path) -> None:
    with pytest.raises(IncompleteExport, match="too old"):
        client(serving(LINE, {})).download("j1", tmp_path / "out.jsonl")
    assert_nothing_written(tmp_path)


def test_an_error_answer(tmp_path: Path) -> None:
    mock = serving(b'{"detail": "job j1 not found"}', {"content-type": "application/json"}, 404)
    with pytest.raises(KmaError) as raised:
        client(mock).download("j1", tmp_path / "out.jsonl")
    assert not isinstance(raised.value, IncompleteExport)
    assert raised.value.status == 404
    assert_nothing_written(tmp_path)


RECORDS = [{"id": str(i), "question": f"Q{i}?", "answer": "A"} for i in range(3)]


def built(export_format: Literal["parquet", "hf"], records: list[dict[str, Any]]) -> bytes:
    with write_export(records, export_format).file as file:
        return file.read()


def serving_format(body: bytes, count: str) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/jobs/j1/export"
        assert request.url.params["format"] in ("parquet", "hf")
        return httpx.Response(200, headers={"X-Kma-Record-Count": count}, content=body)

    return httpx.MockTransport(handle)


def test_a_whole_parquet_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.parquet"
    mock = serving_format(built("parquet", RECORDS), "3")
    assert client(mock).download("j1", dest, format="parquet") == 3
    assert pq.read_table(dest).to_pylist() == RECORDS
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_a_whole_hf_folder(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()  # an empty folder is taken
    mock = serving_format(built("hf", RECORDS), "3")
    assert client(mock).download("j1", dest, format="hf") == 3
    assert sorted(p.name for p in dest.iterdir()) == [HF_DATA_FILE, HF_INFO_FILE, HF_STATE_FILE]
    assert hf_rows(dest) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("export_format", ["parquet", "hf"])
def test_a_file_with_other_rows_than_announced(
    tmp_path: Path, export_format: Literal["parquet", "hf"]
) -> None:
    mock = serving_format(built(export_format, RECORDS), "4")
    with pytest.raises(IncompleteExport, match="received 3 records, 4 announced"):
        client(mock).download("j1", tmp_path / "out", format=export_format)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("export_format", ["parquet", "hf"])
def test_a_cut_file(tmp_path: Path, export_format: Literal["parquet", "hf"]) -> None:
    whole = built(export_format, RECORDS)
    mock = serving_format(whole[: len(whole) // 2], "3")
    with pytest.raises(IncompleteExport, match="the file that arrived cannot be read"):
        client(mock).download("j1", tmp_path / "out", format=export_format)
    assert_nothing_written(tmp_path)


def test_an_hf_download_never_writes_into_a_folder_with_files(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    mock = serving_format(built("hf", RECORDS), "3")
    with pytest.raises(FileExistsError, match="exists and is not an empty folder"):
        client(mock).download("j1", dest, format="hf")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
