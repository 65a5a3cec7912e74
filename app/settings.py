"""Settings, from `KMA_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, IPvAnyNetwork, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.datasets.domain import MAX_EXAMPLES, MAX_JSON_DEPTH, MAX_LINE_BYTES
from app.students.schemas import Registry, read_registry_file


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KMA_", extra="ignore")

    data_dir: Path = Field(
        Path.home() / ".kma",
        description="Where the embedded default keeps its database, broker and model cache.",
    )
    database_url: str | None = Field(
        None, description="PostgreSQL URL; unset: the embedded PostgreSQL under data_dir."
    )
    broker_url: str | None = Field(
        None, description="Redis URL for Celery; unset: the embedded Redis under data_dir."
    )
    db_pool_size: int = Field(
        10, ge=1, description="Database connections each process keeps open (the pool)."
    )
    db_max_overflow: int = Field(
        10, ge=0, description="Connections a process may open beyond the pool when it is busy."
    )
    db_pool_timeout_seconds: float = Field(
        2.0,
        gt=0,
        description="How long a request waits for a database connection, from the pool or a new "
        "one (at least 2 s for a new one), before the API answers 503 with Retry-After.",
    )
    db_statement_timeout_seconds: float = Field(
        30.0,
        ge=0,
        description="The longest statement of an API request (an upload's COPY excepted); "
        "0: no limit. Workers have none.",
    )
    chunk_size: int = Field(256, ge=1, description="Examples per worker task.")
    lease_seconds: float = Field(
        60.0,
        ge=2,
        description="A worker's claim on a chunk; renewed while it works. A chunk whose worker "
        "died is handed out again once its lease runs out.",
    )
    sweep_seconds: float = Field(
        10.0,
        gt=0,
        description="How often each worker looks for expired leases, jobs to finish and lost "
        "tasks.",
    )
    engine_call_generations: int = Field(
        1024,
        ge=1,
        description="Most completions asked of the engine in one call: between calls a worker "
        "sees a cancel, and saves what the engine made to the cache once a second.",
    )
    max_chunk_failures: int = Field(
        3, ge=1, description="Runs of a chunk ending in an unexpected error before the job fails."
    )
    transient_retry_seconds: float = Field(
        120.0,
        ge=0,
        description="How long a worker retries a chunk in place after a lost database, broker "
        "or engine server connection before leaving it to the lease.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Serve requests without an API key, as the default workspace. Off unless "
        "the operator turns it on.",
    )
    rate_limit_per_minute: int = Field(
        6000, ge=1, description="Requests one API key may make in a minute; more answer 429."
    )
    webhook_attempts: int = Field(8, ge=1, description="Deliveries tried before giving up.")
    webhook_backoff_seconds: float = Field(
        2.0, gt=0, description="First wait between deliveries; it doubles each time, to 300 s."
    )
    webhook_allow_networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Networks (CIDRs, a JSON list) a webhook may reach although they are not "
        'public, e.g. ["10.20.0.0/16"]; by default webhooks go to public addresses only.',
    )
    max_generations_per_job: int = Field(
        50_000_000,
        ge=1,
        description="Most completions a job may take at worst (examples x exemplar sets x "
        "(1 + samples)); a submission over it is refused with a 422.",
    )
    max_upload_errors: int = Field(50, ge=1, description="Invalid lines listed in a 422.")
    max_upload_bytes: int = Field(
        1 << 30,
        ge=1,
        description="The most bytes an upload's request body may hold: a larger one answers 413 "
        "as soon as its Content-Length says so or its stream passes the limit.",
    )
    max_line_bytes: int = Field(
        MAX_LINE_BYTES, ge=1, description="The most bytes a dataset's line may hold (422)."
    )
    max_examples: int = Field(
        MAX_EXAMPLES,
        ge=1,
        le=2**31 - 1,  # positions are PostgreSQL integers
        description="The most examples a dataset may hold (422).",
    )
    max_json_depth: int = Field(
        MAX_JSON_DEPTH,
        ge=1,
        le=500,  # Python's json parser gives up near 1,000
        description="How deep objects and lists may nest in a record (422).",
    )
    students: Registry = Field(
        default_factory=dict,
        description="The students jobs may name, as JSON: {name: {engine, model, revision?, "
        "base_url?, api_key_env?}}. With those of students_file, the whole registry.",
    )
    students_file: Path | None = Field(
        None, description="A JSON file declaring more students, in the shape of `students`."
    )

    @model_validator(mode="after")
    def _read_students_file(self) -> Settings:
        if self.students_file is None:
            return self
        declared = read_registry_file(self.students_file)
        twice = sorted(set(declared) & set(self.students))
        if twice:
            raise ValueError(
                f"declared both in KMA_STUDENTS and in {self.students_file}: {', '.join(twice)}"
            )
        self.students = {**self.students, **declared}
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
