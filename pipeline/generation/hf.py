"""transformers backend: batched, left-padded ``generate`` with a KV cache; runs on CPU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel

from pipeline.generation.base import Completion, Request, SamplingParams


def stop_token_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class HFBackend:
    """Requests are sorted by prompt length and cut into micro-batches to keep padding small.

    transformers has no per-request seed, so each micro-batch seeds the global generator with
    the first request's seed: a rerun reproduces, different batches differ.
    """

    def __init__(self, model: PreTrainedModel, tokenizer, batch_size: int = 32):
        self.model = model
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.batch_size = batch_size

    def sync_weights(self, model: PreTrainedModel) -> None:
        self.model = model  # the policy itself samples: nothing to copy

    @torch.no_grad()
    def generate(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
        results: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = [order[i] for i in range(start, min(start + self.batch_size, len(order)))]
            for index, completion in zip(batch, self._generate_batch([requests[i] for i in batch], params),
                                         strict=True):
                results[index] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, requests: list[Request], params: SamplingParams) -> list[Completion]:
        width = max(len(r.prompt_ids) for r in requests)
        budget = max(r.max_new_tokens for r in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention[row, width - len(request.prompt_ids):] = 1
        sample = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=budget, do_sample=sample, temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None, top_k=None, pad_token_id=self.pad_id,
            eos_token_id=sorted(self.stop_ids),
        )
        torch.manual_seed(requests[0].seed)
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(input_ids=input_ids.to(self.model.device),
                                  attention_mask=attention.to(self.model.device), generation_config=config)
        self.model.train(was_training)
        return [self._trim(row.tolist(), r.max_new_tokens) for row, r in zip(out[:, width:], requests, strict=True)]

    def _trim(self, tokens: list[int], limit: int) -> Completion:
        for i, token in enumerate(tokens[:limit]):
            if token in self.stop_ids:
                return Completion(tokens[:i], "stop")
        return Completion(tokens[:limit], "length")
