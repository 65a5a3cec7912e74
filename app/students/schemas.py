"""A registered student as the operator declares it, and as jobs and reports show it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

EngineName = Literal["auto", "hf", "vllm", "openai"]
ENGINE_NAMES: tuple[EngineName, ...] = get_args(EngineName)

StudentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")]
"""What a job names a student by: letters, digits and `._:/-`, at most 128 characters."""


class RegisteredStudent(BaseModel):
    """One student of the registry (`KMA_STUDENTS`, `KMA_STUDENTS_FILE`): what its name loads.

    An openai student's key is not here: `api_key_env` names the environment variable that holds
    it on the workers, so no secret sits in the registry, in a job or in the database, and the key
    goes to this entry's server only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineName = Field(
        description="auto: vllm where it imports and a GPU is present, else hf. openai: an "
        "OpenAI-compatible completions server serving `model` (`vllm serve`, SGLang, ...)."
    )
    model: str = Field(
        min_length=1,
        description="A Hugging Face model id or a directory on the workers; for openai, the name "
        "the server serves the model under.",
    )
    revision: str | None = Field(None, description="A model revision (branch, tag or commit).")
    base_url: HttpUrl | None = Field(
        None, description="openai only, and required there: the server, e.g. http://host:8000/v1."
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="openai only: the environment variable on the workers holding the server's "
        "key, sent as `Authorization: Bearer` to `base_url` alone; unset: no key is sent.",
    )

    @model_validator(mode="after")
    def _server_only_for_openai(self) -> RegisteredStudent:
        if self.engine == "openai":
            if self.base_url is None:
                raise ValueError("the openai engine needs base_url, its server")
            return self
        given = [field for field in ("base_url", "api_key_env") if getattr(self, field)]
        if given:
            raise ValueError(f"{' and '.join(given)} is for the openai engine, not {self.engine}")
        return self

    def loads(self, student: Student) -> bool:
        """Whether this entry loads the model a job stored as its student: the same engine,
        model and revision."""
        return (self.engine, self.model, self.revision) == (
            student.engine,
            student.model,
            student.revision,
        )

    def spec(self, name: str) -> dict[str, Any]:
        """What a job stores of it: no server, no key, only whether a key is sent."""
        shown = Student(name=name, engine=self.engine, model=self.model, revision=self.revision)
        return {**shown.model_dump(mode="json"), "api_key_set": self.api_key_env is not None}


Registry = dict[StudentName, RegisteredStudent]
REGISTRY: TypeAdapter[Registry] = TypeAdapter(Registry)


def read_registry_file(path: Path) -> Registry:
    """The students a JSON file declares, or a ValueError naming the file and each fault."""
    try:
        return REGISTRY.validate_json(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_registry_errors(exc)}") from None


def describe_registry_errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'the file'}: "
        f"{error['msg'].removeprefix('Value error, ')}"
        for error in exc.errors(include_url=False)
    )


class Student(BaseModel):
    """A registered student as a job and its report show it: its name and the model it loads."""

    name: str = Field(description="Its name in the registry (`GET /v1/students`).")
    engine: EngineName
    model: str = Field(description="A Hugging Face model id or a directory on the workers.")
    revision: str | None = Field(None, description="A model revision (branch, tag or commit).")

    @model_validator(mode="before")
    @classmethod
    def _named_by_model(cls, data: Any) -> Any:
        """Jobs stored before the registry named their student by its model."""
        if isinstance(data, dict) and "name" not in data and "model" in data:
            return {**data, "name": data["model"]}
        return data


class StudentList(BaseModel):
    items: list[Student] = Field(description="The registered students, by name.")


def dump_registry(registry: Registry) -> str:
    """The registry as `KMA_STUDENTS` takes it."""
    return json.dumps(
        {name: s.model_dump(mode="json", exclude_none=True) for name, s in registry.items()}
    )
