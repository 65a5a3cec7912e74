"""Student endpoints: the registry, as jobs may name it."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CallerDep, SettingsDep
from app.errors import AUTH
from app.students import service
from app.students.schemas import StudentList

router = APIRouter(prefix="/students", tags=["students"], responses=AUTH)


@router.get("", summary="List the registered students")
def list_students(caller: CallerDep, settings: SettingsDep) -> StudentList:
    """The students a job may name, with the model each loads; servers and keys are not shown.
    Needs a key, as every `/v1` call does."""
    return service.list_students(settings.students)
