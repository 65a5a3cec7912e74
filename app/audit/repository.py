"""Queries the audit workers run: claims and leases, chunks, verdict upserts, the cache."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from sqlalchemy import (
    Connection,
    Integer,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.orm import Session

from app.audit.domain import Exemplar, ExemplarSets, Tally, draw_exemplar_indices
from app.audit.domain import Verdict as AuditVerdict
from app.audit.schemas import AuditConfig
from app.datasets.domain import parse_record
from app.db import driver_connection
from app.models import Chunk, ChunkStatus, Example, Job, JobStatus, Verdict


def lock_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id, with_for_update=True)


def lock_job_status(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    """The job's status, its row locked FOR NO KEY UPDATE: a cancel (FOR UPDATE) waits for the
    transaction, so nothing it writes can land after the cancel commits; and a transaction that
    updates the job's counters holds the lock it needs from the start (two holding FOR SHARE,
    then both updating, would deadlock)."""
    return session.scalar(
        select(Job.status).where(Job.id == job_id).with_for_update(key_share=True)
    )


def job_status(session: Session, job_id: uuid.UUID) -> JobStatus | None:
    return session.scalar(select(Job.status).where(Job.id == job_id))


def claim_job_to_plan(session: Session) -> Job | None:
    """The oldest queued job, locked; another worker planning one skips it."""
    return session.scalars(
        select(Job)
        .where(Job.status == JobStatus.QUEUED)
        .order_by(Job.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()


@dataclass(frozen=True)
class ClaimedChunk:
    job_id: uuid.UUID
    index: int
    start: int
    stop: int


def _claimable() -> Any:
    """A pending chunk of a running job (joined in) whose lease is free or ran out."""
    return and_(
        Job.status == JobStatus.RUNNING,
        Chunk.status == ChunkStatus.PENDING,
        or_(Chunk.lease_expires_at.is_(None), Chunk.lease_expires_at < func.now()),
    )


def claim_chunk(
    session: Session,
    worker: str,
    lease_seconds: float,
    only: tuple[uuid.UUID, int] | None = None,
) -> ClaimedChunk | None:
    """Take a pending chunk whose lease is free or expired (the oldest job's first), or `only`
    that one, which this worker may hold already; the lease runs `lease_seconds` from now."""
    candidates = select(Chunk.job_id, Chunk.index).join(Job, Job.id == Chunk.job_id)
    if only is None:
        candidates = candidates.where(_claimable()).order_by(Job.created_at, Chunk.index)
    else:
        mine = and_(
            Job.status == JobStatus.RUNNING,
            Chunk.status == ChunkStatus.PENDING,
            Chunk.claimed_by == worker,
        )
        candidates = candidates.where(
            Chunk.job_id == only[0], Chunk.index == only[1], or_(_claimable(), mine)
        )
    target = candidates.limit(1).with_for_update(of=Chunk, skip_locked=True).subquery()
    row = session.execute(
        update(Chunk)
        .where(Chunk.job_id == target.c.job_id, Chunk.index == target.c.index)
        .values(
            claimed_by=worker,
            lease_expires_at=func.now() + timedelta(seconds=lease_seconds),
            attempts=Chunk.attempts + 1,
        )
        .returning(Chunk.job_id, Chunk.index, Chunk.start, Chunk.stop)
    ).first()
    return ClaimedChunk(*row) if row else None


HELD_JOB_STATUS = """
SELECT job.status FROM job
WHERE job.id = %(job_id)s AND EXISTS (
    SELECT FROM chunk
    WHERE chunk.job_id = %(job_id)s AND chunk.index = %(index)s
        AND chunk.claimed_by = %(worker)s AND chunk.status = 'pending'
)
"""


def held_job_status(connection: Connection, chunk: ClaimedChunk, worker: str) -> JobStatus | None:
    """The job's status while `worker` still holds the chunk, else None: what `renew_lease`
    tells, read without renewing. In SQL for psycopg alone: it runs between every two engine
    calls, and through SQLAlchemy it costs the worker two to three times the CPU."""
    row = (
        driver_connection(connection)
        .execute(HELD_JOB_STATUS, {"job_id": chunk.job_id, "index": chunk.index, "worker": worker})
        .fetchone()
    )
    return JobStatus(row[0]) if row else None


def renew_lease(
    session: Session, chunk: ClaimedChunk, worker: str, lease_seconds: float
) -> JobStatus | None:
    """Extend the worker's lease; the job's status, or None when the lease is no longer its."""
    renewed = session.execute(
        update(Chunk)
        .where(
            Chunk.job_id == chunk.job_id,
            Chunk.index == chunk.index,
            Chunk.claimed_by == worker,
            Chunk.status == ChunkStatus.PENDING,
        )
        .values(lease_expires_at=func.now() + timedelta(seconds=lease_seconds))
        .returning(Chunk.index)
    ).first()
    return job_status(session, chunk.job_id) if renewed else None


def release_worker_leases(session: Session, worker: str) -> None:
    session.execute(
        update(Chunk)
        .where(Chunk.claimed_by == worker, Chunk.status == ChunkStatus.PENDING)
        .values(claimed_by=None, lease_expires_at=None)
    )


def add_failure(session: Session, chunk: ClaimedChunk) -> int:
    """Count a failed run of the chunk; returns its failures so far."""
    failures: int = session.execute(
        update(Chunk)
        .where(Chunk.job_id == chunk.job_id, Chunk.index == chunk.index)
        .values(failures=Chunk.failures + 1, claimed_by=None, lease_expires_at=None)
        .returning(Chunk.failures)
    ).scalar_one()
    return failures


def claimable_work(session: Session) -> int:
    """Units of work a worker could take now: queued jobs to plan, free or expired chunks."""
    jobs = session.scalar(select(func.count()).where(Job.status == JobStatus.QUEUED)) or 0
    chunks = (
        session.scalar(
            select(func.count())
            .select_from(Chunk)
            .join(Job, Job.id == Chunk.job_id)
            .where(_claimable())
        )
        or 0
    )
    return jobs + chunks


def jobs_to_finalize(session: Session) -> list[uuid.UUID]:
    """Running jobs with no chunk left pending: their last worker died before finalizing."""
    pending = exists().where(Chunk.job_id == Job.id, Chunk.status == ChunkStatus.PENDING)
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING, ~pending)))


def try_sweep_lock(session: Session) -> bool:
    """One sweeper at a time across workers, for the rest of this transaction."""
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(SWEEP_LOCK))))


SWEEP_LOCK = 0x6B6D61  # "kma"


def iter_examples(
    session: Session, dataset_id: uuid.UUID, start: int = 0, stop: int | None = None
) -> Iterator[Example]:
    query = (
        select(Example)
        .where(Example.dataset_id == dataset_id, Example.position >= start)
        .order_by(Example.position)
    )
    if stop is not None:
        query = query.where(Example.position < stop)
    yield from session.scalars(query.execution_options(yield_per=5000))


def exemplar_sets_json(session: Session, job_id: uuid.UUID) -> dict[str, Any]:
    """The job's exemplar sets as its planning stored them."""
    return session.scalar(select(Job.exemplar_sets).where(Job.id == job_id)) or {}


def draw_exemplar_sets(
    session: Session, dataset_id: uuid.UUID, record_format: str, config: AuditConfig
) -> ExemplarSets:
    """The dataset's exemplar sets, exactly as `app.audit.domain.draw_exemplar_sets` draws them.

    It reads each group's size, draws indices from them, and then reads only the examples drawn,
    so memory stays flat however large the dataset is. Groups are read from the `group` column,
    which the upload fills with each record's parsed group.
    """
    key = func.coalesce(Example.group, "")
    sizes = session.execute(
        select(key, func.count()).where(Example.dataset_id == dataset_id).group_by(key)
    )
    draws = draw_exemplar_indices({k: n for k, n in sizes}, config)
    in_group = {(k, i) for k, d in draws.items() if not d.whole_dataset for s in d.sets for i in s}
    in_dataset = {("", i) for d in draws.values() if d.whole_dataset for s in d.sets for i in s}
    from_group = _read_ranked(session, dataset_id, record_format, in_group, by_group=True)
    from_dataset = _read_ranked(session, dataset_id, record_format, in_dataset, by_group=False)
    return {
        k: [
            [from_dataset["", i] if d.whole_dataset else from_group[k, i] for i in indices]
            for indices in d.sets
        ]
        for k, d in draws.items()
    }


def _read_ranked(
    session: Session,
    dataset_id: uuid.UUID,
    record_format: str,
    wanted: set[tuple[str, int]],
    *,
    by_group: bool,
) -> dict[tuple[str, int], Exemplar]:
    """The examples at the wanted (group, rank) pairs: rank is the 0-based index in position order
    within the group (`by_group`), or within the whole dataset (the group is then "")."""
    if not wanted:
        return {}
    key = func.coalesce(Example.group, "") if by_group else literal("")
    rank = func.row_number().over(partition_by=key if by_group else None, order_by=Example.position)
    ranked = (
        select(Example.position, key.label("key"), (rank - 1).label("rank"))
        .where(Example.dataset_id == dataset_id)
        .subquery()
    )
    keys, ranks = zip(*wanted, strict=True)
    picks = (
        func.unnest(
            bindparam("keys", list(keys), type_=ARRAY(Text)),
            bindparam("ranks", list(ranks), type_=ARRAY(Integer)),
        )
        .table_valued("key", "rank")
        .render_derived(name="pick")
    )
    rows = session.execute(
        select(ranked.c.key, ranked.c.rank, Example.line, Example.raw)
        .join(picks, (picks.c.key == ranked.c.key) & (picks.c.rank == ranked.c.rank))
        .join(
            Example,
            (Example.dataset_id == dataset_id) & (Example.position == ranked.c.position),
        )
    )
    found: dict[tuple[str, int], Exemplar] = {}
    for k, i, line, raw in rows:
        example = parse_record(record_format, raw, line)
        found[k, i] = Exemplar(example.question, example.answer)
    return found


def add_chunks(session: Session, job_id: uuid.UUID, total: int, size: int) -> int:
    """Split the job's `total` examples into chunks of `size`, in one statement."""
    count = len(range(0, total, size))
    index = func.generate_series(0, count - 1, type_=Integer).column_valued("index")
    session.execute(
        insert(Chunk).from_select(
            [Chunk.job_id, Chunk.index, Chunk.start, Chunk.stop],
            select(
                literal(job_id),
                index,
                index * size,
                func.least(index * size + size, total),
            ),
        )
    )
    return count


def has_pending_chunks(session: Session, job_id: uuid.UUID) -> bool:
    pending = exists().where(Chunk.job_id == job_id, Chunk.status == ChunkStatus.PENDING)
    return bool(session.scalar(select(pending)))


def get_chunk(session: Session, job_id: uuid.UUID, index: int) -> Chunk | None:
    return session.get(Chunk, (job_id, index))


_JSON = json.JSONEncoder(ensure_ascii=False)
"""`json.dumps(..., ensure_ascii=False)` without building an encoder at each call."""

COPY_VERDICTS = (
    "COPY verdict (job_id, position, category, flagged, conflict, audit, answers) FROM STDIN"
)


def write_verdicts(
    session: Session, job_id: uuid.UUID, verdicts: Sequence[tuple[int, AuditVerdict, Tally]]
) -> None:
    """Write verdicts, each (position, verdict, the answers it was judged on), with COPY; any
    verdict already at those positions is replaced: a chunk run again rewrites its own rows
    instead of adding more."""
    if not verdicts:
        return
    positions = literal([position for position, _, _ in verdicts], ARRAY(Integer))
    session.execute(
        delete(Verdict).where(Verdict.job_id == job_id, Verdict.position == any_(positions))
    )
    cursor = driver_connection(session.connection()).cursor()
    with cursor, cursor.copy(COPY_VERDICTS) as copy:
        for position, verdict, tally in verdicts:
            audit = verdict.audit
            copy.write_row(
                (
                    job_id,
                    position,
                    audit.category.value,
                    audit.flagged,
                    verdict.conflict,
                    audit.model_dump_json(),
                    answers_json(tally),
                )
            )


def answers_json(tally: Tally) -> str:
    """The tally's answers as `verdict.answers` keeps them: each distinct answer once, in the
    order first drawn (`texts`), then per prompt its greedy answer (`greedy`) and its samples in
    the order drawn (`samples`), each an index into `texts`."""
    index: dict[str, int] = {}
    greedy = [index.setdefault(answer, len(index)) for answer in tally.greedy]
    samples = [[index.setdefault(answer, len(index)) for answer in row] for row in tally.samples]
    return _JSON.encode({"texts": list(index), "greedy": greedy, "samples": samples})


def tally_from_answers(answers: Mapping[str, Any]) -> Tally:
    """The tally whose answers `verdict.answers` holds (see `answers_json`)."""
    texts = answers["texts"]
    return Tally(
        [texts[i] for i in answers["greedy"]],
        [[texts[i] for i in row] for row in answers["samples"]],
    )


# Keys travel as one JSON parameter (in hex): psycopg writes an array parameter element by
# element in Python, but a JSON text in one call of `json.dumps`.
GET_GENERATIONS = """
SELECT key, texts FROM generation
WHERE key IN (SELECT decode(wanted, 'hex') FROM json_array_elements_text(%s::json) AS wanted)
"""
COPY_GENERATIONS = "COPY generation (key, model_id, texts) FROM STDIN"
PUT_GENERATIONS = """
WITH unsynced AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO generation (key, model_id, texts)
SELECT decode(new ->> 0, 'hex'), %s, new -> 1 FROM unsynced, json_array_elements(%s::json) AS new
ON CONFLICT (key) DO NOTHING
"""


class SqlGenerationStore:
    """The generation cache in PostgreSQL, on a connection in autocommit mode: each read and
    write is a transaction of its own, so what the engine made is committed at once (a chunk
    that dies halfway resumes from it) and no transaction stays open while the engine generates.

    A write commits without waiting for the disk (`synchronous_commit` off, for its own
    transaction alone): a database that crashes may lose the last fraction of a second of cache
    rows, which are then generated again; the wait would cost more than the write itself.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = driver_connection(connection)

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]:
        hex_keys = json.dumps([key.hex() for key in keys])
        return dict(self.connection.execute(GET_GENERATIONS, (hex_keys,)).fetchall())

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None:
        """Add the rows whose keys the cache lacks; a key it holds keeps its first answers.

        With COPY, which costs the database about half what an `INSERT ... ON CONFLICT` costs
        per row, its text written here in one pass (see `copy_rows`); a key another worker wrote
        meanwhile (a chunk run twice at once) fails the COPY, and the rows are then written with
        the `INSERT`.
        """
        if not items:
            return
        try:
            with self.connection.transaction():
                self.connection.execute("SET LOCAL synchronous_commit = off")
                cursor = self.connection.cursor()
                with cursor, cursor.copy(COPY_GENERATIONS) as copy:
                    copy.write(copy_rows(model_id, items))
        except psycopg.errors.UniqueViolation:
            rows = json.dumps(
                [(key.hex(), texts) for key, texts in items.items()], ensure_ascii=False
            )
            self.connection.execute(PUT_GENERATIONS, (model_id, rows))


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class _CopyJsonStrings(dict[str, str]):
    """Each distinct answer as a JSON string in COPY's text format, made on first use."""

    def __missing__(self, text: str) -> str:
        # JSON escapes every control character, so only its backslashes need escaping again.
        written = self[text] = _JSON.encode(text).replace("\\", "\\\\")
        return written


def copy_rows(model_id: str, items: Mapping[bytes, list[str]]) -> str:
    """The rows (key, model_id, texts as a JSON list) in COPY's text format. Each distinct
    answer is encoded once: a row's answers are mostly a few strings said over and over, and
    one `json.dumps` a row costs the worker more than the rest of the write."""
    model = model_id.translate(_COPY_ESCAPES)
    strings = _CopyJsonStrings()
    return "".join(
        [
            f"\\\\x{key.hex()}\t{model}\t[{','.join(map(strings.__getitem__, texts))}]\n"
            for key, texts in items.items()
        ]
    )
