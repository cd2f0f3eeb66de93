"""How the head's outputs a(u), one per completion position u = 1..L, become f(0..L).

f(0) = 0 always (sisters that share no token are independent given the prompt), f(L) = 1 when the
end is pinned (the whole text decides a reward that is a function of it), and in between one of
two forms (docs/design.md, "The shape of f"):

- ``direct``: f(u) = F_MAX * sigmoid(a(u)), any shape;
- ``monotone``: f(u) = F_MAX (1 - prod_{v <= u} (1 - g(v))) with the hazard g(v) = sigmoid(a(v)): the share
  of the still-open variance that token v - 1 decides. f never falls, and a deciding token raises f
  right after it wherever it stands.

a(u) is read at the hidden state of completion token u - 1 (the last token of prompt + completion[:u]).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.importance.loss import F_MAX

FORMS = ("direct", "monotone")
# Knots of the position basis: every position up to 16, then four per doubling up to 4096 (later ones clamp).
KNOTS = tuple(range(17)) + tuple(int(2 ** (4 + i / 4)) for i in range(1, 33))


def position_features(u: Tensor) -> Tensor:
    """(..., len(KNOTS)) piecewise-linear "hat" basis of the completion position u: a linear head on it
    can draw any curve of u that is linear between knots (a frozen RoPE backbone carries little
    absolute position)."""
    knots = torch.tensor(KNOTS, dtype=torch.float32, device=u.device)
    u = u.float().clamp(0, KNOTS[-1])
    right = torch.bucketize(u, knots, right=True).clamp(1, len(KNOTS) - 1)
    left = right - 1
    alpha = (u - knots[left]) / (knots[right] - knots[left])
    out = torch.zeros(*u.shape, len(KNOTS), device=u.device)
    out.scatter_(-1, left.unsqueeze(-1), (1 - alpha).unsqueeze(-1))
    out.scatter_add_(-1, right.unsqueeze(-1), alpha.unsqueeze(-1))
    return out


def f_along(form: str, logits: Tensor) -> Tensor:
    """f(1..U) from a(1..U) (B, U); rows are right-padded, and padding only follows the real positions."""
    if form == "direct":
        return F_MAX * torch.sigmoid(logits)
    return F_MAX * -torch.expm1(-F.softplus(logits).cumsum(-1))  # scaled, not clamped: a clamp has no gradient


def curve(inner: Tensor, lengths: Tensor, pin_end: bool) -> Tensor:
    """(B, U + 1) from f(1..U) (B, U): f(0) = 0, f(L) = 1 if ``pin_end``, f(L) repeated past each row's end."""
    f = torch.cat([inner.new_zeros(inner.shape[0], 1), inner], dim=1)
    steps = torch.arange(f.shape[1], device=f.device)
    end = lengths.to(f.device).unsqueeze(1)
    if pin_end:
        f = torch.where((steps == end) & (end > 0), torch.ones_like(f), f)
    last = f.gather(1, end)
    return torch.where(steps > end, last, f)


def initial_bias(form: str, value: float) -> float:
    """The head bias that starts the form at a constant: f = value (direct) or hazard rate value (monotone)."""
    if form == "direct":
        p = min(max(value / F_MAX, 0.02), 0.98)  # off the sigmoid's flat ends
        return math.log(p / (1 - p))
    rate = min(max(value, 1e-4), 5.0)
    return math.log(math.expm1(rate))  # softplus(bias) = rate


def constant_hazard_curve(rate: float, t: Tensor) -> Tensor:
    """f(t) = 1 - exp(-rate t): the monotone form with every hazard equal (its starting point)."""
    return F_MAX * -torch.expm1(-rate * t.double())
