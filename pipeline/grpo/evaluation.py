"""Greedy accuracy on held-out prompts of every level, the held-out hardest level included."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.generation.base import GenerationBackend, Request, SamplingParams
from pipeline.scoring import score


def evaluate(backend: GenerationBackend, tokenizer, rows: Sequence[dict[str, Any]],
             prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int) -> list[dict[str, Any]]:
    """One row per level: accuracy (the ``correct`` reward) and mean completion length."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    completions = backend.generate([Request(ids, max_new_tokens, 0) for _, ids in prompts], params)
    completion_ids = [c.token_ids for c in completions]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    correct = score({"correct": 1.0}, rows, [t for t, _ in prompts], texts, completion_ids).per_function["correct"]
    levels = np.array([row["level"] for row in rows])
    lengths = np.array([len(c.token_ids) for c in completions])
    return [{"level": int(level), "accuracy": float(np.nanmean(correct[levels == level])),
             "num_prompts": int((levels == level).sum()), "mean_length": float(lengths[levels == level].mean())}
            for level in sorted(set(levels.tolist()))]
