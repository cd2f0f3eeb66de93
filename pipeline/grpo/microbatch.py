"""Gradient accumulation over one step's completions: the same optimizer step in a micro-batch's memory.

The B completions of a step go through forward and backward ``size`` at a time. Each micro-batch's
loss is scaled by its share of the whole batch's normaliser, so the gradients add up to the
one-batch gradient and the summed losses to the one-batch loss: dapo and cispo already divide by
the step's global token count; grpo, dr_grpo and luspo average over sequences (share: the
micro-batch's sequences), bnpo over the batch's tokens (share: its tokens). Metrics (clip ratios,
KL) are token or sequence means, combined with the matching shares. Under DDP only the last micro-batch's backward
all-reduces (``fabric.no_backward_sync``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from pipeline.grpo.is_correction import with_ratio
from pipeline.grpo.logprobs import DEFAULT_CHUNK_SIZE, completion_logprobs, completion_outputs
from pipeline.grpo.losses import (
    POLICY_LOSSES,
    compute_policy_loss,
    constant,
    global_tokens,
    sequence_mean,
    sequence_sum,
    token_mean,
)


@dataclass
class PolicyBatch:
    """This rank's completions of one step, as the loss needs them; every field has one row per completion."""

    input_ids: Tensor  # (B, P + T)
    attention_mask: Tensor  # (B, P + T)
    completion_mask: Tensor  # (B, T)
    advantages: Tensor  # (B,)
    old_logps: Tensor | None = None  # (B, T), num_iterations > 1
    ref_logps: Tensor | None = None  # (B, T), beta > 0
    weights: Tensor | None = None  # (B, T) soft-mask weights
    is_ratio: Tensor | None = None  # (B, T) or (B, 1): vLLM sampler/trainer correction (pipeline.grpo.is_correction)

    def __len__(self) -> int:
        return self.input_ids.size(0)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.size(1)

    def rows(self, rows: slice) -> PolicyBatch:
        return PolicyBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                              for f in fields(self)})


@dataclass
class StepResult:
    loss: Tensor  # the whole batch's loss (detached)
    metrics: dict[str, Tensor]
    entropies: Tensor | None  # (B, T) when asked for
    weights: Tensor | None  # the soft-mask weights the loss used


def micro_batches(num_rows: int, size: int | None) -> list[slice]:
    """Consecutive row ranges of at most ``size`` rows (None or 0: one range)."""
    size = num_rows if not size or size >= num_rows else size
    return [slice(start, min(start + size, num_rows)) for start in range(0, max(num_rows, 1), max(size, 1))]


def _sequence_share(mask: Tensor, rows: slice) -> Tensor:
    return torch.tensor((rows.stop - rows.start) / mask.size(0), dtype=mask.dtype, device=mask.device)


def _token_share(mask: Tensor, rows: slice) -> Tensor:
    return mask[rows].sum() / mask.sum().clamp(min=1.0)


def _whole(mask: Tensor, rows: slice) -> Tensor:
    return torch.ones((), dtype=mask.dtype, device=mask.device)


# normaliser -> the share of the whole batch's loss that a micro-batch's own loss stands for
SHARES: dict[Callable, Callable[[Tensor, slice], Tensor]] = {
    sequence_mean: _sequence_share, constant: _sequence_share, sequence_sum: _sequence_share,
    token_mean: _token_share, global_tokens: _whole,
}


def _metric_share(name: str, loss_options: dict[str, Any], mask: Tensor, rows: slice) -> Tensor:
    """``compute_policy_loss``'s metrics are token means, except the clip indicators of sequence-level
    ratios (GSPO), which are means over sequences."""
    per_sequence = loss_options.get("importance_sampling_level") == "sequence" and name != "kl"
    return _sequence_share(mask, rows) if per_sequence else _token_share(mask, rows)


def loss_share(loss_type: str, completion_mask: Tensor, rows: slice) -> Tensor:
    normalizer = POLICY_LOSSES[loss_type].normalizer
    if normalizer not in SHARES:
        raise ValueError(f"loss_type {loss_type!r}: add its normaliser's micro-batch share to microbatch.SHARES")
    return SHARES[normalizer](completion_mask, rows)


def score(model: torch.nn.Module, batch: PolicyBatch, size: int | None, temperature: float,
          with_entropy: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs (and entropies) without gradient, a micro-batch at a time: old and reference log-probs."""
    logps, entropies = [], []
    with torch.no_grad():
        for rows in micro_batches(len(batch), size):
            part = batch.rows(rows)
            lp, ent = completion_logprobs(model, part.input_ids, part.attention_mask, batch.completion_len,
                                          temperature, with_entropy, chunk_size)
            logps.append(lp)
            entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies) if with_entropy else None


def accumulate(fabric: Any, model: torch.nn.Module, batch: PolicyBatch, loss_type: str, loss_options: dict[str, Any],
               size: int | None, temperature: float, *, with_entropy: bool = False,
               weights_from_entropies: Callable[[Tensor], Tensor] | None = None,
               weights_from_states: Callable[[Any, slice], Tensor] | None = None, state_kind: str = "completion",
               chunk_size: int = DEFAULT_CHUNK_SIZE) -> StepResult:
    """Forward and backward over ``batch`` in micro-batches; the caller clips and steps the optimizer.

    ``loss_options``: ``compute_policy_loss``'s keyword options (beta, epsilons, num_items_in_batch, ...).
    ``weights_from_entropies``: soft-mask weights that need the policy's entropies of the whole
    batch (the entropy mask). With one micro-batch they come from its own forward; with several, a
    no-grad pass over the batch computes the entropies first (one extra forward).
    ``weights_from_states``: per-completion weights of a micro-batch from the hidden states its own
    forward computed (detached, ``completion_outputs``'s ``state_kind``) and its rows of the batch (the online
    importance head).
    """
    slices = micro_batches(len(batch), size)
    entropies = None
    if weights_from_entropies is not None and len(slices) > 1:
        _, entropies = score(model, batch, size, temperature, with_entropy=True, chunk_size=chunk_size)
        batch = replace(batch, weights=weights_from_entropies(entropies))
    need_entropy = entropies is None and (with_entropy or weights_from_entropies is not None)
    mask = batch.completion_mask
    loss = torch.zeros((), device=mask.device)
    metrics: dict[str, Tensor] = {}
    parts, part_weights = [], []
    for i, rows in enumerate(slices):
        part = batch.rows(rows)
        with fabric.no_backward_sync(model, enabled=i < len(slices) - 1):
            logps, part_entropies, states = completion_outputs(
                model, part.input_ids, part.attention_mask, batch.completion_len, temperature, need_entropy,
                chunk_size, states="none" if weights_from_states is None else state_kind)
            if weights_from_entropies is not None and len(slices) == 1:
                batch = part = replace(part, weights=weights_from_entropies(part_entropies))
            if weights_from_states is not None:
                part = replace(part, weights=weights_from_states(states, rows))
                part_weights.append(part.weights)
            part_loss, part_metrics = compute_policy_loss(
                loss_type, logps, part.old_logps, part.advantages, part.completion_mask,
                with_ratio(part.weights, part.is_ratio),
                ref_logps=part.ref_logps, **loss_options)
            share = loss_share(loss_type, mask, rows)
            fabric.backward(part_loss * share)
        loss = loss + part_loss.detach() * share
        for name, value in part_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value * _metric_share(name, loss_options, mask, rows)
        parts.append(part_entropies)
    if need_entropy:
        entropies = torch.cat(parts)
    return StepResult(loss, metrics, entropies, torch.cat(part_weights) if part_weights else batch.weights)
