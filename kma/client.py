"""A Python client for a running kma server.

from kma.client import Client
client = Client("http://127.0.0.1:8000", api_key="kma_...")  # default: KMA_API_KEY
dataset = client.upload_dataset("teacher.jsonl")
job = client.create_job(dataset["id"], student="my-student")  # a registered name
job = client.wait(job["id"])
client.download(job["id"], "filtered.jsonl")
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from app.audit.schemas import Report
from app.comparisons.schemas import Comparison
from app.estimates.schemas import Estimate
from app.exports.domain import ExportFormat
from app.settings import get_settings
from app.workspaces.domain import KEY_FILE

FINISHED = ("succeeded", "failed", "cancelled")
RECORD_COUNT_HEADER = "X-Kma-Record-Count"
"""The number of records an export announces before its body."""
FILE_EXPORT_WAIT_SECONDS = 3600.0
"""How long a Parquet or hf download waits for its first byte: the server writes the whole
file first (about a minute for a million records)."""


class KmaError(RuntimeError):
    """The server answered with an error; `status` and `detail` say which."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class IncompleteExport(KmaError):
    """An export that did not arrive whole: fewer (or more) lines than the server announced,
    the connection broken part way, or no count announced at all. `what` names the export:
    "job ID", "the comparison of jobs ID, ID"."""

    def __init__(self, what: str, expected: int | None, received: int, reason: str) -> None:
        message = f"the export of {what} is incomplete: {reason}; no file was written"
        super().__init__(502, message)  # a bad answer from the server, as a gateway would say
        self.args = (message,)
        self.what = what
        self.expected = expected
        self.received = received


def default_api_key() -> str | None:
    """`KMA_API_KEY`, else the key `kma serve` saved under the data folder on its first start."""
    if key := os.environ.get("KMA_API_KEY"):
        return key
    path = get_settings().data_dir / KEY_FILE
    return path.read_text().strip() if path.is_file() else None


class Client:
    """`api_key` defaults to `default_api_key()`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        key = api_key or default_api_key()
        self.timeout = timeout
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {key}"} if key else None,
        )

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise KmaError(response.status_code, detail)
        return response.json()

    def upload_dataset(
        self, path: str | Path, *, format: str = "auto", name: str | None = None
    ) -> dict[str, Any]:
        path = Path(path)
        with path.open("rb") as f:
            response = self.http.post(
                "/v1/datasets",
                files={"file": (path.name, f, "application/x-ndjson")},
                data={"format": format, **({"name": name} if name else {})},
            )
        result: dict[str, Any] = self._json(response)
        return result

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete the dataset and everything made of it."""
        response = self.http.delete(f"/v1/datasets/{dataset_id}")
        if response.is_error:
            self._json(response)

    def create_job(
        self,
        dataset_id: str,
        student: str,
        config: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        body = _submission(dataset_id, student, config, webhook_url)
        result: dict[str, Any] = self._json(self.http.post("/v1/jobs", json=body))
        return result

    def rescore(
        self,
        job_id: str,
        config: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        """A new job judging the succeeded job's stored answers with other judging options
        (matcher, f1_threshold, flag_categories, student_answer_min_agreement, idk_text)."""
        body: dict[str, Any] = {"config": config or {}}
        if webhook_url:
            body["webhook_url"] = webhook_url
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/rescore", json=body))
        return result

    def estimate(
        self,
        dataset_id: str,
        student: str,
        config: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> Estimate:
        """What `create_job` with these arguments would take; nothing is stored or run."""
        body = _submission(dataset_id, student, config, webhook_url)
        return Estimate.model_validate(self._json(self.http.post("/v1/estimates", json=body)))

    def compare(self, job_ids: Sequence[str]) -> Comparison:
        """Succeeded jobs of different students on one dataset: their transition tables."""
        response = self.http.get("/v1/comparisons", params={"jobs": ",".join(job_ids)})
        return Comparison.model_validate(self._json(response))

    def students(self) -> list[dict[str, Any]]:
        """The registered students a job may name: name, engine, model, revision."""
        result: list[dict[str, Any]] = self._json(self.http.get("/v1/students"))["items"]
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/jobs/{job_id}"))
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))
        return result

    def workspace(self) -> dict[str, Any]:
        """The key's workspace: its name and the secret that signs its webhooks."""
        result: dict[str, Any] = self._json(self.http.get("/v1/workspace"))
        return result

    def report(self, job_id: str) -> Report:
        return Report.model_validate(self._json(self.http.get(f"/v1/jobs/{job_id}/report")))

    def wait(
        self,
        job_id: str,
        *,
        poll_seconds: float = 1.0,
        timeout: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] = lambda job: None,
    ) -> dict[str, Any]:
        """Poll until the job finishes; returns its last state."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_seconds)

    def example(self, job_id: str, position: int) -> dict[str, Any]:
        """The audited example at `position`: its record, audit and review."""
        result: dict[str, Any] = self._json(self.http.get(f"/v1/jobs/{job_id}/examples/{position}"))
        return result

    def review(
        self,
        job_id: str,
        position: int,
        decision: str,
        *,
        answer: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Decide on a flagged example's relabel: `accept`, `reject`, or `override` with
        `answer`. Returns the example with its review."""
        body = {"decision": decision, "answer": answer, "note": note}
        response = self.http.patch(
            f"/v1/jobs/{job_id}/examples/{position}",
            json={k: v for k, v in body.items() if v is not None},
        )
        result: dict[str, Any] = self._json(response)
        return result

    def review_many(self, job_id: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Store decisions (`{"position", "decision", "answer"?, "note"?}` each) all together,
        or none: a bad item raises KmaError 422 naming its index. Returns the count stored and
        the job's review counts."""
        response = self.http.patch(f"/v1/jobs/{job_id}/examples", json={"items": items})
        result: dict[str, Any] = self._json(response)
        return result

    def download(
        self,
        job_id: str,
        dest: str | Path,
        *,
        policy: str = "suggested",
        format: ExportFormat = "jsonl",
        unreviewed: str | None = None,
    ) -> int:
        """Download the export to `dest`; returns the number of records written.

        `format` is `jsonl`, `parquet` (one file) or `hf` (`dest` is a folder, which must be
        absent or empty, that `datasets.load_from_disk` opens). `unreviewed` goes with the
        `reviewed` policy. The export goes to a temporary file beside `dest`, which takes its
        place only once it holds the number of records the server announced. Otherwise it is
        removed, `dest` is left as it was, and this raises `IncompleteExport` (or `KmaError`
        when the server answered an error).
        """
        params = {"policy": policy, "format": format}
        if unreviewed is not None:
            params["unreviewed"] = unreviewed
        return self._download(f"/v1/jobs/{job_id}/export", f"job {job_id}", params, Path(dest))

    def download_comparison(
        self,
        job_ids: Sequence[str],
        dest: str | Path,
        *,
        known_by: Sequence[str] = (),
        unknown_by: Sequence[str] = (),
        categories: Sequence[str] = (),
        disagree: bool = False,
    ) -> int:
        """Download the examples of a comparison the filters keep (e.g. `known_by=[A]`,
        `unknown_by=[B]`) to `dest` as JSONL, each record as uploaded; whole, as `download`
        writes, or not at all. `categories` are `JOB:CATEGORY[,CATEGORY...]`."""
        params: dict[str, Any] = {
            "jobs": ",".join(job_ids),
            "known_by": list(known_by),
            "unknown_by": list(unknown_by),
            "category": list(categories),
        }
        if disagree:
            params["disagree"] = "true"
        what = f"the comparison of jobs {', '.join(job_ids)}"
        return self._download("/v1/comparisons/export", what, params, Path(dest))

    def _download(self, path: str, what: str, params: dict[str, Any], dest: Path) -> int:
        format: ExportFormat = params.get("format", "jsonl")
        if format == "hf" and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise FileExistsError(f"{dest} exists and is not an empty folder")
        # Names of their own, made like any file (umask permissions, unlike mkstemp's 0600).
        part = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        unpacked = part.with_suffix(".unpacked")
        try:
            with part.open("xb") as out:
                expected, records = self._stream_export(path, what, params, out)
            done = part
            if format != "jsonl":
                # pyarrow reads them: loaded here, not by every command.
                from app.exports.files import downloaded_rows

                try:
                    records = downloaded_rows(part, format, unpacked)
                except (OSError, ValueError) as exc:
                    raise IncompleteExport(what, expected, 0, str(exc)) from exc
            if format == "hf":
                part.unlink()
                done = unpacked
            if records != expected:
                raise IncompleteExport(
                    what, expected, records, f"received {records} records, {expected} announced"
                )
            os.replace(done, dest)
        except BaseException:
            part.unlink(missing_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)
            raise
        return records

    def _stream_export(
        self, path: str, what: str, params: dict[str, Any], out: IO[bytes]
    ) -> tuple[int, int]:
        """Write the export's body to `out`: the count the server announced, and the lines
        received."""
        lines = 0
        expected: int | None = None
        try:
            timeout = httpx.Timeout(self.timeout)
            if (
                params.get("format", "jsonl") != "jsonl"
            ):  # the server answers once the whole file is written
                timeout = httpx.Timeout(self.timeout, read=FILE_EXPORT_WAIT_SECONDS)
            with self.http.stream("GET", path, params=params, timeout=timeout) as r:
                if r.is_error:
                    r.read()
                    self._json(r)
                announced = r.headers.get(RECORD_COUNT_HEADER)
                if announced is None or not announced.isdigit():
                    raise IncompleteExport(
                        what,
                        None,
                        0,
                        f"the server announced no {RECORD_COUNT_HEADER} (is it too old?)",
                    )
                expected = int(announced)
                for chunk in r.iter_bytes():
                    out.write(chunk)
                    lines += chunk.count(b"\n")
        except httpx.HTTPError as exc:
            if expected is None:
                raise
            done = (
                f"{lines} of {expected} records"
                if "format" not in params or params["format"] == "jsonl"
                else "part way"
            )
            raise IncompleteExport(
                what, expected, lines, f"the connection broke after {done} ({exc})"
            ) from exc
        return expected, lines


def _submission(
    dataset_id: str, student: str, config: dict[str, Any] | None, webhook_url: str | None
) -> dict[str, Any]:
    """The body of a job's submission, as `POST /v1/jobs` and `POST /v1/estimates` take it."""
    body: dict[str, Any] = {"dataset_id": dataset_id, "student": student}
    if config:
        body["config"] = config
    if webhook_url:
        body["webhook_url"] = webhook_url
    return body
