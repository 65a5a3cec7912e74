"""Estimate endpoint: what a job would take, before it is submitted."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import SessionDep, SettingsDep, WorkspaceDep
from app.errors import AUTH, NOT_FOUND, UNPARSABLE
from app.estimates import service
from app.estimates.schemas import Estimate
from app.jobs.schemas import JobCreate

router = APIRouter(prefix="/estimates", tags=["estimates"], responses=AUTH)


@router.post(
    "",
    summary="Estimate a job before submitting it",
    responses={**UNPARSABLE, **NOT_FOUND},
)
def estimate_job(
    session: SessionDep, workspace: WorkspaceDep, settings: SettingsDep, job_create: JobCreate
) -> Estimate:
    """What `POST /v1/jobs` with this body would take: prompts, generations at best and at
    worst, how many the generation cache holds already, and the time at the pace the workers
    measured on this student.

    Nothing is stored, queued or generated. The body is checked exactly as a submission is: the
    same 422s (an unregistered student, an invalid option, too many generations, a webhook that
    is not public) and the same 404 for a dataset the workspace does not have.
    """
    return service.estimate_job(session, workspace.id, job_create, settings)
