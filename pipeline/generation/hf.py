"""transformers backend: batched, left-padded ``generate`` with a KV cache; runs on CPU.

Sampling is seeded per request: each row draws one uniform number per step from its own
generator and picks its token by inverse CDF of softmax(logits / T) (after top-p filtering); the
processor then leaves only that token for ``generate``'s argmax. So a completion depends on its
request's seed, not on which other requests share its batch: reruns, resumes and any split of
prompts across ranks reproduce it. (One number per row, not a vocabulary of Gumbel noise: the
draw costs ~1% of a decode step.)

Nothing else shapes the distribution: ``generate`` would fill every option we leave unset from the
model's own ``generation_config`` (Qwen2.5's sets ``repetition_penalty`` 1.05, others top-k or
min-p), so that config is hidden during the call and the sampled policy is softmax(logits / T).

Under FSDP the policy's parameters are shards outside a forward pass: the backend then samples from
its own full copy, refreshed from the gathered weights by ``sync_weights`` (as the vLLM engine is).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, LogitsProcessor, PreTrainedModel

from pipeline.generation.base import Completion, Request, SamplingParams
from pipeline.generation.weights import copy_weights, is_sharded, plain_copy, unwrap


def stop_token_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class PerRequestSampling(LogitsProcessor):
    """Temperature, top-p, then an inverse-CDF draw per row: greedy decoding returns the draw."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature if self.temperature != 1.0 else scores.float().clone()
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p
            scores.scatter_(-1, order, ordered.masked_fill(outside, float("-inf")))
        cdf = scores.softmax(-1).cumsum(-1)
        uniform = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(cdf.device)
        choice = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1)).clamp(max=scores.size(-1) - 1)
        return scores.scatter_(-1, choice, float("inf"))  # the draw is now the argmax


@contextmanager
def model_generation_config_hidden(model: torch.nn.Module) -> Iterator[None]:
    """``generate`` fills the options a config leaves unset from ``model.generation_config``: hide it."""
    from peft import PeftModel

    target = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        target.generation_config = saved


def explicit_config(max_new_tokens: int, pad_id: int, stop_ids: set[int]) -> GenerationConfig:
    """Greedy over the processor's draw (so no temperature/top-k/top-p/min-p warper runs), and every
    logits processor ``generate`` would add set to its neutral value."""
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=pad_id,
                            eos_token_id=sorted(stop_ids))


class HFBackend:
    """Requests are sorted by prompt length and cut into micro-batches to keep padding small.

    ``model``: a plain model samples itself (the policy under DDP: nothing to copy); a sharded one
    (FSDP) gets a full copy on ``device``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 32,
                 device: torch.device | str | None = None):
        self.device = device
        self.model: torch.nn.Module | None = None
        self.sync_weights(model)
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(self.model, tokenizer)
        self.batch_size = batch_size

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights (collective under FSDP: every rank calls it)."""
        if not is_sharded(model):
            self.model = unwrap(model)
        elif self.model is None:
            self.model = plain_copy(model, self.device)
        else:
            copy_weights(self.model, model)

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
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.prompt_ids):] = torch.tensor(request.prompt_ids)
            attention[row, width - len(request.prompt_ids):] = 1
        config = explicit_config(max(r.max_new_tokens for r in requests), self.pad_id, self.stop_ids)
        processors = ([PerRequestSampling([r.seed for r in requests], params.temperature, params.top_p)]
                      if params.temperature > 0 else [])
        was_training = self.model.training
        self.model.eval()
        with model_generation_config_hidden(self.model):
            out = self.model.generate(input_ids=input_ids.to(self.model.device),
                                      attention_mask=attention.to(self.model.device), generation_config=config,
                                      logits_processor=processors)
        self.model.train(was_training)
        return [self._trim(row.tolist(), r.max_new_tokens) for row, r in zip(out[:, width:], requests, strict=True)]

    def _trim(self, tokens: list[int], limit: int) -> Completion:
        """Up to and including the first stop token: the decision to stop is a sampled token too."""
        for i, token in enumerate(tokens[:limit]):
            if token in self.stop_ids:
                return Completion(tokens[:i + 1], "stop")
        return Completion(tokens[:limit], "length")
