"""The pair likelihoods of f, written once: training, metrics and the constant baseline use them.

A pair's sisters share their first t tokens; their standardised rewards z_i = (R_i - m_q) / sqrt(v_q)
satisfy E[z1 z2] = f(t) (docs/design.md). Three ways to score a predicted f against a pair, one
small function each (``LIKELIHOODS``), all per pair and elementwise:

- ``gaussian``: -log N((z1, z2); 0, [[1, f], [f, 1]]), in nats.
- ``bernoulli``: -log P(R1, R2) for 0/1 rewards with success rate p = m_q: P(1,1) = p^2 + f p(1-p),
  P(0,0) = (1-p)^2 + f p(1-p), P(1,0) = P(0,1) = (1-f) p(1-p). Exact for binary rewards, in nats.
- ``moment``: (z1 z2 - f)^2, least squares on the moment E[z1 z2] = f (units: squared z1*z2).
- ``bernoulli+gaussian``: each pair by the exact likelihood of its prompt's rewards: bernoulli where they
  are all 0/1, gaussian elsewhere (a task whose levels mix 0/1 and graded rewards), in nats.

Validation (``validation_loss``) scores the likelihoods robustly: see ``OUTLIER_SHARE``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError

# Predictions stay at most F_MAX: f = 1 makes the Gaussian density singular and P(1,0) zero. Not closer to 1:
# a pair at f = 1 - e whose sisters differ by dz costs dz^2 / (4e) nats, so at e = 1e-4 one pair outweighed
# thousands and training diverged on the credit task (docs/credit.md); a true f above F_MAX reads <= 0.01 low.
F_MAX = 0.99
LOG_2PI = math.log(2 * math.pi)
# Validation mixes each pair's likelihood with this share of the pair's likelihood at f = 0 (independent sisters),
# so that a confidently wrong pair costs at most log(1 / share) = 4.6 nats more than at f = 0, not dz^2 / (4e): on the
# credit task, six pairs of one validation prompt near the cap made epoch 0 look best while later epochs halved
# the error against the true f (docs/credit.md). Training keeps the exact likelihood: those pairs teach f.
OUTLIER_SHARE = 0.01

# (f, targets) -> per-pair loss; targets hold tensors z1, z2 (standardised), r1, r2, p (raw rewards, mean) and
# binary (1 where every reward of the pair's prompt is 0 or 1)
PairLoss = Callable[[Tensor, dict[str, Tensor]], Tensor]
LIKELIHOODS: dict[str, PairLoss] = {}
UNITS = {"gaussian": "nats/pair", "bernoulli": "nats/pair", "moment": "squared error/pair",
         "bernoulli+gaussian": "nats/pair"}


def register_likelihood(name: str) -> Callable[[PairLoss], PairLoss]:
    def decorator(fn: PairLoss) -> PairLoss:
        LIKELIHOODS[name] = fn
        return fn

    return decorator


def pair_nll(f: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Per-pair negative log-density of (z1, z2) under correlation f (full constant included).

    ``-pair_nll`` equals ``multivariate_normal.logpdf([z1, z2], cov=[[1, f], [f, 1]])``; for raw rewards
    subtract log(v_q) (the Jacobian of standardising). Written as two squares, so there is no
    cancellation near f = 1, where exact ties z1 = z2 are common.
    """
    f = f.clamp(-F_MAX, F_MAX)
    log_det = torch.log1p(-f) + torch.log1p(f)
    quad = (z1 + z2).square() / (4 * (1 + f)) + (z1 - z2).square() / (4 * (1 - f))
    return LOG_2PI + 0.5 * log_det + quad


@register_likelihood("gaussian")
def gaussian(f: Tensor, targets: dict[str, Tensor]) -> Tensor:
    return pair_nll(f, targets["z1"], targets["z2"])


@register_likelihood("bernoulli")
def bernoulli(f: Tensor, targets: dict[str, Tensor]) -> Tensor:
    """The exact likelihood of two 0/1 rewards whose correlation is f, given the success rate p."""
    f = f.clamp(0.0, F_MAX)
    p, r1, r2 = targets["p"], targets["r1"], targets["r2"]
    spread = p * (1 - p)
    same = torch.where(r1 > 0.5, p.square(), (1 - p).square()) + f * spread
    prob = torch.where((r1 > 0.5) == (r2 > 0.5), same, (1 - f) * spread)
    return -torch.log(prob)


@register_likelihood("bernoulli+gaussian")
def bernoulli_or_gaussian(f: Tensor, targets: dict[str, Tensor]) -> Tensor:
    """Bernoulli on the pairs of 0/1 prompts, Gaussian on the others. The Gaussian density of two exactly tied
    rewards grows without bound as f -> 1, so on 0/1 rewards it pulls f to its cap; the Bernoulli is exact."""
    f, binary = f.expand_as(targets["z1"]), targets["binary"] > 0.5
    loss = gaussian(f, targets)
    if binary.any():  # indexed, not torch.where: bernoulli on graded rewards may be NaN, and NaN leaks through where
        loss = loss.index_put((binary,), bernoulli(f[binary], {k: targets[k][binary] for k in ("p", "r1", "r2")}))
    return loss


@register_likelihood("moment")
def moment(f: Tensor, targets: dict[str, Tensor]) -> Tensor:
    return (targets["z1"] * targets["z2"] - f).square()


def robust(loss: PairLoss, share: float = OUTLIER_SHARE) -> PairLoss:
    """-log((1 - share) exp(-loss(f)) + share exp(-loss(0))): a share of the pairs independent whatever f says.

    On 0/1 rewards it is the Bernoulli likelihood at (1 - share) f, that likelihood being linear in f."""
    def mixed(f: Tensor, targets: dict[str, Tensor]) -> Tensor:
        exact = loss(f, targets)
        independent = loss(torch.zeros_like(exact), targets)
        return -torch.logaddexp(math.log1p(-share) - exact, math.log(share) - independent)

    return mixed


def validation_loss(likelihood: str) -> PairLoss:
    """What validation scores a pair by: the likelihood made ``robust`` (``moment`` is no likelihood: as it is)."""
    fn = LIKELIHOODS[likelihood]
    return robust(fn) if UNITS[likelihood] == "nats/pair" else fn


def is_binary(*rewards: np.ndarray) -> bool:
    """Every (finite) reward is 0 or 1: the column a Bernoulli likelihood describes exactly."""
    values = np.concatenate([np.asarray(r, dtype=np.float64) for r in rewards])
    return bool(np.isin(values[np.isfinite(values)], (0.0, 1.0)).all())


def resolve_likelihood(name: str, binary: np.ndarray, column: str) -> str:
    """``auto``: the exact likelihood of each pair's rewards (``binary``: per pair, whether its prompt's rewards are
    all 0/1): bernoulli, gaussian, or bernoulli+gaussian where both kinds occur; an explicit choice is checked."""
    binary = np.asarray(binary, dtype=bool)
    if name == "auto":
        return "bernoulli" if binary.all() else "bernoulli+gaussian" if binary.any() else "gaussian"
    if name not in LIKELIHOODS:
        raise UserError(f"--likelihood must be auto or one of {', '.join(LIKELIHOODS)}, got '{name}'")
    if name == "bernoulli" and not binary.all():
        raise UserError(f"--likelihood bernoulli needs a 0/1 reward column, but '{column}' has other values: "
                        f"use --likelihood gaussian or moment")
    return name


def minimise_scalar(loss: Callable[[float], float], lo: float, hi: float, grid: int = 201) -> float:
    """argmin of ``loss`` over [lo, hi]: a grid, then a finer grid around the best point, three times
    (to ~1e-7 of the range). A grid, not Newton: the mean Gaussian NLL in f need not be convex."""
    best = lo
    for _ in range(3):
        points = np.linspace(lo, hi, grid)
        values = [loss(float(x)) for x in points]
        i = int(np.argmin(values))
        best, lo, hi = float(points[i]), float(points[max(i - 1, 0)]), float(points[min(i + 1, grid - 1)])
    return best


def best_constant_f(likelihood: str, targets: dict[str, Tensor]) -> float:
    """The constant f in [0, F_MAX] with the least mean loss on ``targets``: the baseline to beat."""
    fn = LIKELIHOODS[likelihood]
    targets = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in targets.items()}
    if next(iter(targets.values())).numel() == 0:
        return 0.0
    return minimise_scalar(lambda c: float(fn(torch.tensor(c, dtype=torch.float64), targets).mean()), 0.0, F_MAX)
