"""learnability: sample prompts (or levels) where the policy's success is most uncertain.

This project's reward-variance idea applied to data selection: a prompt with success rate s
gives a GRPO group reward variance s(1 - s) (for 0/1 rewards), and a group with zero variance
gives zero advantage, i.e. no gradient. So each unit (a prompt, or a level with unit="level")
keeps s = EMA of its per-prompt mean rewards (alpha; the first observation sets it, rewards
clipped to [0, 1]) and gets weight

    w = max(s (1 - s), min_weight)     if seen
    w = unseen_weight                  if never seen  (0.25 = the largest s(1-s): explore first)

and probability w / sum(w). unit="prompt" draws the batch's B prompts without replacement (with
replacement only when B exceeds the dataset); unit="level" draws a level per slot, then the next
row of that level's shuffled pass. probabilities() reports the mass per level either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LevelSampler

UNITS = ("prompt", "level")


class LearnabilitySampler(LevelSampler):
    name = "learnability"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        unit: str = "prompt",
        alpha: float = 0.5,
        unseen_weight: float = 0.25,
        min_weight: float = 0.01,
    ):
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if not 0 < alpha <= 1 or unseen_weight <= 0 or min_weight <= 0:
            raise ValueError(
                f"learnability needs 0 < alpha <= 1, unseen_weight > 0, min_weight > 0; "
                f"got {alpha}, {unseen_weight}, {min_weight}"
            )
        self.unit, self.alpha, self.unseen_weight, self.min_weight = unit, alpha, unseen_weight, min_weight
        self.unit_of_row = np.arange(self.table.n) if unit == "prompt" else self.table.level
        self.success = np.full(self.table.n if unit == "prompt" else self.n_levels, np.nan)

    def unit_probs(self) -> np.ndarray:
        """Probability of each unit (prompt or level)."""
        s = np.clip(self.success, 0.0, 1.0)
        weights = np.where(np.isnan(s), self.unseen_weight, np.maximum(s * (1 - s), self.min_weight))
        return weights / weights.sum()

    def _group_probs(self) -> np.ndarray:
        probs = self.unit_probs()
        if self.unit == "level":
            return probs
        return np.bincount(self.table.level, weights=probs, minlength=self.n_levels)

    def _draw(self, n: int) -> list[int]:
        if self.unit == "level":
            return super()._draw(n)
        return self.rng.choice(self.table.n, size=n, replace=n > self.table.n, p=self.unit_probs()).tolist()

    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        units = self.unit_of_row[indices]
        for u in np.unique(units):
            mean = rewards[units == u].mean()
            old = self.success[u]
            self.success[u] = mean if np.isnan(old) else (1 - self.alpha) * old + self.alpha * mean

    def _state(self) -> dict[str, Any]:
        seen = np.flatnonzero(~np.isnan(self.success))
        return {**super()._state(), "seen": seen.tolist(), "success": self.success[seen].tolist()}

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.success[:] = np.nan
        self.success[np.array(state["seen"], dtype=np.int64)] = state["success"]
