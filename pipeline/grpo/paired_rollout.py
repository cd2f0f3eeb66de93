"""A step's groups drawn as sister pairs with stage 1's rule, so the online importance head learns from them.

Each group's G completions are G/2 pairs sampled by ``pipeline.rollouts.sample_pairs``: sister A in
full, a split t drawn independently of A, sister B continuing from prompt + A[:t] (its prefix
prefilled, not decoded). Each sister is marginally a sample of the policy, so the GRPO loss treats
them as any G completions; what the pairing does to the group statistics is in
docs/online_importance.md. Rows 2j and 2j + 1 of the step are pair j, each prompt's G rows next to
each other (the layout ``collect`` gives).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.generation.base import GenerationBackend, SamplingParams
from pipeline.grpo.rollout import Experience, experience
from pipeline.rollouts import PairingConfig, Prompt, sample_pairs

SPLIT_STREAM = 0x5A17  # the split points' random stream, apart from every sampling seed


@dataclass
class Pairing:
    """Per completion row: the split t its pair shares and whether the pair is degenerate (A ended by t)."""

    split: Tensor  # (B,) long
    degenerate: Tensor  # (B,) bool

    def pair_rows(self) -> Tensor:
        """Row of sister A of every pair (sister B is the next row)."""
        return torch.arange(0, len(self.split), 2)


def collect_pairs(backend: GenerationBackend, tokenizer, rows: Sequence[Mapping[str, Any]],
                  prompts: Sequence[tuple[str, list[int]]], group_size: int, params: SamplingParams,
                  weights: Mapping[str, float], seed: int, step: int, max_steps: int,
                  max_split: int) -> tuple[Experience, Pairing]:
    """``collect``'s experience, sampled as pairs; sister A of pair k gets ``collect``'s seed of completion 2k.

    t is uniform on 0..``max_split``, a limit fixed before this step's sisters exist (the online head
    derives it from earlier steps' lengths), so t is independent of A and the transformers backend
    decodes both sisters in one pass: the step costs what ``collect`` costs. The group id of stage 1's
    seeds is the step, so every step samples afresh, and the split points come from their own
    generator seeded by (seed, step): a resumed run draws the same ones.
    """
    if group_size % 2:
        raise ValueError(f"paired groups need an even group_size, got {group_size}")
    items = [Prompt(index=step, row=dict(row), text=text, token_ids=list(ids))
             for row, (text, ids) in zip(rows, prompts, strict=True)]
    rng = np.random.default_rng([seed, step, SPLIT_STREAM])
    cfg = PairingConfig(group_size=group_size, max_split_tokens=max_split)
    records = sample_pairs(backend, items, params, cfg, seed, rng)
    exp = experience(tokenizer, rows, prompts, group_size, [r["completion"] for r in records], weights, step,
                     max_steps)
    pairing = Pairing(torch.tensor([r["split_token_idx"] for r in records], dtype=torch.long),
                      torch.tensor([r["degenerate"] for r in records], dtype=torch.bool))
    return exp, pairing
