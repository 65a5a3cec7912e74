"""The OpenAI-compatible engine: a completions server (`vllm serve`, SGLang, ...) over HTTP, its
chat endpoint for chat prompts; one request per prompt, many in flight; the server batches them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from workers.engines.base import (
    EngineRefused,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    as_dicts,
    cut_at_stop,
    model_id_of,
)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class CompletionServerError(EngineRefused):
    """The server refused a request, or kept failing after the last retry."""


class OpenAIEngine:
    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str | None = None,
        revision: str | None = None,
        max_in_flight: int = 64,
        timeout: float = 600.0,
        attempts: int = 5,
        backoff_seconds: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`model` is the name the server serves the weights under; `revision` only names them
        in `model_id` (the server loaded its own). `timeout` is per request, queueing included."""
        # The server is not part of the id: the same weights behind another server share the
        # generation cache.
        self.model_id = model_id_of(model, revision)
        self.model = model
        self.url = base_url.rstrip("/") + "/completions"
        self.chat_url = base_url.rstrip("/") + "/chat/completions"
        self.max_in_flight = max_in_flight
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        # One loop for the engine's life, so the client's connections are kept between calls.
        self._loop = asyncio.new_event_loop()
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(
                max_connections=max_in_flight, max_keepalive_connections=max_in_flight
            ),
            transport=transport,
        )

    def close(self) -> None:
        if not self._loop.is_closed():
            self._loop.run_until_complete(self._client.aclose())
            self._loop.close()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self._loop.run_until_complete(self._generate(requests))

    async def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        in_flight = asyncio.Semaphore(self.max_in_flight)

        async def one(request: GenerationRequest) -> GenerationResult:
            async with in_flight:
                return await self._complete(request)

        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # Left pending, the others would run on at the next call.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _complete(self, request: GenerationRequest) -> GenerationResult:
        options = request.options
        # Every sampling field explicitly: the server's defaults (and the model's
        # generation_config.json, which `vllm serve` applies by default) must not leak in. No
        # seed per request: it breaks vLLM's CPU sampler, and the server has its own.
        body: dict[str, Any] = {
            "model": self.model,
            "n": options.n,
            "temperature": options.temperature,
            "top_k": options.top_k,
            "top_p": options.top_p,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "max_tokens": options.max_tokens,
            "stop": list(options.stop),
            "stream": False,
        }
        prompt = request.prompt
        if isinstance(prompt, str):
            url = self.url
            body["prompt"] = prompt
        else:  # chat messages: the server renders them in the model's chat template
            url = self.chat_url
            body["messages"] = as_dicts(prompt)
        data = await self._post(url, body)
        choices = sorted(data.get("choices") or [], key=lambda c: int(c["index"]))
        if len(choices) != options.n:
            raise CompletionServerError(
                f"POST {url}: {len(choices)} choices for n={options.n}: {str(data)[:500]}"
            )
        texts = [c["text"] if isinstance(prompt, str) else c["message"]["content"] for c in choices]
        return GenerationResult([cut_at_stop(t, options.stop) for t in texts])

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """The response's JSON; connection errors, 429 and 5xx are retried with doubling waits."""
        for attempt in range(1, self.attempts + 1):
            try:
                response = await self._client.post(url, json=body)
            except httpx.TransportError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    data: dict[str, Any] = response.json()
                    return data
                failure = f"{response.status_code} {response.text[:1000]}"
                if response.status_code not in RETRY_STATUSES:
                    raise CompletionServerError(f"POST {url}: {failure}")
            if attempt < self.attempts:
                await asyncio.sleep(min(self.backoff_seconds * 2 ** (attempt - 1), 30.0))
        raise EngineUnavailable(f"POST {url}: {failure} (after {self.attempts} attempts)")
