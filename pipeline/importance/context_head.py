"""A head with a causal self-attention block of its own, over the frozen body's features of prompt + completion.

The ``state+position`` head reads each completion token alone, so it cannot tell a deciding token from a
filler that looks like one: whether token u decides depends on what came before it (on the credit task,
on the prompt's rule and on which decisions are already made). This head first mixes every token's
features with those of the tokens before it, through one pre-norm transformer block (rotary positions,
``CONTEXT_HEADS`` heads, a GELU MLP) trained for f, then reads a(u) from the mixed state at completion
token u - 1 and the position basis of u. Measured on the credit task (docs/credit.md): decision-increment
MAE 0.078-0.125 over 8 seeds (mean 0.102, with stage 2's EMA of the weights), against 0.218 for the
``state+position`` head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.importance.forms import KNOTS, position_features

CONTEXT_WIDTH = 64  # the block's width; measured on the credit task, not tuned further
CONTEXT_HEADS = 4
ROPE_BASE = 10000.0
# The position basis has two active inputs summing to 1 beside CONTEXT_WIDTH state inputs: scaled by
# sqrt(CONTEXT_WIDTH) it moves a(u) about as fast under Adam. Unscaled, a truth in position alone was not
# learnt within 20 epochs (MAE 0.107, tests/test_importance_train.py); scaled, 0.073, at no cost on the credit task.
POSITION_SCALE = CONTEXT_WIDTH**0.5


def scalar_head(width: int, hidden: int) -> nn.Module:
    """width -> 1: linear, or one GELU layer of ``hidden`` units (``--head_hidden``), for every kind of head."""
    if hidden <= 0:
        return nn.Linear(width, 1)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))


class ContextInputs(NamedTuple):
    """What the context head reads: ``token_features`` (B, L, 2H) of right-padded prompt + completion rows (zero
    past each row's end), each row's length and its prompt's length."""

    features: Tensor
    lengths: Tensor
    prompt_lengths: Tensor


def token_features(hidden: Tensor, embeddings: Tensor) -> Tensor:
    """(..., 2H): each token's last hidden state and its input embedding, each layer-normalised (the embedding
    names the token itself, which a small frozen body's last state may blur)."""
    return torch.cat([F.layer_norm(hidden, hidden.shape[-1:]), F.layer_norm(embeddings, embeddings.shape[-1:])], -1)


def rotate(x: Tensor) -> Tensor:
    """Rotary position embedding of x (B, heads, T, d) at positions 0..T - 1."""
    d = x.shape[-1]
    inverse = ROPE_BASE ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = torch.arange(x.shape[-2], device=x.device, dtype=torch.float32)[:, None] * inverse
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., ::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


class CausalBlock(nn.Module):
    """x + attention(norm(x)), then + MLP(norm(x)), causal and blind to padded keys (nanoGPT's block, with RoPE)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril() & mask.bool()[:, None, None, :]
        mixed = F.scaled_dot_product_attention(rotate(q), rotate(k), v, attn_mask=allowed)
        x = x + self.proj(mixed.transpose(1, 2).reshape(b, t, width))
        return x + self.mlp(self.norm2(x))


class ContextHead(nn.Module):
    """a(u) for completion positions u = 1..width from the token features (B, T, 2H) of right-padded
    prompt + completion rows; ``out`` is the ``state+position`` head's shape, so ``start_head`` starts it."""

    def __init__(self, feature_size: int, head_hidden: int) -> None:
        super().__init__()
        self.inp = nn.Linear(feature_size, CONTEXT_WIDTH)
        self.block = CausalBlock(CONTEXT_WIDTH, CONTEXT_HEADS)
        self.out = scalar_head(CONTEXT_WIDTH + len(KNOTS), head_hidden)

    def forward(self, features: Tensor, lengths: Tensor, prompt_lengths: Tensor, width: int) -> Tensor:
        steps = torch.arange(features.shape[1], device=features.device)
        mixed = self.block(self.inp(features), steps < lengths[:, None])
        u = torch.arange(1, width + 1, device=features.device).expand(len(lengths), width)
        at = (prompt_lengths[:, None] + u - 1).clamp(max=features.shape[1] - 1)  # the last token of prompt + c[:u]
        read = mixed.gather(1, at.unsqueeze(-1).expand(-1, -1, CONTEXT_WIDTH))
        return self.out(torch.cat([read, POSITION_SCALE * position_features(u)], -1)).squeeze(-1)
