"""Student endpoints: the registry, as jobs may name it."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import SettingsDep
from app.students import service
from app.students.schemas import StudentList

router = APIRouter(prefix="/students", tags=["students"])


@router.get("", summary="List the registered students")
def list_students(settings: SettingsDep) -> StudentList:
    """The students a job may name, with the model each loads; servers and keys are not shown."""
    return service.list_students(settings.students)
