"""The engine interface: a batch of generation requests in, one result per request out, in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SamplingOptions:
    """Every decoding field, always passed explicitly: engines must not fall back on the model's
    own generation defaults."""

    n: int = 1
    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    options: SamplingOptions
    draw: int = 0
    """Samples of this prompt drawn before this request. Engines ignore it; it keeps a prompt's
    later sampling rounds apart from its first in the generation cache."""


@dataclass(frozen=True)
class GenerationResult:
    texts: list[str]
    """`options.n` completions, each cut before the first stop string."""


class Engine(Protocol):
    """A student model that answers prompts. Batches internally; results keep request order."""

    model_id: str
    """Identifies the weights (name or path, and revision): part of the generation cache key."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def close(self) -> None:
        """Release the model (and any processes the engine started)."""


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The completion up to (not including) the first stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
