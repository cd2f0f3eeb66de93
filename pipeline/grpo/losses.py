"""GRPO policy losses with TRL 1.16 GRPOTrainer semantics, as a registry of small pure functions.

A TRL ``loss_type`` is two choices: a per-token *objective* (PPO's clipped surrogate, CISPO's
clipped-weight REINFORCE, ...) and a *normaliser* that turns the masked sum of per-token losses
into a scalar (per-sequence mean, token mean, a constant, a global token count). verl's
``core_algos.py`` registers policy losses by name; here a name maps to such a pair, so a new
variant is one decorated function (TRL's ``sapo`` and ``vespo`` slot in the same way).

Soft mask: the policy term of each token is multiplied by ``token_weights`` before the
normaliser, which still counts mask tokens. The KL term is not weighted, as TRL leaves it out of
its entropy mask: the weights redistribute credit, not the leash to the reference model.

Gradient accumulation and DDP stay with the caller: the grpo/bnpo/dr_grpo/luspo losses are
those of the batch given (TRL divides them by the accumulation steps afterwards), and
dapo/cispo divide by ``num_items_in_batch`` (TRL: the generation batch's global loss-token count
/ num_processes * accumulation_steps / steps_per_generation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# (per-token loss, completion_mask, max_completion_length, num_items_in_batch) -> scalar loss
Normalizer = Callable[[Tensor, Tensor, int | None, Tensor | float | None], Tensor]
# (ratio, advantages (B, 1), logps, epsilon_low, epsilon_high) -> (per-token loss, {metric: indicator tensor})
Objective = Callable[[Tensor, Tensor, Tensor, float, float], tuple[Tensor, dict[str, Tensor]]]


def sequence_mean(
    loss: Tensor, mask: Tensor, max_len: int | None, num_items: Tensor | float | None
) -> Tensor:
    """grpo: mean over each sequence's tokens, then over sequences (favours short correct answers)."""
    return ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def token_mean(loss: Tensor, mask: Tensor, max_len: int | None, num_items: Tensor | float | None) -> Tensor:
    """bnpo: one mean over all loss tokens of the local batch."""
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def constant(loss: Tensor, mask: Tensor, max_len: int | None, num_items: Tensor | float | None) -> Tensor:
    """dr_grpo: divide by B * max_completion_length, a constant, so no length bias."""
    if max_len is None:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    return (loss * mask).sum() / (loss.size(0) * max_len)


def global_tokens(
    loss: Tensor, mask: Tensor, max_len: int | None, num_items: Tensor | float | None
) -> Tensor:
    """dapo: divide by the loss-token count of the whole step (all ranks, all micro-batches).

    ``num_items=None`` means this batch is the whole step, i.e. the local count.
    """
    normalizer = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=loss.dtype)
    return (loss * mask).sum() / normalizer.clamp(min=1.0)


def sequence_sum(loss: Tensor, mask: Tensor, max_len: int | None, num_items: Tensor | float | None) -> Tensor:
    """luspo: sum over each sequence's tokens (its loss scaled by its length), mean over sequences."""
    return (loss * mask).sum(-1).mean()


@dataclass(frozen=True)
class PolicyLoss:
    objective: Objective
    normalizer: Normalizer


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str, normalizer: Normalizer) -> Callable[[Objective], Objective]:
    """Register ``objective`` under ``name`` with the normaliser that turns it into a scalar."""

    def decorator(objective: Objective) -> Objective:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = PolicyLoss(objective, normalizer)
        return objective

    return decorator


@register_policy_loss("grpo", sequence_mean)
@register_policy_loss("bnpo", token_mean)
@register_policy_loss("dr_grpo", constant)
@register_policy_loss("dapo", global_tokens)
@register_policy_loss("luspo", sequence_sum)
def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, logps: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic bound -min(r A, clip(r, 1-eps_low, 1+eps_high) A): no gain from moving r past the clip."""
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, {
        "clip_ratio/low_mean": low,
        "clip_ratio/high_mean": high,
        "clip_ratio/region_mean": low | high,
    }


@register_policy_loss("cispo", global_tokens)
def cispo(
    ratio: Tensor, advantages: Tensor, logps: Tensor, epsilon_low: float, epsilon_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE weighted by the detached ratio capped at epsilon_high, so clipped tokens still get gradient."""
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    return -weight * advantages * logps, {"cispo_clip_ratio": (ratio > epsilon_high) & (advantages > 0)}


def k3_kl(ref_logps: Tensor, logps: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate exp(d) - d - 1 with d = ref - logp: unbiased, always >= 0."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """TRL's metric mean: over loss tokens, or over sequences for sequence-level (B, 1) values."""
    if x.size(1) == 1:
        return x.sum() / x.size(0)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def compute_policy_loss(
    loss_type: str,
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    token_weights: Tensor | None = None,
    *,
    ref_logps: Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    kl_bias_correction: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Scalar loss of one batch and its detached metrics, as TRL's ``GRPOTrainer._compute_loss``.

    Shapes: ``logps``, ``old_logps``, ``ref_logps``, ``completion_mask``, ``token_weights`` (B, T);
    ``advantages`` (B,). ``old_logps=None`` means on-policy (num_iterations == 1): the ratio is
    exp(logp - logp.detach()) = 1 with the policy gradient intact. ``epsilon_high`` defaults to
    ``epsilon_low`` (for cispo it is the absolute cap, e.g. 5.0). ``importance_sampling_level``
    "sequence" uses one length-normalised ratio per sequence (GSPO). ``kl_bias_correction``
    multiplies the KL by the ratio (TRL's ``use_bias_correction_kl``, on by default).
    """
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; registered: {sorted(POLICY_LOSSES)}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    spec = POLICY_LOSSES[loss_type]
    mask = completion_mask
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

    log_ratio = logps - (logps.detach() if old_logps is None else old_logps)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    else:
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    ratio = torch.exp(log_weights)
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

    per_token_loss, indicators = spec.objective(ratio, advantages, logps, epsilon_low, epsilon_high)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    metrics = {name: _masked_mean(flag.float(), mask).detach() for name, flag in indicators.items()}
    if beta != 0.0:
        kl = k3_kl(ref_logps, logps)
        if kl_bias_correction:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        metrics["kl"] = _masked_mean(kl, mask).detach()
    return spec.normalizer(per_token_loss, mask, max_completion_length, num_items_in_batch), metrics


def mask_truncated_completions(completion_mask: Tensor, truncated: Tensor) -> Tensor:
    """Zero the mask of truncated completions (B,): a cut-off answer's reward says little about its tokens (DAPO)."""
    return completion_mask * (~truncated.bool()).unsqueeze(1).to(completion_mask.dtype)
