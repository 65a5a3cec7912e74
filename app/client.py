"""A Python client for a running kma server.

from app.client import Client
client = Client("http://127.0.0.1:8000")
dataset = client.upload_dataset("teacher.jsonl")
job = client.create_job(dataset["id"], student={"model": "my/student"})
job = client.wait(job["id"])
client.download(job["id"], "filtered.jsonl")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from app.audit.schemas import Report

FINISHED = ("succeeded", "failed", "cancelled")


class KmaError(RuntimeError):
    """The server answered with an error; `status` and `detail` say which."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class Client:
    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

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

    def create_job(
        self,
        dataset_id: str,
        student: dict[str, Any],
        config: dict[str, Any] | None = None,
        webhook_url: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"dataset_id": dataset_id, "student": student}
        if config:
            body["config"] = config
        if webhook_url:
            body["webhook_url"] = webhook_url
        result: dict[str, Any] = self._json(self.http.post("/v1/jobs", json=body))
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.get(f"/v1/jobs/{job_id}"))
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.http.post(f"/v1/jobs/{job_id}/cancel"))
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
        """Stream the export to a file; returns the number of lines written."""
        lines = 0
        with (
            self.http.stream("GET", f"/v1/jobs/{job_id}/export", params={"policy": policy}) as r,
            Path(dest).open("wb") as out,
        ):
            if r.is_error:
                r.read()
                self._json(r)
            for chunk in r.iter_bytes():
                out.write(chunk)
                lines += chunk.count(b"\n")
        return lines
