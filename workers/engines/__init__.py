"""Engines by name, each imported only when chosen."""

from __future__ import annotations

import os
from typing import Any

from app.students.schemas import ENGINE_NAMES, EngineName, RegisteredStudent
from workers.engines.base import Engine


def resolve_engine_name(name: EngineName) -> EngineName:
    """`auto` is vllm where it imports and a GPU is present, else hf."""
    if name != "auto":
        return name
    import torch

    from workers.engines.vllm import vllm_available

    return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"


def load_engine(
    name: EngineName, model: str, *, revision: str | None = None, **options: Any
) -> Engine:
    """The named engine for `model`. `openai` needs `base_url`, its server, and takes
    `api_key`, which is sent to that server alone."""
    name = resolve_engine_name(name)
    if name == "openai":
        from workers.engines.openai import OpenAIEngine

        if not options.get("base_url"):
            raise ValueError("the openai engine needs a server: give its base URL")
        return OpenAIEngine(model, revision=revision, **options)
    if "base_url" in options or "api_key" in options:
        raise ValueError(f"a server and its key are for the openai engine, not {name}")
    if name == "vllm":
        from workers.engines.vllm import VLLMEngine

        return VLLMEngine(model, revision=revision, **options)
    if name == "hf":
        from workers.engines.hf import HFEngine

        return HFEngine(model, revision=revision, **options)
    raise ValueError(f"no engine is named {name!r}; the engines: {', '.join(ENGINE_NAMES)}")


def load_student(student: RegisteredStudent, **options: Any) -> Engine:
    """A registered student's engine. An openai student talks to the server of its entry, with
    the key in the environment variable the entry names."""
    if student.base_url is not None:
        options["base_url"] = str(student.base_url)
    if student.api_key_env is not None:
        key = os.environ.get(student.api_key_env)
        if not key:
            raise ValueError(f"{student.api_key_env}, the key of {student.base_url}, is not set")
        options["api_key"] = key
    return load_engine(student.engine, student.model, revision=student.revision, **options)
