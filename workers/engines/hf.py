"""The transformers engine: CPU or GPU, batched with left padding, n samples per prompt."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from app.audit.domain import Prompt
from workers.engines.base import (
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    cut_at_stop,
    model_id_of,
    render_chat,
    starts_with_bos,
)


class HFEngine:
    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        device: str | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.model_id = model_id_of(model, revision)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.float32 if self.device == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=dtype)
        self.model.to(self.device).eval()
        torch.manual_seed(seed)

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        # A batch shares its options, and is all text or all chat: a chat template brings its
        # own special tokens.
        batches: dict[tuple[SamplingOptions, bool], list[int]] = {}
        for i, request in enumerate(requests):
            chat = not isinstance(request.prompt, str)
            batches.setdefault((request.options, chat), []).append(i)
        for (options, _), indices in batches.items():
            per_batch = max(1, self.batch_size // options.n)
            for start in range(0, len(indices), per_batch):
                batch = indices[start : start + per_batch]
                texts = self._generate([requests[i].prompt for i in batch], options)
                for j, i in enumerate(batch):
                    results[i] = GenerationResult(texts[j * options.n : (j + 1) * options.n])
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate(self, prompts: list[Prompt], options: SamplingOptions) -> list[str]:
        """Completions of prompts that are all text or all chat."""
        rendered = [
            p if isinstance(p, str) else render_chat(self.tokenizer, p, self.model_id)
            for p in prompts
        ]
        chat = not isinstance(prompts[0], str)
        add_special_tokens = not (
            chat and all(starts_with_bos(self.tokenizer, text) for text in rendered)
        )
        inputs = self.tokenizer(
            rendered, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        ).to(self.device)
        config = GenerationConfig(
            do_sample=not options.greedy,
            num_return_sequences=options.n,
            max_new_tokens=options.max_tokens,
            stop_strings=list(options.stop) or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            **(
                {}
                if options.greedy
                else {
                    "temperature": options.temperature,
                    "top_k": max(options.top_k, 0),
                    "top_p": options.top_p,
                }
            ),
        )
        output = self.model.generate(**inputs, generation_config=config, tokenizer=self.tokenizer)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stop(t, options.stop) for t in texts]
