"""Exports: records in, chunks of bytes out, their record count announced first."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

log = logging.getLogger(__name__)

EXPORT_CHUNK_BYTES = 1 << 16
RECORD_COUNT_HEADER = "X-Kma-Record-Count"
JSONL = "application/x-ndjson"


@dataclass(frozen=True)
class Export:
    """An export about to be sent: how many records it holds, its bytes, and their name."""

    record_count: int
    chunks: Iterator[bytes]
    filename: str
    media_type: str = JSONL
    size: int | None = None
    """Known for a file written before it is sent; JSONL streams as it is read."""

    def response(self) -> StreamingResponse:
        """The export as a download, its record count in `X-Kma-Record-Count`."""
        headers = {
            RECORD_COUNT_HEADER: str(self.record_count),
            "Content-Disposition": f'attachment; filename="{self.filename}"',
        }
        if self.size is not None:
            headers["Content-Length"] = str(self.size)
        return StreamingResponse(self.chunks, media_type=self.media_type, headers=headers)


def jsonl_chunks(what: str, records: Iterable[dict[str, Any] | None]) -> Iterator[bytes]:
    """The records (None ones skipped) as JSONL, in chunks of about `EXPORT_CHUNK_BYTES`.

    A failure while the chunks are taken is logged, naming `what` was exported, and raised
    again: the server then aborts the connection, so a client never takes a short body for a
    whole one.
    """
    buffer: list[str] = []
    size = written = 0
    try:
        for record in records:
            if record is None:
                continue
            line = json.dumps(record, ensure_ascii=False) + "\n"
            buffer.append(line)
            size += len(line)
            written += 1
            if size >= EXPORT_CHUNK_BYTES:
                yield "".join(buffer).encode()
                buffer, size = [], 0
        if buffer:
            yield "".join(buffer).encode()
    except Exception:
        log.exception("%s: the export failed after %d records; aborting it", what, written)
        raise
