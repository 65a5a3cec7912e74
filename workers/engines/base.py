"""The engine interface: a batch of generation requests in, one result per request out, in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.audit.domain import Message, Prompt


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


@dataclass(slots=True)
class GenerationRequest:
    """One prompt to answer. Not frozen: a batch makes one per prompt, and a frozen dataclass
    takes three times as long to make."""

    prompt: Prompt
    """Text to continue, or chat messages the engine renders its own way."""
    options: SamplingOptions


class EngineUnavailable(RuntimeError):
    """The engine's server could not be reached, timed out or answered 5xx: worth retrying."""


class EngineRefused(RuntimeError):
    """The engine's server refused a request (4xx, or an answer of the wrong shape): trying
    again will not mend it."""


@dataclass(slots=True)
class GenerationResult:
    """Not frozen, for the same reason as `GenerationRequest`; its texts are read, never
    changed, and results may share them (the generation cache hands out what it holds)."""

    texts: list[str]
    """`options.n` completions, each cut before the first stop string."""


def model_id_of(model: str, revision: str | None) -> str:
    """What an engine's `model_id` is for a model name or path at a revision."""
    return f"{model}@{revision}" if revision else model


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


def render_chat(tokenizer: Any, messages: Sequence[Message], model_id: str) -> str:
    """The messages in the tokenizer's chat template, ready for the answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"model {model_id} has no chat template; turn chat_template off")
    rendered: str = tokenizer.apply_chat_template(
        as_dicts(messages), tokenize=False, add_generation_prompt=True
    )
    return rendered


def as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The messages as chat templates and chat endpoints take them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def starts_with_bos(tokenizer: Any, text: str) -> bool:
    """Whether `text` already begins with the BOS token: a rendered chat template usually does,
    and tokenizing it with special tokens would add a second."""
    bos = tokenizer.bos_token
    return bool(bos) and text.startswith(bos)
