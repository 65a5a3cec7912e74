"""The vLLM engine: `vllm.LLM` in this process, one batched call per step, prefix caching on.

The only module that imports vllm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.engines.base import (
    GenerationRequest,
    GenerationResult,
    model_id_of,
    render_chat,
    starts_with_bos,
)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


CPU_KV_CACHE_BYTES = 1 << 30
"""The KV cache of an engine on CPU, unless vLLM's own `VLLM_CPU_KVCACHE_SPACE` (GiB) is set
on the worker: for a small student, room for hundreds of thousands of tokens."""


class VLLMEngine:
    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        seed: int = 0,
        **llm_options: Any,
    ) -> None:
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        options: dict[str, Any] = {
            "dtype": "auto" if on_gpu else "float32",
            **(
                {"gpu_memory_utilization": 0.9}
                if on_gpu
                # On CPU a share would be taken of the memory of the NUMA node vLLM's core is
                # on, which may be a fraction of the machine's, less what the process holds:
                # too little for any KV cache once two engines share a small node.
                else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
            ),
            "enable_prefix_caching": True,
            # Ignore the model's generation_config.json: every sampling field comes from the job.
            "generation_config": "vllm",
        }
        options.update(llm_options)
        self.model_id = model_id_of(model, revision)
        # The seed is the engine's: a per-request seed breaks vLLM's CPU sampler.
        self.llm = LLM(model=model, revision=revision, seed=seed, **options)

    def close(self) -> None:
        """Stop the engine's processes; left to interpreter exit they can hang it."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=r.options.n,
                temperature=r.options.temperature,
                top_k=r.options.top_k,
                top_p=r.options.top_p,
                max_tokens=r.options.max_tokens,
                stop=list(r.options.stop),
                min_p=0.0,
                repetition_penalty=1.0,
                presence_penalty=0.0,
                frequency_penalty=0.0,
            )
            for r in requests
        ]
        outputs = self.llm.generate([self._prompt(r) for r in requests], params, use_tqdm=False)
        return [GenerationResult([c.text for c in out.outputs]) for out in outputs]

    def _prompt(self, request: GenerationRequest) -> Any:
        """The prompt text, or for chat messages their rendered template as token ids: tokenized
        here so a template that already starts with BOS does not get a second."""
        if isinstance(request.prompt, str):
            return request.prompt
        from vllm.inputs import TokensPrompt

        tokenizer = self.llm.get_tokenizer()
        text = render_chat(tokenizer, request.prompt, self.model_id)
        ids = tokenizer.encode(text, add_special_tokens=not starts_with_bos(tokenizer, text))
        return TokensPrompt(prompt_token_ids=ids)
