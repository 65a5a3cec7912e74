"""Estimate use cases: what a submission would take, refused exactly as the submission would be.

The generation cache is counted with the workers' own requests and keys (`workers.runner`,
`workers.engines`): the one place `app` imports `workers`, so that an estimate looks up the very
keys a job would. Those modules are plain data and functions; no engine is loaded.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.orm import Session

from app.audit import repository as audit_repository
from app.audit.domain import build_prompts
from app.audit.schemas import AuditConfig
from app.datasets.domain import parse_record
from app.estimates import repository
from app.estimates.domain import generations_per_prompt, sample_positions, sampling_steps
from app.estimates.schemas import Bounds, Estimate, Rate, SecondsBounds
from app.jobs import service as jobs_service
from app.jobs.schemas import JobCreate
from app.models import Dataset
from app.settings import Settings
from app.students.schemas import Student
from workers.engines.base import SamplingOptions, model_id_of
from workers.engines.cached import GenerationStore, cached_completions
from workers.runner import greedy_options, sample_options

CACHE_SAMPLE = 10_000
"""The most examples whose requests are looked up in the cache: a larger dataset is sampled
evenly and its counts scaled up, so an estimate answers in seconds at any size."""
BATCH_EXAMPLES = 1000
"""Examples whose prompts are looked up in the cache at a time: memory stays flat."""


def estimate_job(
    session: Session, workspace_id: uuid.UUID, job_create: JobCreate, settings: Settings
) -> Estimate:
    """What a job submitted with `job_create` would take; nothing is stored or generated."""
    student, dataset = jobs_service.check_submission(session, workspace_id, job_create, settings)
    config = job_create.config
    prompts = dataset.num_examples * config.n_exemplar_sets
    generations = Bounds(
        best=prompts * generations_per_prompt(config, correct=True),
        worst=prompts * generations_per_prompt(config, correct=False),
    )
    store = audit_repository.SqlGenerationStore(session.connection())
    model_id = model_id_of(student.model, student.revision)
    positions = sample_positions(dataset.num_examples, CACHE_SAMPLE)
    found = _count_cached(session, store, str(workspace_id), model_id, dataset, config, positions)
    scale = dataset.num_examples / len(positions) if positions else 0
    cached = Bounds(best=round(found.best * scale), worst=round(found.worst * scale))
    new = Bounds(best=generations.best - cached.best, worst=generations.worst - cached.worst)
    made, engine_seconds, chunks = repository.generation_rate(session, workspace_id, student)
    rate = seconds = None
    if engine_seconds > 0:
        per_second = made / engine_seconds
        rate = Rate(generations_per_second=round(per_second, 1), chunks=chunks)
        seconds = SecondsBounds(
            best=round(new.best / per_second, 1), worst=round(new.worst / per_second, 1)
        )
    return Estimate(
        dataset_id=dataset.id,
        student=Student(
            name=job_create.student,
            engine=student.engine,
            model=student.model,
            revision=student.revision,
        ),
        mode=config.mode,
        examples=dataset.num_examples,
        prompts=prompts,
        generations=generations,
        cached=cached,
        cache_examples=len(positions),
        new=new,
        rate=rate,
        seconds=seconds,
    )


def _count_cached(
    session: Session,
    store: GenerationStore,
    namespace: str,
    model_id: str,
    dataset: Dataset,
    config: AuditConfig,
    positions: Sequence[int],
) -> Bounds:
    """Completions of the job's best and of its worst case that the cache holds, for the
    examples at `positions`.

    Builds each example's prompts and requests as the worker does (its exemplar sets drawn the
    same way), and looks them up batch by batch. The best case's sampling steps are among the
    worst case's (all of them in full mode, none in adaptive mode).
    """
    sets = audit_repository.draw_exemplar_sets(session, dataset.id, dataset.format, config)
    in_best = sampling_steps(config, correct=True)
    kinds: list[tuple[SamplingOptions, int, bool]] = [(greedy_options(config), 0, True)]
    kinds += [
        (sample_options(config, step.n), step.drawn, step in in_best)
        for step in sampling_steps(config, correct=False)
    ]
    best = worst = 0
    for start in range(0, len(positions), BATCH_EXAMPLES):
        batch = list(positions[start : start + BATCH_EXAMPLES])
        rows = repository.examples_at(session, dataset.id, batch)
        examples = [parse_record(dataset.format, row.raw, row.line) for row in rows]
        prompts = [prompt for ps in build_prompts(examples, sets, config) for prompt in ps]
        for options, drawn, best_too in kinds:
            found = cached_completions(store, namespace, model_id, options, drawn, prompts)
            worst += found
            best += found if best_too else 0
    return Bounds(best=best, worst=worst)
