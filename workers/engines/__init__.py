"""Engines by name, each imported only when chosen."""

from __future__ import annotations

from typing import Any, Literal

from workers.engines.base import Engine

EngineName = Literal["auto", "hf", "vllm"]
ENGINE_NAMES: tuple[EngineName, ...] = ("auto", "hf", "vllm")


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
    name = resolve_engine_name(name)
    if name == "vllm":
        from workers.engines.vllm import VLLMEngine

        return VLLMEngine(model, revision=revision, **options)
    from workers.engines.hf import HFEngine

    return HFEngine(model, revision=revision, **options)
