"""An engine for logic tests: answers come from a handler function, and every call is recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from workers.engines.base import GenerationRequest, GenerationResult


class FakeEngine:
    def __init__(
        self, handler: Callable[[GenerationRequest], GenerationResult], model_id: str = "fake"
    ) -> None:
        self.handler = handler
        self.model_id = model_id
        self.calls: list[list[GenerationRequest]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(list(requests))
        return [self.handler(r) for r in requests]

    def close(self) -> None:
        """Nothing to release."""
