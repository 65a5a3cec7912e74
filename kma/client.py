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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from app.audit.schemas import Report
from app.comparisons.schemas import Comparison
from app.estimates.schemas import Estimate
from app.settings import get_settings
from app.workspaces.domain import KEY_FILE

FINISHED = ("succeeded", "failed", "cancelled")
RECORD_COUNT_HEADER = "X-Kma-Record-Count"
"""The number of lines an export announces before its body."""


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

    def download(self, job_id: str, dest: str | Path, *, policy: str = "suggested") -> int:
        """Stream the export to `dest`; returns the number of lines written.

        The lines go to a temporary file beside `dest`, which replaces `dest` only once their
        number equals the one the server announced. Otherwise the temporary file is removed,
        `dest` is left as it was, and this raises `IncompleteExport` (or `KmaError` when the
        server answered an error).
        """
        export = Download(f"/v1/jobs/{job_id}/export", {"policy": policy}, f"job {job_id}")
        return self._download(export, Path(dest))

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
        """Stream the examples of a comparison the filters keep (e.g. `known_by=[A]`,
        `unknown_by=[B]`) to `dest`, each record as uploaded; whole, as `download` writes, or
        not at all. `categories` are `JOB:CATEGORY[,CATEGORY...]`."""
        params: dict[str, Any] = {
            "jobs": ",".join(job_ids),
            "known_by": list(known_by),
            "unknown_by": list(unknown_by),
            "category": list(categories),
        }
        if disagree:
            params["disagree"] = "true"
        what = f"the comparison of jobs {', '.join(job_ids)}"
        return self._download(Download("/v1/comparisons/export", params, what), Path(dest))

    def _download(self, export: Download, dest: Path) -> int:
        # A name of its own, made like any file (umask permissions, unlike mkstemp's 0600).
        temporary = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            with temporary.open("xb") as out:
                lines = self._stream_export(export, out)
            os.replace(temporary, dest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return lines

    def _stream_export(self, export: Download, out: IO[bytes]) -> int:
        lines = 0
        expected: int | None = None
        try:
            with self.http.stream("GET", export.path, params=export.params) as r:
                if r.is_error:
                    r.read()
                    self._json(r)
                announced = r.headers.get(RECORD_COUNT_HEADER)
                if announced is None or not announced.isdigit():
                    raise IncompleteExport(
                        export.what,
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
            raise IncompleteExport(
                export.what,
                expected,
                lines,
                f"the connection broke after {lines} of {expected} records ({exc})",
            ) from exc
        if lines != expected:
            raise IncompleteExport(
                export.what, expected, lines, f"received {lines} records, {expected} announced"
            )
        return lines


@dataclass(frozen=True)
class Download:
    """An export to fetch: its path and query, and how errors name it."""

    path: str
    params: dict[str, Any]
    what: str


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
