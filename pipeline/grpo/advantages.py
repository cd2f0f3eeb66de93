"""Group-relative advantages, exactly as TRL 1.16's GRPOTrainer computes them.

Rewards arrive flat, one per completion, the G completions of a prompt next to each other
(TRL's layout: ``rewards.view(-1, G)`` is one row per prompt). Under DDP the caller gathers
the rewards of every rank first, so that each group is whole, and slices its own part after.
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
    """Unbiased std of each group (one per row); 0 for groups of one, as TRL does."""
    if grouped.size(1) == 1:
        return torch.zeros(grouped.size(0), dtype=grouped.dtype, device=grouped.device)
    return grouped.std(dim=1)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4).

    ``scale_rewards``: "group" divides by the group's std (GRPO), "batch" by the std of the whole
    batch (more robust when a group's std is tiny), "none" does not divide (Dr. GRPO).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    grouped = _grouped(rewards, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        std = _group_std(grouped).repeat_interleave(group_size)
    else:  # the whole batch as one group
        std = _group_std(rewards.view(1, -1))
    return advantages / (std + STD_EPS)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal: they get advantage 0 and teach nothing.

    Equals TRL's ``frac_reward_zero_std`` metric for scale_rewards "group" and "none" (TRL's
    "batch" mode logs whether the whole batch's std is zero instead, which says less).
    """
    std = _group_std(_grouped(rewards, group_size))
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()
