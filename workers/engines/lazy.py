"""An engine loaded on its first request: a chunk whose every answer is cached (a rescore, a job
run again) never loads its student."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from workers.engines.base import Engine, GenerationRequest, GenerationResult


class LazyEngine:
    """`load` gives the engine, once, when a request first needs it; `model_id` is what that
    engine's will be (`model_id_of` its model and revision), known before it loads, for the
    cache's keys."""

    def __init__(self, load: Callable[[], Engine], model_id: str) -> None:
        self._load = load
        self._engine: Engine | None = None
        self.model_id = model_id

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._engine is None:
            self._engine = self._load()
            if self._engine.model_id != self.model_id:
                raise RuntimeError(
                    f"the engine loaded {self._engine.model_id!r}, not {self.model_id!r}: its "
                    "answers would be cached under another model's keys"
                )
        return self._engine.generate(requests)

    def close(self) -> None:
        """The engine is the worker's to close (it keeps it for the next chunk)."""
