"""Estimate I/O: what a job would take, at best and at worst."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from app.audit.schemas import Mode
from app.students.schemas import Student


class Bounds(BaseModel):
    best: int = Field(description="When the student answers every prompt correctly.")
    worst: int = Field(description="When the student answers nothing correctly.")


class SecondsBounds(BaseModel):
    best: float
    worst: float


class Rate(BaseModel):
    generations_per_second: float = Field(
        description="New completions per second of engine time, measured by the workers."
    )
    chunks: int = Field(description="The student's recent chunks the rate was measured on.")


class Estimate(BaseModel):
    """What a job with this submission would take; nothing is stored or generated to say it."""

    dataset_id: uuid.UUID
    student: Student
    mode: Mode
    examples: int = Field(description="Examples in the dataset.")
    prompts: int = Field(description="Few-shot prompts: examples x n_exemplar_sets.")
    generations: Bounds = Field(
        description="Completions the audit takes, new or cached. Full mode: exact (best and "
        "worst are equal). Adaptive mode: the greedy answers alone at best, every sampling "
        "round of every prompt at worst."
    )
    cached: Bounds = Field(
        description="Of those, how many the generation cache holds already (the workspace's "
        "own, for this student model)."
    )
    cache_examples: int = Field(
        description="Examples whose requests were looked up in the cache: every one up to "
        "10,000; beyond, 10,000 spread evenly over the dataset, and `cached` is scaled up from "
        "them."
    )
    new: Bounds = Field(description="What the student has to generate: generations - cached.")
    rate: Rate | None = Field(
        description="The pace the workers measured on this student model in this workspace's "
        "recent jobs; null when it has run none."
    )
    seconds: SecondsBounds | None = Field(
        description="Engine seconds the new completions take at that rate (one worker; more "
        "workers share them); null when there is no rate."
    )
