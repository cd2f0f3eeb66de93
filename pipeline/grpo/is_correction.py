"""Truncated importance sampling for the sampler/trainer mismatch, as TRL 1.16's GRPOTrainer does with vLLM.

vLLM samples with its own kernels and dtype (bf16 under ``--dtype auto``) while the policy trains in
fp32, so its completions are slightly off-policy. TRL's default (``vllm_importance_sampling_correction``)
multiplies each token's policy loss by rho = pi_train(token) / pi_vllm(token), from the log-probs the
engine returns for the sampled tokens, computed per token or per sequence and truncated (clipped) or
masked (zeroed) outside [clip_min, clip_max]. The KL term is not corrected, as in TRL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from pipeline.generation.base import Completion

IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_logprobs(completions: Sequence[Completion], width: int) -> Tensor | None:
    """(B, width) engine log-probs of the sampled tokens, zero-padded; None unless every completion has them."""
    if not completions or any(c.logprobs is None for c in completions):
        return None
    out = torch.zeros(len(completions), width)
    for row, completion in enumerate(completions):
        out[row, :len(completion.logprobs)] = torch.tensor(completion.logprobs, dtype=torch.float32)
    return out


def importance_sampling_ratio(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, mode: str = "sequence_mask",
                              clip_min: float | None = None, clip_max: float | None = 3.0) -> Tensor:
    """TRL 1.16's ``vllm_importance_sampling_ratio``: (B, T) for token modes, (B, 1) for sequence modes.

    ``old_logps``: the trained policy's log-probs of the sampled tokens before the update. A NaN
    engine log-prob counts as no correction (difference 0), as in TRL.
    """
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance sampling mode {mode!r}: choose one of {', '.join(IS_MODES)}")
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio if clip_min is None and clip_max is None else torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def with_ratio(token_weights: Tensor | None, ratio: Tensor | None) -> Tensor | None:
    """The soft mask's per-token weights times the correction: both multiply the policy term only."""
    if ratio is None:
        return token_weights
    return ratio if token_weights is None else token_weights * ratio


def correction_metrics(old_logps: Tensor, sampling_logps: Tensor, mask: Tensor, ratio: Tensor) -> dict[str, Tensor]:
    """This rank's share of TRL's ``sampling/*`` metrics (reduce the ``/min``, ``/max`` by name)."""
    valid = mask.bool()
    delta = (old_logps - sampling_logps).abs()
    delta = delta[valid & ~torch.isnan(delta)]
    flat = ratio.flatten() if ratio.size(1) == 1 else ratio[valid]
    zero = torch.tensor(0.0, device=mask.device)

    def stat(x: Tensor, fn) -> Tensor:
        return fn(x) if x.numel() else zero

    return {"sampling/sampling_logp_difference/mean": stat(delta, torch.mean),
            "sampling/sampling_logp_difference/max": stat(delta, torch.max),
            "sampling/importance_sampling_ratio/min": stat(flat, torch.min),
            "sampling/importance_sampling_ratio/mean": stat(flat, torch.mean),
            "sampling/importance_sampling_ratio/max": stat(flat, torch.max)}
