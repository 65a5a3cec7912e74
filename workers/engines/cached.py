"""The generation cache as an engine wrapper: same interface, asks the inner engine only for
requests it has not answered before."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Protocol

from workers.engines.base import Engine, GenerationRequest, GenerationResult


class GenerationStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]: ...

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None: ...


def cache_key(namespace: str, model_id: str, request: GenerationRequest) -> bytes:
    """(namespace, student model and revision, prompt, sampling options, which draw) as 32
    bytes."""
    payload = json.dumps(
        [namespace, model_id, request.prompt, asdict(request.options), request.draw],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).digest()


def lookup(
    store: GenerationStore, namespace: str, model_id: str, requests: Sequence[GenerationRequest]
) -> tuple[list[bytes], dict[bytes, list[str]]]:
    """The requests' cache keys, in order, and the completions the cache holds under them.

    Where requests meet the cache: the engine wrapper answers from it, and a job's estimate
    counts what the job would find in it.
    """
    keys = [cache_key(namespace, model_id, r) for r in requests]
    return keys, dict(store.get_many(list(set(keys))))


class CachedEngine:
    """`namespace` keeps caches apart: the service gives each workspace its own, so that what
    one workspace's jobs generated never shows (as answers or as cache hits) in another's."""

    def __init__(self, engine: Engine, store: GenerationStore, namespace: str = "") -> None:
        self.engine = engine
        self.store = store
        self.namespace = namespace
        self.model_id = engine.model_id
        self.new_generations = 0
        self.cached_generations = 0

    def close(self) -> None:
        self.engine.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        keys, found = lookup(self.store, self.namespace, self.model_id, requests)
        missing = {k: r for k, r in zip(keys, requests, strict=True) if k not in found}
        if missing:
            results = self.engine.generate(list(missing.values()))
            fresh = {k: res.texts for k, res in zip(missing, results, strict=True)}
            self.store.put_many(self.model_id, fresh)
            found.update(fresh)
            self.new_generations += sum(len(t) for t in fresh.values())
        self.cached_generations += sum(
            r.options.n for k, r in zip(keys, requests, strict=True) if k not in missing
        )
        return [GenerationResult(list(found[k])) for k in keys]
