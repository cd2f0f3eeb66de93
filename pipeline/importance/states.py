"""Hidden states at every completion token, forwarding each distinct prompt once.

Stage 3 scores G completions of one prompt together, and stage 2 sees G/2 pairs per group: the
prompt is forwarded once per batch, its KV cache is selected for every completion of that prompt,
and only the completion tokens run through the body (1.65-2x faster at G = 4-8 in
docs/benchmarks.md). Prompts and completions are right-padded: every real token keeps its position
id and causal context, and padded keys are masked, so the states equal a plain forward of
prompt + completion to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.importance.context_head import token_features

TokenIds = Sequence[int] | np.ndarray


def pad_right(sequences: Sequence[TokenIds]) -> tuple[Tensor, Tensor]:
    """Right padding keeps every real token's position id and causal context unchanged."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(np.asarray(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def completion_states(body: nn.Module, prompts: Sequence[TokenIds], completions: Sequence[TokenIds],
                      device: torch.device | str) -> Tensor:
    """(R, W, H): row i's last hidden state at its completion tokens 0..len - 1, zero past its end.

    State u - 1 is that of the last token of prompt + completion[:u]. Prompts need >= 1 token.
    """
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(int(x) for x in p), len(distinct)) for p in prompts]
    comp_ids, comp_mask = pad_right(completions)
    hidden_size = body.config.hidden_size
    if comp_ids.shape[1] == 0:
        return torch.zeros(len(completions), 0, hidden_size, device=device)
    prompt_ids, prompt_mask = pad_right(list(distinct))
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    cache = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True).past_key_values
    rows = torch.tensor(index, device=device)
    cache.batch_select_indices(rows)
    positions = prompt_mask.sum(1)[rows].unsqueeze(1) + torch.arange(comp_ids.shape[1], device=device)
    mask = torch.cat([prompt_mask[rows], comp_mask.to(device)], dim=1)
    out = body(input_ids=comp_ids.to(device), attention_mask=mask, position_ids=positions,
               past_key_values=cache, use_cache=True).last_hidden_state
    return out * comp_mask.to(device).unsqueeze(-1).to(out.dtype)


def context_features(body: nn.Module, prompts: Sequence[TokenIds], completions: Sequence[TokenIds],
                     device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """``context_head.token_features`` (R, T, 2H) of every token of prompt + completion (right-padded, zero past
    each row's end), the rows' lengths and their prompts' lengths: what the context head reads. One plain
    forward: the head attends over the prompt's tokens too, so their states are needed, not only its cache."""
    ids, mask = pad_right([np.concatenate([np.asarray(p), np.asarray(c)]).astype(np.int64)
                           for p, c in zip(prompts, completions, strict=True)])
    ids, mask = ids.to(device), mask.to(device)
    hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    features = token_features(hidden, body.get_input_embeddings()(ids).to(hidden.dtype))
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    return features * mask.unsqueeze(-1).to(features.dtype), mask.sum(1), prompt_lengths
