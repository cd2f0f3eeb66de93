"""The pair likelihood of DESIGN.md section 1, written once: training, metrics and the baseline use it.

Sisters' standardised rewards (z1, z2) ~ N(0, [[1, f], [f, 1]]). Using
z1^2 - 2 f z1 z2 + z2^2 = ((z1 + z2)^2 (1 - f) + (z1 - z2)^2 (1 + f)) / 2 the quadratic form splits
into two terms without cancellation, and log(1 - f^2) = log1p(-f) + log1p(f) stays accurate near f = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

F_MAX = 1.0 - 1e-4  # f = 1 makes the density singular; exact ties (z1 == z2) would drive f there
LOG_2PI = math.log(2 * math.pi)


def pair_nll(f: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Per-pair negative log-density of (z1, z2) under correlation f (elementwise, full constant included).

    ``-pair_nll`` equals ``multivariate_normal.logpdf([z1, z2], cov=[[1, f], [f, 1]])``; for raw rewards
    subtract log(v_q) (the Jacobian of standardising).
    """
    f = f.clamp(-F_MAX, F_MAX)
    log_det = torch.log1p(-f) + torch.log1p(f)
    quad = (z1 + z2).square() / (4 * (1 + f)) + (z1 - z2).square() / (4 * (1 - f))
    return LOG_2PI + 0.5 * log_det + quad


def best_constant_f(z1: np.ndarray, z2: np.ndarray) -> float:
    """The constant f in [0, F_MAX] with the least mean NLL: the baseline the network has to beat.

    With A = mean(z1^2 + z2^2) and B = mean(z1 z2) the mean NLL's derivative vanishes where
    f^3 - B f^2 + (A - 1) f - B = 0, so the optimum is a real root of that cubic or an end point.
    """
    a = float(np.mean(z1**2 + z2**2))
    b = float(np.mean(z1 * z2))
    roots = np.roots([1.0, -b, a - 1.0, -b])
    candidates = [0.0, F_MAX] + [float(r.real) for r in roots if abs(r.imag) < 1e-9 and 0 < r.real < F_MAX]
    z1_t, z2_t = torch.as_tensor(z1, dtype=torch.float64), torch.as_tensor(z2, dtype=torch.float64)
    losses = [float(pair_nll(torch.full_like(z1_t, c), z1_t, z2_t).mean()) for c in candidates]
    return candidates[int(np.argmin(losses))]
