"""Review endpoints: a person's decision on one flagged example, or on many at once."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Path

from app.deps import CallerDep, SessionDep
from app.errors import AUTH, NOT_FOUND, UNPARSABLE, ErrorRead, Responses
from app.jobs.schemas import ExampleRead
from app.models import POSITION_MAX
from app.reviews import service
from app.reviews.schemas import ReviewBatch, ReviewBatchRead, ReviewUpdate

router = APIRouter(prefix="/jobs", tags=["reviews"], responses=AUTH)

NOT_REVIEWABLE: Responses = {
    409: {"model": ErrorRead, "description": "The job is neither succeeded nor cancelled."}
}


@router.patch(
    "/{job_id}/examples/{position}",
    summary="Review a flagged example",
    responses={**UNPARSABLE, **NOT_FOUND, **NOT_REVIEWABLE},
)
def review_example(
    session: SessionDep,
    caller: CallerDep,
    job_id: uuid.UUID,
    position: Annotated[int, Path(ge=0, le=POSITION_MAX, description="0-based.")],
    update: ReviewUpdate,
) -> ExampleRead:
    """Accept the example's suggested relabel, reject it (the teacher's answer stays), or
    override it with `answer`. A later decision replaces this one; the request's key is
    recorded as who decided. The `reviewed` export applies decisions.

    Only flagged examples are reviewed: another answers 422; a position without a verdict, 404.
    """
    example = service.review_example(session, caller, job_id, position, update)
    session.commit()
    return example


@router.patch(
    "/{job_id}/examples",
    summary="Review many flagged examples",
    responses={**UNPARSABLE, **NOT_FOUND, **NOT_REVIEWABLE},
)
def review_examples(
    session: SessionDep, caller: CallerDep, job_id: uuid.UUID, batch: ReviewBatch
) -> ReviewBatchRead:
    """Store a decision for each item, or none at all: one bad item answers 422 naming its
    index and field (`["body", "items", 3, "position"]`), and nothing is stored."""
    result = service.review_examples(session, caller, job_id, batch)
    session.commit()
    return result
