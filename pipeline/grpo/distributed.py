"""Rank plumbing for stage 3: the share of a list a rank owns, and collecting what the ranks computed.

Each rank owns whole groups (prompts r, r + world, ...). What is logged or written must not depend
on the number of ranks: samples come back in the sampler's prompt order, token-level metrics are
computed over every rank's tokens, scalar metrics are reduced with the operation their name says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.grpo.softmask import weight_stats

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items rank, rank + world_size, ...: every item on exactly one rank."""
    return list(items[rank::world_size])


def gather_objects(fabric, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; all ranks call it."""
    if fabric.world_size == 1:
        return [obj]
    out: list[Any] = [None] * fabric.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def interleave_groups(per_rank: Sequence[Sequence[T]], group_size: int) -> list[T]:
    """Rank r's k-th group of rows is prompt r + world * k: put the groups back in prompt order."""
    groups = [[list(rows[i:i + group_size]) for i in range(0, len(rows), group_size)] for rows in per_rank]
    ordered: list[T] = []
    for k in range(max((len(g) for g in groups), default=0)):
        for rank_groups in groups:
            if k < len(rank_groups):
                ordered.extend(rank_groups[k])
    return ordered


def gather_token_rows(fabric, *tensors: Tensor) -> list[Tensor]:
    """(B, T) tensors of every rank, stacked to (sum of B, widest T), right-padded with zeros."""
    parts = gather_objects(fabric, [t.detach().float().cpu() for t in tensors])
    width = max(part[0].size(1) for part in parts)
    return [torch.cat([F.pad(part[i], (0, width - part[i].size(1))) for part in parts]) for i in range(len(tensors))]


def global_token_metrics(fabric, mask: Tensor, entropies: Tensor | None, weights: Tensor) -> dict[str, float]:
    """``entropy`` and ``weights/*`` over every rank's completion tokens, as one process would log them."""
    if entropies is None:
        entropies = torch.full_like(mask, float("nan"))
    mask, entropies, weights = gather_token_rows(fabric, mask, entropies, weights)
    entropy = float((entropies * mask).sum() / mask.sum().clamp(min=1))
    return {"entropy": entropy, **{f"weights/{k}": v for k, v in weight_stats(weights, mask).items()}}


def reduce_metrics(fabric, metrics: dict[str, Tensor]) -> dict[str, float]:
    """Per-rank scalars to global ones: ``*/max`` by max, ``*/min`` by min, anything else by mean."""
    out = {}
    for name, value in metrics.items():
        value = torch.as_tensor(value, dtype=torch.float32, device=fabric.device)
        if name.endswith("/max"):
            out[name] = float(fabric.all_reduce(value, reduce_op="max"))
        elif name.endswith("/min"):
            out[name] = -float(fabric.all_reduce(-value, reduce_op="max"))
        else:
            out[name] = float(fabric.all_reduce(value, reduce_op="mean"))
    return out
