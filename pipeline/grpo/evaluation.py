"""Accuracy on held-out prompts of every level, the held-out hardest level included: greedy, or sampled at
``--eval_temperature`` with one fixed seed per prompt (every arm of a study draws the same).

With several ranks each generates and scores its own share of the prompts (``rank``, ``world_size``)
and ``gather`` collects every rank's per-prompt results before they are summed up per level, so the
table is the one a single process would write, in 1 / world_size of the time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.generation.base import GenerationBackend, Request, SamplingParams
from pipeline.scoring import score


def score_prompts(backend: GenerationBackend, tokenizer, rows: Sequence[dict[str, Any]],
                  prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int,
                  temperature: float = 0.0) -> list[tuple[int, float, int]]:
    """(level, correct, completion length) of each prompt's completion (greedy at temperature 0)."""
    if not rows:
        return []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    completions = backend.generate([Request(ids, max_new_tokens, int(row["prompt_id"]))
                                    for row, (_, ids) in zip(rows, prompts, strict=True)], params)
    completion_ids = [c.token_ids for c in completions]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    correct = score({"correct": 1.0}, rows, [t for t, _ in prompts], texts, completion_ids).per_function["correct"]
    return [(int(row["level"]), float(c), len(ids)) for row, c, ids in zip(rows, correct, completion_ids, strict=True)]


def evaluate(backend: GenerationBackend, tokenizer, rows: Sequence[dict[str, Any]],
             prompts: Sequence[tuple[str, list[int]]], max_new_tokens: int, rank: int = 0, world_size: int = 1,
             gather: Callable[[Any], list[Any]] | None = None, temperature: float = 0.0) -> list[dict[str, Any]]:
    """One row per level: accuracy (the ``correct`` reward) and mean completion length."""
    mine = range(rank, len(rows), world_size)
    results = score_prompts(backend, tokenizer, [rows[i] for i in mine], [prompts[i] for i in mine], max_new_tokens,
                            temperature)
    if gather is not None:
        results = [result for part in gather(results) for result in part]
    levels = np.array([level for level, _, _ in results])
    correct = np.array([c for _, c, _ in results])
    lengths = np.array([length for _, _, length in results])
    return [{"level": int(level), "accuracy": float(np.nanmean(correct[levels == level])),
             "num_prompts": int((levels == level).sum()), "mean_length": float(lengths[levels == level].mean())}
            for level in sorted(set(levels.tolist()))]
