"""Registry use cases: list the registered students, find the one a job names."""

from __future__ import annotations

from app.errors import InvalidField
from app.students.schemas import RegisteredStudent, Registry, Student, StudentList


def list_students(registry: Registry) -> StudentList:
    return StudentList(
        items=[
            Student(name=name, engine=s.engine, model=s.model, revision=s.revision)
            for name, s in sorted(registry.items())
        ]
    )


def find_student(registry: Registry, name: str) -> RegisteredStudent:
    """The student a submission names; a 422 naming the field when it is not registered."""
    student = registry.get(name)
    if student is None:
        names = ", ".join(sorted(registry)) or "none"
        raise InvalidField(
            ["student"], f"student {name!r} is not registered (registered students: {names})"
        )
    return student
