"""Soft masks: per-token loss weights (B, T) for GRPO, one registered function per mode.

A mode gives raw, non-negative weights; ``finalize`` turns them into the weights the loss uses:
rescaled to mean 1 per completion, except for modes registered with ``rescale=False`` (TRL's
``top_entropy_quantile`` rule, whose 0/1 mask TRL multiplies into the loss as it is).
Inputs: ``f`` (B, T + 1) is the importance net's f(t) for t = 0..T (f(t) = share of the reward
variance decided by the first t completion tokens, docs/design.md section 1); ``entropies`` (B, T) is
the policy's per-token entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

# (completion_mask, f, entropies, entropy_quantile) -> raw weights (B, T), >= 0
RawWeights = Callable[[Tensor, Tensor | None, Tensor | None, float], Tensor]

SOFTMASKS: dict[str, RawWeights] = {}
UNSCALED: set[str] = set()  # modes whose raw weights the loss uses as they are
# Filled by register_softmask, in registration order (never by hand): the modes that read f, and those
# that need the policy's entropies of this forward.
NEEDS_F: list[str] = []
NEEDS_ENTROPY: list[str] = []
TOP_FRACTION = 0.2  # weight_stats reports the weight share of each completion's top 20% tokens


def register_softmask(name: str, *, rescale: bool = True, needs_f: bool = False,
                      needs_entropy: bool = False) -> Callable[[RawWeights], RawWeights]:
    """Register a mode under ``name``, declaring what it reads.

    ``rescale=False``: ``finalize`` keeps the raw weights (no mean-1 rescaling, no uniform fallback).
    ``needs_f``: the mode reads f, so stage 3 requires an importance source for it (``--importance_net``
    or ``--importance online``). ``needs_entropy``: it reads the policy's entropies of this forward.
    """

    def decorator(fn: RawWeights) -> RawWeights:
        if name in SOFTMASKS:
            raise ValueError(f"soft mask {name!r} is already registered")
        SOFTMASKS[name] = fn
        if not rescale:
            UNSCALED.add(name)
        if needs_f:
            NEEDS_F.append(name)
        if needs_entropy:
            NEEDS_ENTROPY.append(name)
        return fn

    return decorator


def _importance(f: Tensor | None, mask: Tensor, mode: str) -> Tensor:
    if f is None or f.dim() != 2 or f.shape != (mask.size(0), mask.size(1) + 1):
        got = None if f is None else tuple(f.shape)
        raise ValueError(
            f"soft mask {mode!r} needs f of shape (B, T + 1) = {(mask.size(0), mask.size(1) + 1)}, got {got}"
        )
    return f


@register_softmask("none")
def uniform(mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float) -> Tensor:
    """Plain GRPO: every token counts the same."""
    return torch.ones_like(mask)


@register_softmask("delta", needs_f=True)
def delta(mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float) -> Tensor:
    """w_t = max(f(t+1) - f(t), 0): the share of the reward variance that token t decided."""
    f = _importance(f, mask, "delta")
    return (f[:, 1:] - f[:, :-1]).clamp(min=0)


@register_softmask("shuffled", needs_f=True)
def shuffled_delta(mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float) -> Tensor:
    """delta's weights, permuted at random among each completion's own valid tokens: a control.

    Same weight distribution per completion, placed on the wrong tokens: it separates "credit on
    the right tokens" from "any reweighting". The permutation draws from torch's default CPU
    generator, which stage 3 seeds with --seed and checkpoints, so it is reproducible and resumes.
    """
    raw = delta(mask, f, entropies, entropy_quantile) * mask
    invalid = ~mask.bool()
    keys = torch.rand(mask.shape).to(mask.device).masked_fill(invalid, float("inf"))
    positions = torch.arange(mask.size(1), device=mask.device, dtype=torch.float).expand(mask.shape)
    source = keys.argsort(dim=-1)  # valid positions first, in random order
    target = positions.masked_fill(invalid, float("inf")).argsort(dim=-1)  # valid positions first, in order
    return torch.zeros_like(raw).scatter(1, target, raw.gather(1, source))


@register_softmask("variance", needs_f=True)
def remaining_variance(
    mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float
) -> Tensor:
    """w_t = 1 - f(t): the share of the reward variance still open when token t is chosen."""
    f = _importance(f, mask, "variance")
    return (1 - f[:, :-1]).clamp(min=0)


def gather_across_ranks(values: Tensor) -> Tensor:
    """The 1-D ``values`` of every rank, concatenated (ranks may hold different counts).

    TRL's ``pad_across_processes`` + ``gather`` over the default process group (the one Fabric's
    DDP/FSDP strategies start); the local values when the run is not distributed. Every rank must
    call it, also one with no values.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    count = torch.tensor([values.numel()], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = values.new_zeros(max(sizes))
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes, strict=True)])


def high_entropy_mask(
    entropies: Tensor | None, mask: Tensor, entropy_quantile: float,
    gather: Callable[[Tensor], Tensor] = gather_across_ranks,
) -> Tensor:
    """TRL's ``get_high_entropy_mask`` with ``top_entropy_quantile``: 1 on the valid tokens whose
    entropy is >= the (1 - q) quantile of the valid tokens' entropies of all ranks, else 0."""
    if entropies is None or entropies.shape != mask.shape:
        raise ValueError(f"soft mask 'entropy' needs entropies of shape {tuple(mask.shape)}")
    if not 0.0 < entropy_quantile <= 1.0:
        raise ValueError(f"entropy_quantile must be in (0, 1], got {entropy_quantile}")
    valid = mask.bool()
    pool = gather(entropies[valid].float())
    if pool.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(pool, 1 - entropy_quantile)
    return ((entropies >= threshold) & valid).to(mask.dtype)


@register_softmask("entropy", rescale=False, needs_entropy=True)
def top_entropy(mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float) -> Tensor:
    """TRL's "80/20" baseline exactly: the loss keeps the top ``entropy_quantile`` tokens of the step
    by policy entropy, as they are (a completion with none kept contributes only its KL term)."""
    return high_entropy_mask(entropies, mask, entropy_quantile)


@register_softmask("entropy_rescaled", needs_entropy=True)
def top_entropy_rescaled(
    mask: Tensor, f: Tensor | None, entropies: Tensor | None, entropy_quantile: float
) -> Tensor:
    """The same tokens, rescaled to mean 1 per completion like the other soft masks: it moves credit
    to a completion's high-entropy tokens without shrinking the loss (none kept: uniform)."""
    return high_entropy_mask(entropies, mask, entropy_quantile)


def finalize(raw: Tensor, mask: Tensor, strength: float, rescale: bool = True) -> Tensor:
    """Rescale raw weights to mean 1 over each completion's valid tokens, then mix with uniform.

    w = strength * raw / mean(raw) + (1 - strength), and 0 on padding. Mean 1 per completion keeps
    each completion's total gradient mass, hence the loss scale, the learning rate and TRL's
    normalisers, exactly as in plain GRPO: the mask only moves credit between the tokens of one
    completion (and all-ones weights give the plain loss bit for bit). A completion whose raw
    weights are all 0 falls back to uniform. ``rescale=False`` skips the rescaling (and the
    fallback): w = strength * raw + (1 - strength). The weights are constants for the update.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"soft-mask strength must be in [0, 1], got {strength}")
    raw = raw.detach() * mask
    if rescale:
        num_valid = mask.sum(-1, keepdim=True)
        mass = raw.sum(-1, keepdim=True)
        tiny = torch.finfo(raw.dtype).tiny
        raw = torch.where(mass > 0, raw * num_valid / mass.clamp(min=tiny), mask)
    return (strength * raw + (1 - strength)) * mask


def soft_mask_weights(
    mode: str,
    completion_mask: Tensor,
    strength: float = 1.0,
    *,
    f: Tensor | None = None,
    entropies: Tensor | None = None,
    entropy_quantile: float = 0.2,
) -> Tensor:
    """Per-token loss weights (B, T) of ``mode``, finalised (0 on padding; mean 1 per completion
    unless the mode is in ``UNSCALED``). Under DDP every rank must call it (``entropy`` gathers)."""
    if mode not in SOFTMASKS:
        raise ValueError(f"unknown soft mask {mode!r}; registered: {sorted(SOFTMASKS)}")
    mask = completion_mask.float()
    raw = SOFTMASKS[mode](mask, f, entropies, entropy_quantile)
    return finalize(raw, mask, strength, rescale=mode not in UNSCALED)


def weight_stats(weights: Tensor, mask: Tensor) -> dict[str, float]:
    """Mean and max weight over valid tokens, and the weight share of each completion's top 20% tokens.

    ``top20_mass`` is averaged over completions: 0.2 for uniform weights (up to rounding of the
    token count), near 1 when a few tokens carry all the credit.
    """
    valid = mask.bool()
    if not valid.any():
        return {"mean": float("nan"), "max": float("nan"), "top20_mass": float("nan")}
    masked = weights * mask
    num_valid = mask.sum(-1)
    k = torch.ceil(TOP_FRACTION * num_valid).long().clamp(min=1)
    top = masked.sort(dim=-1, descending=True).values.cumsum(-1).gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)
    total = masked.sum(-1)
    rows = (num_valid > 0) & (total > 0)
    return {
        "mean": weights[valid].mean().item(),
        "max": weights[valid].max().item(),
        "top20_mass": (top[rows] / total[rows]).mean().item(),
    }
