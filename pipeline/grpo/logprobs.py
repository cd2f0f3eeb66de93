"""Per-token log-probs of completion tokens, computing logits only where a completion token is predicted.

A GRPO step is dominated by this forward, not by decoding: ``logits_to_keep`` makes the LM head
run on the T + 1 last positions only, so no (B, prompt + T, vocab) tensor is ever built.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as ``generate`` used when sampling the completions."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        completion_len: int, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, T) log-probs of the last ``completion_len`` tokens (and their entropies, without grad).

    Logits are divided by the sampling temperature, as TRL does, so the ratio compares the
    policy with the distribution the completions were drawn from.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_for(attention_mask),
                logits_to_keep=completion_len + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature
    targets = input_ids[:, -completion_len:]
    log_norm = logits.logsumexp(-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = log_norm - (logits.softmax(-1) * logits).sum(-1)
    return logps, entropy
