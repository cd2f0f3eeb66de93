"""Group-relative advantages, exactly as TRL 1.16's GRPOTrainer computes them.

Rewards arrive flat, one per completion, the G completions of a prompt next to each other
(TRL's layout: ``rewards.view(-1, G)`` is one row per prompt). Under DDP the caller gathers
the rewards of every rank first, so that each group is whole, and slices its own part after.

A NaN reward (every reward function gave None or failed) is left out of its group's mean and std
and its advantage is 0; a group with fewer than two rewards left has no std, so all of its
advantages are 0 (TRL's ``nanstd`` and ``nan_to_num``).
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's constant: keeps zero-variance groups at advantage 0 instead of 0/0


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be flat with a multiple of group_size={group_size} entries, got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)


def _group_std(grouped: Tensor) -> Tensor:
    """Unbiased std of each group (one per row) over its non-NaN rewards, NaN with fewer than two of
    them; 0 for groups of one, as TRL does."""
    if grouped.size(1) == 1:
        return torch.zeros(grouped.size(0), dtype=grouped.dtype, device=grouped.device)
    count = (~grouped.isnan()).sum(dim=1)
    variance = torch.nanmean((grouped - torch.nanmean(grouped, dim=1, keepdim=True)) ** 2, dim=1)
    bessel = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.nan).to(grouped.dtype)
    return (variance * bessel).sqrt()


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4), 0 where that is NaN.

    ``scale_rewards``: "group" divides by the group's std (GRPO), "batch" by the std of the whole
    batch (more robust when a group's std is tiny), "none" does not divide (Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, group_size)
    advantages = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).flatten()
    if scale_rewards == "group":
        advantages = advantages / (_group_std(grouped).repeat_interleave(group_size) + STD_EPS)
    elif scale_rewards == "batch":  # the whole batch as one group
        advantages = advantages / (_group_std(rewards.view(1, -1)) + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: they get advantage 0 and teach nothing.

    Equals TRL's ``frac_reward_zero_std`` metric for scale_rewards "group" and "none" (TRL's
    "batch" mode logs whether the whole batch's std is zero instead, which says less).
    """
    std = _group_std(_grouped(rewards, group_size))
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()
