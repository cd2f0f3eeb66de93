"""Stage 3: GRPO with a soft mask. The pure-tensor core: advantages, policy losses, soft-mask weights."""

from pipeline.grpo.advantages import group_advantages, zero_std_fraction
from pipeline.grpo.losses import (
    POLICY_LOSSES,
    compute_policy_loss,
    mask_truncated_completions,
    register_policy_loss,
)
from pipeline.grpo.softmask import SOFTMASKS, finalize, register_softmask, soft_mask_weights, weight_stats

__all__ = [
    "POLICY_LOSSES",
    "SOFTMASKS",
    "compute_policy_loss",
    "finalize",
    "group_advantages",
    "mask_truncated_completions",
    "register_policy_loss",
    "register_softmask",
    "soft_mask_weights",
    "weight_stats",
    "zero_std_fraction",
]
