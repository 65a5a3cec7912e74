"""The database tables."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSONB, list[Any]: JSONB}


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class ChunkStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"


class Workspace(Base):
    """Who owns datasets and jobs: a team. Its keys see its own and nothing else."""

    __tablename__ = "workspace"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    webhook_secret: Mapped[str] = mapped_column(Text)
    """Signs the webhooks of the workspace's jobs."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key, stored as its SHA-256: the key itself is shown once, when it is made."""

    __tablename__ = "api_key"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspace.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, to tell keys apart in a list."""
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Dataset(Base):
    __tablename__ = "dataset"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspace.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(32))
    num_examples: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


POSITION_MAX = 2**31 - 1
"""The largest position: positions are PostgreSQL integers, and a larger one in a query (a
cursor, a path) would overflow it."""


class Example(Base):
    """A record as uploaded. Its position (0-based line order) is its key within the dataset."""

    __tablename__ = "example"

    dataset_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("dataset.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    record_id: Mapped[str] = mapped_column(Text)
    group: Mapped[str | None] = mapped_column(Text)
    raw: Mapped[dict[str, Any]] = mapped_column(JSON)
    """JSON, not JSONB: the export writes keys back in the order they were uploaded."""


class Job(Base):
    __tablename__ = "job"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    workspace_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("workspace.id", ondelete="CASCADE"), index=True
    )
    dataset_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, name="job_status", values_callable=lambda e: [m.value for m in e]),
        default=JobStatus.QUEUED,
    )
    student: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    webhook_url: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    """The client's `Idempotency-Key`: the same submission retried gives this job back (keys
    are the workspace's own)."""
    total: Mapped[int] = mapped_column(Integer, default=0)
    # What a poll shows, counted by the worker in the transaction that writes a chunk's
    # verdicts (`app.jobs.repository.count_chunk`), so that no read counts verdicts.
    done: Mapped[int] = mapped_column(Integer, default=0)
    """Examples with a verdict."""
    highly_known: Mapped[int] = mapped_column(Integer, default=0)
    maybe_known: Mapped[int] = mapped_column(Integer, default=0)
    weakly_known: Mapped[int] = mapped_column(Integer, default=0)
    unknown: Mapped[int] = mapped_column(Integer, default=0)
    flagged: Mapped[int] = mapped_column(Integer, default=0)
    generations: Mapped[int] = mapped_column(BigInteger, default=0)
    """Completions the engine made for the job's finished chunks."""
    cached_generations: Mapped[int] = mapped_column(BigInteger, default=0)
    exemplar_sets: Mapped[dict[str, Any] | None]
    rescore_of: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("job.id", ondelete="SET NULL", name="fk_job_rescore_of")
    )
    """The job whose answers this one judges again (`POST /v1/jobs/{id}/rescore`); null for a job
    submitted afresh, or once that job is deleted."""
    reviews_carried: Mapped[int | None] = mapped_column(Integer)
    """A rescore's: the source job's decisions copied onto it when it finished."""
    reviews_not_carried: Mapped[int | None] = mapped_column(Integer)
    """A rescore's: the source job's decisions left behind (the example is no longer flagged,
    or an accepted suggestion changed)."""
    report: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_job_created_at", "created_at"),
        UniqueConstraint("workspace_id", "idempotency_key", name="uq_job_idempotency_key"),
        Index("ix_job_rescore_of", "rescore_of", postgresql_where=text("rescore_of IS NOT NULL")),
    )


class Chunk(Base):
    """A slice of a job's examples [start, stop): the unit of work of one task.

    A worker claims a pending chunk with a lease (`claimed_by`, `lease_expires_at`) that it
    renews while it works; a chunk whose lease ran out is claimed again by another worker.
    """

    __tablename__ = "chunk"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("job.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    status: Mapped[ChunkStatus] = mapped_column(
        Enum(ChunkStatus, name="chunk_status", values_callable=lambda e: [m.value for m in e]),
        default=ChunkStatus.PENDING,
    )
    claimed_by: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Times the chunk was claimed."""
    failures: Mapped[int] = mapped_column(Integer, default=0)
    """Runs that ended in an error that was not transient; the job fails at the limit."""
    generations: Mapped[int] = mapped_column(BigInteger, default=0)
    """Completions the engine made for this chunk; cache hits are counted apart."""
    cached_generations: Mapped[int] = mapped_column(BigInteger, default=0)
    engine_calls: Mapped[int] = mapped_column(Integer, default=0)
    engine_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    seconds: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_chunk_pending", "job_id", "index", postgresql_where=text("status = 'pending'")),
    )


class Verdict(Base):
    """One example's audit within a job; a chunk run again replaces its chunk's verdicts."""

    __tablename__ = "verdict"

    job_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("job.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(16))
    flagged: Mapped[bool] = mapped_column(Boolean)
    conflict: Mapped[bool] = mapped_column(Boolean)
    audit: Mapped[dict[str, Any]]
    answers: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Every answer of the student (greedy and sampled, per prompt), so re-scoring needs no
    model: `{"texts": [...], "greedy": [...], "samples": [[...], ...]}`, each distinct answer
    once in `texts` and the others as indices into it (see `app.audit.repository.answers_json`).
    JSON, not JSONB: written and read whole, never queried inside."""

    __table_args__ = (Index("ix_verdict_job_category", "job_id", "category", "position"),)


class Decision(StrEnum):
    """What a person made of a flagged example's suggested relabel."""

    ACCEPT = "accept"
    """The suggestion goes into the reviewed export."""
    REJECT = "reject"
    """The teacher's answer stays."""
    OVERRIDE = "override"
    """The reviewer's own answer goes in."""


class Review(Base):
    """A person's decision on a flagged example of a finished job; one per example, the last
    made. Deleted with its verdict (and so with its job)."""

    __tablename__ = "review"

    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    decision: Mapped[Decision] = mapped_column(
        Enum(Decision, name="review_decision", values_callable=lambda e: [m.value for m in e])
    )
    answer: Mapped[str | None] = mapped_column(Text)
    """The reviewer's answer: with `override`, and only then."""
    note: Mapped[str | None] = mapped_column(Text)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_key.id", ondelete="SET NULL")
    )
    """The key the decision was made with; null when anonymous."""
    reviewed_by: Mapped[str] = mapped_column(String(255))
    """The name of that key, as it was then."""
    reviewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        ForeignKeyConstraint(
            ["job_id", "position"],
            ["verdict.job_id", "verdict.position"],
            name="fk_review_verdict",
            ondelete="CASCADE",
        ),
        CheckConstraint(
            "(decision = 'override') = (answer IS NOT NULL)", name="ck_review_override_answer"
        ),
    )


class Generation(Base):
    """The generation cache: completions by (namespace, student model and revision, prompt,
    options, draw), hashed into `key` (see `workers.engines.cached`)."""

    __tablename__ = "generation"

    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(Text)
    texts: Mapped[list[Any]] = mapped_column(JSON)
    """JSON, not JSONB: written and read whole, never queried inside."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
