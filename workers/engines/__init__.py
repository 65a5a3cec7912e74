"""Engines by name, each imported only when chosen."""

from __future__ import annotations

from typing import Any, Literal

from workers.engines.base import Engine

EngineName = Literal["auto", "hf", "vllm", "openai"]
ENGINE_NAMES: tuple[EngineName, ...] = ("auto", "hf", "vllm", "openai")


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
    """The named engine for `model`. `openai` takes `base_url` and `api_key`, by default the
    settings `KMA_OPENAI_BASE_URL` and `KMA_OPENAI_API_KEY`."""
    name = resolve_engine_name(name)
    if name == "openai":
        from app.settings import get_settings
        from workers.engines.openai import OpenAIEngine

        settings = get_settings()
        base_url = options.pop("base_url", None) or settings.openai_base_url
        if not base_url:
            raise ValueError(
                "the openai engine needs a server: give a base URL or set KMA_OPENAI_BASE_URL"
            )
        options.setdefault("api_key", settings.openai_api_key)
        return OpenAIEngine(model, base_url=base_url, revision=revision, **options)
    if "base_url" in options:
        raise ValueError(f"a base URL is for the openai engine, not {name}")
    if name == "vllm":
        from workers.engines.vllm import VLLMEngine

        return VLLMEngine(model, revision=revision, **options)
    from workers.engines.hf import HFEngine

    return HFEngine(model, revision=revision, **options)
