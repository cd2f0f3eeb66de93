"""The fixed easy-to-hard (E2H) schedules over K difficulty levels at step t of T.

Each schedule is a pure function (so its formula can be checked on its own) plus a thin sampler.
Past T the final mixture holds (t is clamped to T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LevelSampler, with_floor


def balanced_schedule(t: int, T: int, K: int) -> np.ndarray:
    """p_i = 1/K."""
    return np.full(K, 1.0 / K)


def step_schedule(t: int, T: int, K: int) -> np.ndarray:
    """Classical curriculum: all mass on level min(floor(t K / T), K - 1)."""
    probs = np.zeros(K)
    probs[min(min(t, T) * K // T, K - 1)] = 1.0
    return probs


def cosine_schedule(t: int, T: int, K: int) -> np.ndarray:
    """alpha early + (1 - alpha) late: early_i = (K-i)/S, late_i = (i+1)/S, S = K(K+1)/2,
    alpha = (1 + cos(pi t / T)) / 2."""
    i = np.arange(K)
    total = K * (K + 1) / 2
    alpha = 0.5 * (1 + math.cos(math.pi * min(t, T) / T))
    return alpha * (K - i) / total + (1 - alpha) * (i + 1) / total


def gaussian_schedule(
    t: int, T: int, K: int, mu_exp: float = 0.5, sigma: float = 0.5, min_prob: bool | float = True
) -> np.ndarray:
    """A bell over the levels whose centre mu = (t/T)^mu_exp (K-1) moves easy -> hard:
    q_i ~ exp(-(i - mu)^2 / (2 sigma^2)), p_i = p_min + (1 - K p_min) q_i, where p_min is
    2/(K(K+1)) when min_prob is True, 0 when False, or the given float."""
    mu = (min(t, T) / T) ** mu_exp * (K - 1)
    q = np.exp(-((np.arange(K) - mu) ** 2) / (2 * sigma**2))
    p_min = 2 / (K * (K + 1)) if min_prob is True else float(min_prob)  # False -> 0.0
    return with_floor(q / q.sum(), p_min)


class ScheduleSampler(LevelSampler):
    """A mixture fixed in advance as a function of (t, T, K)."""

    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        """Rewards do not change a fixed schedule; update() still validates them."""


class BalancedSampler(ScheduleSampler):
    """Uniform over levels: the baseline."""

    name = "balanced"

    def _group_probs(self) -> np.ndarray:
        return balanced_schedule(self.step, self.total_steps, self.n_levels)


class StepSampler(ScheduleSampler):
    """One level at a time, easiest first, each for T/K steps."""

    name = "step"

    def _group_probs(self) -> np.ndarray:
        return step_schedule(self.step, self.total_steps, self.n_levels)


class CosineSampler(ScheduleSampler):
    """Linear easy-weighted mixture turning smoothly into a hard-weighted one."""

    name = "cosine"

    def _group_probs(self) -> np.ndarray:
        return cosine_schedule(self.step, self.total_steps, self.n_levels)


class GaussianSampler(ScheduleSampler):
    """A bell over levels sliding from easiest to hardest, with an optional floor."""

    name = "gaussian"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        mu_exp: float = 0.5,
        sigma: float = 0.5,
        min_prob: bool | float = True,
    ):
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed)
        if sigma <= 0 or mu_exp <= 0:
            raise ValueError(f"gaussian needs sigma > 0 and mu_exp > 0, got sigma={sigma}, mu_exp={mu_exp}")
        self.mu_exp, self.sigma, self.min_prob = mu_exp, sigma, min_prob
        self._group_probs()  # fails now, not mid-training, if min_prob is too large for K

    def _group_probs(self) -> np.ndarray:
        return gaussian_schedule(
            self.step, self.total_steps, self.n_levels, self.mu_exp, self.sigma, self.min_prob
        )
