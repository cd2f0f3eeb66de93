"""The paired sampling scheme (docs/design.md sections 4-5), group statistics, and the chunked writer.

For each pair the split point t is drawn *before* looking at the sister it splits: uniform on
0..t_max, where t_max is a length quantile of the sister-A completions of the *other* prompts in
the same chunk (or a fixed maximum). Sister A is sampled in full; sister B continues from
prompt + A[:t], so its prefix is prefill, not decode (with a fixed maximum, a backend that can
decodes both sisters side by side in one pass instead). A pair whose A ended at or before t is
degenerate (B == A): kept and flagged, never regenerated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.generation.base import Completion, GenerationBackend, Request, SamplingParams
from pipeline.scoring import RewardBatch, score


@dataclass(frozen=True)
class PairingConfig:
    group_size: int = 8
    groups_per_prompt: int = 1
    split_quantile: float = 0.9
    max_split_tokens: int | None = None  # fixed t_max instead of the quantile rule


@dataclass
class Prompt:
    index: int  # position in the run's prompt list: fixes group ids
    row: dict[str, Any]  # the task row: prompt_id, level, answer, task columns
    text: str
    token_ids: list[int]


def request_seed(seed: int, prompt_id: int, group_id: int, completion_id: int) -> int:
    """A distinct, reproducible seed per request (never one seed for every request)."""
    return int(np.random.SeedSequence([seed, prompt_id, group_id, completion_id]).generate_state(1)[0])


def split_limits(lengths_by_prompt: Sequence[Sequence[int]], max_new_tokens: int,
                 quantile: float) -> list[list[int]]:
    """t_max for each pair: a quantile of its prompt's other sister-A lengths (the other prompts' when the
    prompt has one pair), never of its own A, so t is independent of A yet fits the prompt's lengths."""
    def limit(others: Sequence[int]) -> int:
        return int(min(math.ceil(np.quantile(others, quantile)), max_new_tokens)) if others else max_new_tokens

    limits = []
    for i, lengths in enumerate(lengths_by_prompt):
        if len(lengths) == 1:
            limits.append([limit([n for j, other in enumerate(lengths_by_prompt) if j != i for n in other])])
        else:
            limits.append([limit([*lengths[:k], *lengths[k + 1:]]) for k in range(len(lengths))])
    return limits


def sample_pairs(backend: GenerationBackend, prompts: Sequence[Prompt], params: SamplingParams,
                 cfg: PairingConfig, seed: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """All groups of ``prompts`` as one record per completion (rewards not yet attached).

    With a fixed t_max (``cfg.max_split_tokens``) t does not wait for any sister A, so a backend that
    decodes sisters side by side (``generate_pairs``) samples both in one pass; otherwise sister B is
    a second request for prompt + A[:t]. Either way B is prompt + A[:t] continued with B's seed.
    """
    pairs = cfg.group_size // 2
    slots = [(p, p.index * cfg.groups_per_prompt + g, k)
             for p in prompts for g in range(cfg.groups_per_prompt) for k in range(pairs)]
    requests_a = [Request(p.token_ids, params.max_new_tokens, request_seed(seed, p.row["prompt_id"], gid, 2 * k))
                  for p, gid, k in slots]
    seeds_b = [request_seed(seed, p.row["prompt_id"], gid, 2 * k + 1) for p, gid, k in slots]
    per_prompt = len(slots) // len(prompts)

    def draw_splits(limits: Sequence[int]) -> list[int]:  # one t_max per slot
        return [int(rng.integers(0, limit + 1)) for limit in limits]

    fixed = None if cfg.max_split_tokens is None else [min(cfg.max_split_tokens, params.max_new_tokens)] * len(slots)
    if fixed is not None and hasattr(backend, "generate_pairs"):
        splits = draw_splits(fixed)
        sisters_a, sisters_b = backend.generate_pairs(
            requests_a, [Request(r.prompt_ids, r.max_new_tokens, s) for r, s in zip(requests_a, seeds_b, strict=True)],
            splits, params)
    else:
        sisters_a = backend.generate(requests_a, params)
        lengths = [[len(c.token_ids) for c in sisters_a[i * per_prompt:(i + 1) * per_prompt]]
                   for i in range(len(prompts))]
        limits = fixed if fixed is not None else [
            t for per_pair in split_limits(lengths, params.max_new_tokens, cfg.split_quantile) for t in per_pair]
        splits = draw_splits(limits)
        live = [i for i, (a, t) in enumerate(zip(sisters_a, splits, strict=True)) if t < len(a.token_ids)]
        continuations = backend.generate(
            [Request(slots[i][0].token_ids + sisters_a[i].token_ids[:splits[i]], params.max_new_tokens - splits[i],
                     seeds_b[i]) for i in live], params)
        sisters_b = list(sisters_a)
        for i, cont in zip(live, continuations, strict=True):
            sisters_b[i] = joined(sisters_a[i], splits[i], cont)

    records = []
    for i, (prompt, group_id, k) in enumerate(slots):
        degenerate = splits[i] >= len(sisters_a[i].token_ids)
        for sister, completion in enumerate((sisters_a[i], sisters_a[i] if degenerate else sisters_b[i])):
            records.append({
                "prompt": prompt, "group_id": group_id, "completion_id": 2 * k + sister, "pair_id": k,
                "sister": sister, "split_token_idx": splits[i], "degenerate": degenerate,
                "completion": completion,
            })
    return records


def joined(sister_a: Completion, split: int, continuation: Completion) -> Completion:
    """Sister B: A's first ``split`` tokens, then its continuation; the engine's sampled-token log-probs
    (the IS correction's) are A's for the shared prefix, kept only when both sides have them."""
    logprobs = (None if sister_a.logprobs is None or continuation.logprobs is None
                else sister_a.logprobs[:split] + continuation.logprobs)
    return Completion(sister_a.token_ids[:split] + continuation.token_ids, continuation.finish_reason, logprobs)


def group_statistics(frame: pd.DataFrame, column: str) -> tuple[pd.Series, pd.Series]:
    """Per-row mean and unbiased variance (ddof=1) of ``column`` over the row's group, NaN rows
    left out (as TRL's nanmean/nanstd); the variance is NaN with fewer than two values left."""
    grouped = frame.groupby("group_id")[column]
    return grouped.transform("mean"), grouped.transform(lambda s: s.var(ddof=1))


def to_frame(records: Sequence[dict[str, Any]], tokenizer,
             weights: Mapping[str, float]) -> tuple[pd.DataFrame, RewardBatch]:
    """Decode, score with the weighted reward functions, and add group statistics. ``reward`` is
    TRL's total: the weighted nansum over functions, NaN only where every function gave none."""
    completion_ids = [r["completion"].token_ids for r in records]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    rows = [r["prompt"].row for r in records]
    rewards = score(weights, rows, [r["prompt"].text for r in records], texts, completion_ids)
    frame = pd.DataFrame({
        "prompt_id": [row["prompt_id"] for row in rows],
        "prompt_text": [r["prompt"].text for r in records],
        "prompt_token_ids": [r["prompt"].token_ids for r in records],
        "task_name": [str(row["task_name"]) for row in rows],
        "level": [row["level"] for row in rows],
        "answer": ["" if row.get("answer") is None else str(row["answer"]) for row in rows],
        "group_id": [r["group_id"] for r in records],
        "completion_id": [r["completion_id"] for r in records],
        "pair_id": [r["pair_id"] for r in records],
        "sister": [r["sister"] for r in records],
        "split_token_idx": [r["split_token_idx"] for r in records],
        "degenerate": [r["degenerate"] for r in records],
        "completion_token_ids": [r["completion"].token_ids for r in records],
        "completion_text": texts,
        "num_completion_tokens": [len(r["completion"].token_ids) for r in records],
        "finish_reason": [r["completion"].finish_reason for r in records],
        "reward": rewards.total,
    })
    frame["reward_group_mean"], frame["reward_group_var"] = group_statistics(frame, "reward")
    for name, values in rewards.per_function.items():
        frame[f"reward_{name}"] = values
        frame[f"reward_{name}_group_mean"], frame[f"reward_{name}_group_var"] = group_statistics(
            frame, f"reward_{name}")
    return frame, rewards


def generated_token_count(frame: pd.DataFrame) -> int:
    """Decoded tokens: all of sister A, B's tokens after the split (its prefix was prefill)."""
    decoded = frame["num_completion_tokens"] - frame["sister"] * frame["split_token_idx"]
    return int(decoded.where(~(frame["degenerate"] & (frame["sister"] == 1)), 0).sum())


def to_table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
