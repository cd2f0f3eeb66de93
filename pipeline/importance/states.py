"""Hidden states at every completion token (and the context head's features), forwarding each distinct prompt once.

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


def _prompt_then_completions(body: nn.Module, prompts: Sequence[TokenIds], completions: Sequence[TokenIds],
                             device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each distinct prompt forwarded once, its KV cache reused by every completion of it: the distinct prompts'
    last hidden states (D, P, H), each row's distinct prompt (R,), and the completions' states (R, W, H), zero
    past each row's end, with their mask (R, W)."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(int(x) for x in p), len(distinct)) for p in prompts]
    rows = torch.tensor(index, device=device)
    comp_ids, comp_mask = pad_right(completions)
    comp_ids, comp_mask = comp_ids.to(device), comp_mask.to(device)
    prompt_ids, prompt_mask = pad_right(list(distinct))
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    first = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=comp_ids.shape[1] > 0)
    if comp_ids.shape[1] == 0:
        return first.last_hidden_state, rows, first.last_hidden_state.new_zeros(len(completions), 0, body.config.hidden_size), comp_mask
    cache = first.past_key_values
    cache.batch_select_indices(rows)
    positions = prompt_mask.sum(1)[rows].unsqueeze(1) + torch.arange(comp_ids.shape[1], device=device)
    mask = torch.cat([prompt_mask[rows], comp_mask], dim=1)
    out = body(input_ids=comp_ids, attention_mask=mask, position_ids=positions,
               past_key_values=cache, use_cache=True).last_hidden_state
    return first.last_hidden_state, rows, out * comp_mask.unsqueeze(-1).to(out.dtype), comp_mask


def completion_states(body: nn.Module, prompts: Sequence[TokenIds], completions: Sequence[TokenIds],
                      device: torch.device | str) -> Tensor:
    """(R, W, H): row i's last hidden state at its completion tokens 0..len - 1, zero past its end.

    State u - 1 is that of the last token of prompt + completion[:u]. Prompts need >= 1 token.
    """
    return _prompt_then_completions(body, prompts, completions, device)[2]


def context_features(body: nn.Module, prompts: Sequence[TokenIds], completions: Sequence[TokenIds],
                     device: torch.device | str) -> tuple[Tensor, Tensor, Tensor]:
    """``context_head.token_features`` (R, T, 2H) of every token of prompt + completion (right-padded, zero past
    each row's end), the rows' lengths and their prompts' lengths: what the context head reads. The head
    attends over the prompt's tokens too, so the prompt's own states are kept from its one forward."""
    prompt_hidden, rows, comp_hidden, comp_mask = _prompt_then_completions(body, prompts, completions, device)
    prompt_lengths = torch.tensor([len(p) for p in prompts], device=device)
    lengths = prompt_lengths + comp_mask.sum(1)
    hidden = prompt_hidden.new_zeros(len(prompts), int(lengths.max()), prompt_hidden.shape[-1])
    for i, (n, m) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist(), strict=True)):
        hidden[i, :n] = prompt_hidden[rows[i], :n]
        hidden[i, n:m] = comp_hidden[i, : m - n]
    ids, mask = pad_right([np.concatenate([np.asarray(p), np.asarray(c)]).astype(np.int64)
                           for p, c in zip(prompts, completions, strict=True)])
    ids, mask = ids.to(device), mask.to(device)
    features = token_features(hidden, body.get_input_embeddings()(ids).to(hidden.dtype))
    return features * mask.unsqueeze(-1).to(features.dtype), lengths, prompt_lengths
