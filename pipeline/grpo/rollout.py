"""One step's experience: G completions per prompt, rewards, advantages, padded tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.generation.base import Completion, GenerationBackend, Request, SamplingParams
from pipeline.rollouts import request_seed
from pipeline.scoring import TrainerState, score


@dataclass
class Experience:
    prompt_ids: list[list[int]]  # one per completion (prompt repeated G times)
    completions: list[Completion]
    texts: list[str]
    rewards: np.ndarray  # (B,) TRL's weighted nansum; NaN where every function gave None or failed
    per_function: dict[str, np.ndarray]
    failures: dict[str, int]
    reward_metrics: dict[str, float]  # the reward functions' log_metric values, averaged
    reward_extra: dict[str, list]  # their log_extra columns
    input_ids: Tensor  # (B, P + T): left-padded prompt, right-padded completion
    attention_mask: Tensor
    completion_mask: Tensor  # (B, T) float
    truncated: Tensor  # (B,) bool: finish_reason == "length"

    @property
    def completion_len(self) -> int:
        return self.completion_mask.size(1)


def pad_batch(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
              pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(p) for p in prompt_ids)
    length = max(1, max(len(c) for c in completion_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width + length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
        input_ids[i, width - len(p):width] = torch.tensor(p, dtype=torch.long)
        input_ids[i, width:width + len(c)] = torch.tensor(c, dtype=torch.long)
        attention[i, width - len(p):width + len(c)] = 1
    return input_ids, attention, attention[:, width:].float()


def collect(backend: GenerationBackend, tokenizer, rows: Sequence[Mapping[str, Any]],
            prompts: Sequence[tuple[str, list[int]]], group_size: int, params: SamplingParams,
            weights: Mapping[str, float], seed: int, step: int, max_steps: int = 0) -> Experience:
    """Sample ``group_size`` completions for each prompt and score them (rows expanded G times);
    ``step`` optimizer steps are done, as the reward functions' ``trainer_state.global_step`` says."""
    requests = [Request(ids, params.max_new_tokens, request_seed(seed, row["prompt_id"], step, g))
                for row, (_, ids) in zip(rows, prompts, strict=True) for g in range(group_size)]
    completions = backend.generate(requests, params)
    texts = tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
    completion_ids = [c.token_ids for c in completions]
    batch = score(weights, [row for row in rows for _ in range(group_size)],
                  [text for text, _ in prompts for _ in range(group_size)], texts, completion_ids,
                  TrainerState(step, max_steps))
    prompt_ids = [r.prompt_ids for r in requests]
    input_ids, attention, completion_mask = pad_batch(prompt_ids, completion_ids, tokenizer.pad_token_id)
    truncated = torch.tensor([c.finish_reason == "length" for c in completions])
    metrics = {name: float(np.mean(values)) for name, values in batch.metrics.items()}
    return Experience(prompt_ids, completions, texts, batch.total, batch.per_function, batch.failures, metrics,
                      batch.extra, input_ids, attention, completion_mask, truncated)
