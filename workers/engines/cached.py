"""The generation cache as an engine wrapper: same interface, asks the inner engine only for
requests it has not answered before."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Protocol

from app.audit.domain import Prompt
from workers.engines.base import Engine, GenerationRequest, GenerationResult, SamplingOptions


class GenerationStore(Protocol):
    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, list[str]]: ...

    def put_many(self, model_id: str, items: Mapping[bytes, list[str]]) -> None: ...


def key_prefix(namespace: str, model_id: str, options: SamplingOptions) -> bytes:
    """What the keys of requests with the same options share: (namespace, student model and
    revision, sampling options), hashed."""
    payload = json.dumps([namespace, model_id, asdict(options)], sort_keys=True)
    return hashlib.sha256(payload.encode()).digest()


def cache_key(prefix: bytes, prompt: Prompt, draw: int) -> bytes:
    """A request's key: its `key_prefix`, its prompt, and which draw of the prompt's samples it
    is (the samples of the prompt drawn before it), as 32 bytes. Text and chat messages are
    told apart by a first byte."""
    if isinstance(prompt, str):
        asked = b"t" + prompt.encode()
    else:
        asked = b"m" + json.dumps([[m.role, m.content] for m in prompt]).encode()
    return hashlib.sha256(prefix + draw.to_bytes(8, "big") + asked).digest()


def cached_completions(
    store: GenerationStore,
    namespace: str,
    model_id: str,
    options: SamplingOptions,
    draw: int,
    prompts: Sequence[Prompt],
) -> int:
    """How many completions the cache holds for `prompts` asked with `options`, each after
    `draw` samples of it: what a job's estimate counts, under the keys the wrapper uses."""
    prefix = key_prefix(namespace, model_id, options)
    keys = {cache_key(prefix, prompt, draw): prompt for prompt in prompts}
    found = store.get_many(list(keys))
    return options.n * sum(1 for prompt in prompts if cache_key(prefix, prompt, draw) in found)


SAVE_SECONDS = 1.0
"""How long answers may wait in the wrapper before they are written to the cache."""
SAVE_GENERATIONS = 65_536
"""How many generations may wait."""


class CachedEngine:
    """`namespace` keeps caches apart: the service gives each workspace its own, so that what
    one workspace's jobs generated never shows (as answers or as cache hits) in another's.

    The wrapper counts the samples of each prompt it was asked for, so that a prompt's later
    sampling rounds have keys apart from its first: a request's key holds the samples of its
    prompt drawn by earlier calls (requests for the same prompt in one call share them, and
    their answers). A wrapper lives for one batch of work (a chunk): the same batch asked again,
    in the same calls, finds every answer in the cache.

    Each step of a batch asks the store once: a call that asks again for prompts an earlier call
    asked (under other options, or at another draw: a new step) looks up, with its own keys, the
    keys of every prompt this wrapper has seen under the call's options at the prompt's draw so
    far, and the calls after it find their answers, or that there are none, in what it read. A
    key read as missing stays missing for the wrapper: another worker that writes it meanwhile
    (a chunk run twice at once) costs a second generation, never a wrong answer.

    New answers are written to the store after the engine call that made them once
    `save_seconds` have passed since the oldest unwritten one, or `save_generations` wait; the
    owner writes the rest when the batch ends, however it ends: `save()`, or `take_unsaved()`
    to write them elsewhere (a worker's chunk writer, while the engine goes on). An engine call
    of a real model takes seconds, so each is written after it, as it comes; answers that come
    in thousands a second are written in a few large writes instead of one per call.
    """

    def __init__(
        self,
        engine: Engine,
        store: GenerationStore,
        namespace: str = "",
        *,
        save_seconds: float = SAVE_SECONDS,
        save_generations: int = SAVE_GENERATIONS,
    ) -> None:
        self.engine = engine
        self.store = store
        self.namespace = namespace
        self.model_id = engine.model_id
        self.save_seconds = save_seconds
        self.save_generations = save_generations
        self.new_generations = 0
        self.cached_generations = 0
        self._prefixes: dict[SamplingOptions, bytes] = {}
        self._drawn: dict[Prompt, int] = {}
        """Samples drawn so far, by prompt."""
        self._prompts: dict[Prompt, None] = {}
        """Every prompt asked so far, in order."""
        self._answers: dict[bytes, list[str]] = {}
        """Answers this wrapper knows: those the store gave, those the engine made."""
        self._looked_up: set[bytes] = set()
        """Keys asked of the store, found or not."""
        self._unsaved: dict[bytes, list[str]] = {}
        self._unsaved_generations = 0
        self._unsaved_since = 0.0

    def close(self) -> None:
        self.engine.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        keys = [self._key(r) for r in requests]
        asked = {k: r for k, r in zip(keys, requests, strict=True) if k not in self._looked_up}
        if asked:
            self._look_up(asked)
        answers = self._answers
        found = {k: answers[k] for k in set(keys) if k in answers}
        missing = {k: r for k, r in zip(keys, requests, strict=True) if k not in found}
        if missing:
            results = self.engine.generate(list(missing.values()))
            fresh = {k: res.texts for k, res in zip(missing, results, strict=True)}
            found.update(fresh)
            answers.update(fresh)
            generations = sum(len(t) for t in fresh.values())
            self.new_generations += generations
            if not self._unsaved:
                self._unsaved_since = time.monotonic()
            self._unsaved.update(fresh)
            self._unsaved_generations += generations
            if (
                self._unsaved_generations >= self.save_generations
                or time.monotonic() - self._unsaved_since >= self.save_seconds
            ):
                self.save()
        self.cached_generations += sum(
            r.options.n for k, r in zip(keys, requests, strict=True) if k not in missing
        )
        sampled = {r.prompt: r.options.n for r in requests if not r.options.greedy}
        for prompt, n in sampled.items():
            self._drawn[prompt] = self._drawn.get(prompt, 0) + n
        self._prompts.update(dict.fromkeys(r.prompt for r in requests))
        return [GenerationResult(found[k]) for k in keys]

    def _look_up(self, asked: dict[bytes, GenerationRequest]) -> None:
        """Read `asked` from the store, and with them, when they start a new step, the keys of
        the prompts seen so far under the same options, at their draws so far."""
        keys = list(asked)
        if any(r.prompt in self._prompts for r in asked.values()):
            ahead = set(asked)
            for options in {r.options for r in asked.values()}:
                for prompt in self._prompts:
                    key = self._key(GenerationRequest(prompt, options))
                    if key not in self._looked_up and key not in ahead:
                        ahead.add(key)
                        keys.append(key)
        self._answers.update(self.store.get_many(keys))
        self._looked_up.update(keys)

    def save(self) -> None:
        """Write the answers still waiting to the cache."""
        if unsaved := self.take_unsaved():
            self.store.put_many(self.model_id, unsaved)

    def take_unsaved(self) -> dict[bytes, list[str]]:
        """The answers still waiting, for the owner to write (`store.put_many`) later, off the
        engine's path; the wrapper forgets them."""
        unsaved = self._unsaved
        self._unsaved = {}
        self._unsaved_generations = 0
        return unsaved

    def _key(self, request: GenerationRequest) -> bytes:
        prefix = self._prefixes.get(request.options)
        if prefix is None:
            prefix = self._prefixes[request.options] = key_prefix(
                self.namespace, self.model_id, request.options
            )
        draw = 0 if request.options.greedy else self._drawn.get(request.prompt, 0)
        return cache_key(prefix, request.prompt, draw)
