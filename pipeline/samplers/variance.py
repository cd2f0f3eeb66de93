"""variance_regularized: an adaptive level mixture that pushes towards equal reward on every level
(VREx + GroupDRO, from the original E2H design), fed by the per-prompt rewards of `update`.

Exact formula. Rewards are assumed to lie in [0, 1] (success rates). For each level i keep a
window W_i of the last `window_size` per-prompt rewards and the count n_i of all rewards seen;
N = sum n_i, K = number of levels.

    m_i = mean(W_i),  s_i = std(W_i)                 (0.5 and 0.5 while W_i is empty)
    d_i = 1 - m_i                                    performance deficit
    e_i = 1 / (1 + K n_i / N)                        exploration bonus (1 while N = 0)
    w_i <- w_i exp(groupdro_alpha (1 - m_i)), w <- w / sum(w)      GroupDRO, w starts uniform
    v_i = vrex_penalty_weight (mean_j m_j - m_i)     = -(K/2) dVar_j(m_j)/dm_i: sampling level i
                                                     more lowers the cross-level reward variance
    z_i = 0.3 d_i + 0.2 s_i + 0.1 e_i + 0.3 K w_i + 0.1 v_i
    q   = softmax(z / temperature)
    p'  = (1 - beta) / K + beta q                    blend with uniform
    p   = f + (1 - K f) p',  f = min(min_prob, 1/K)  floor: every p_i >= f, sum 1

p is uniform before step `warmup_steps` and is recomputed (GroupDRO step included) in `update`
once warmup is over and then every `update_period` steps, so it only moves on fresh rewards.

Differences from the original code, on purpose: its deficit 1/(m + 1e-8) and exploration
1/(frequency + 1e-8) explode to 1e8 for a level with zero reward or zero samples, which makes
the softmax one-hot; its VREx term was the same constant for every level (so it had no effect);
and its state lived on a function attribute, shared by every sampler in the process.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LevelSampler, softmax, with_floor

SCORE_WEIGHTS = {"deficit": 0.3, "std": 0.2, "explore": 0.1, "groupdro": 0.3, "vrex": 0.1}
UNSEEN_MEAN, UNSEEN_STD = 0.5, 0.5


class VarianceRegularizedSampler(LevelSampler):
    name = "variance_regularized"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        window_size: int = 100,
        min_prob: float = 0.1,
        temperature: float = 1.0,
        beta: float = 0.5,
        warmup_steps: int = 100,
        vrex_penalty_weight: float = 1.0,
        groupdro_alpha: float = 0.01,
        update_period: int = 10,
    ):
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed)
        if window_size < 1 or update_period < 1 or temperature <= 0 or not 0 <= beta <= 1 or min_prob < 0:
            raise ValueError(
                "variance_regularized needs window_size >= 1, update_period >= 1, temperature > 0, "
                f"0 <= beta <= 1, min_prob >= 0; got {window_size}, {update_period}, {temperature}, {beta}, {min_prob}"
            )
        self.window_size, self.min_prob = window_size, min_prob
        self.temperature, self.beta = temperature, beta
        self.warmup_steps, self.update_period = warmup_steps, update_period
        self.vrex_penalty_weight, self.groupdro_alpha = vrex_penalty_weight, groupdro_alpha
        K = self.n_levels
        self.windows: list[deque[float]] = [deque(maxlen=window_size) for _ in range(K)]
        self.counts = np.zeros(K, dtype=np.int64)
        self.group_weights = np.full(K, 1.0 / K)
        self.probs = np.full(K, 1.0 / K)
        self.last_recompute: int | None = None

    def _group_probs(self) -> np.ndarray:
        return self.probs

    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        for level, reward in zip(self.table.level[indices], rewards, strict=True):
            self.windows[level].append(float(reward))
            self.counts[level] += 1
        due = self.last_recompute is None or self.step - self.last_recompute >= self.update_period
        if self.step >= self.warmup_steps and due:
            self._recompute()
            self.last_recompute = self.step

    def level_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Window mean and std per level (UNSEEN_MEAN / UNSEEN_STD for levels without rewards)."""
        means = np.array([np.mean(w) if w else UNSEEN_MEAN for w in self.windows])
        stds = np.array([np.std(w) if w else UNSEEN_STD for w in self.windows])
        return means, stds

    def _recompute(self) -> None:
        K = self.n_levels
        means, stds = self.level_stats()
        total = self.counts.sum()
        explore = 1.0 / (1.0 + K * self.counts / total) if total else np.ones(K)
        self.group_weights = self.group_weights * np.exp(self.groupdro_alpha * (1.0 - means))
        self.group_weights /= self.group_weights.sum()
        vrex = self.vrex_penalty_weight * (means.mean() - means)
        scores = (
            SCORE_WEIGHTS["deficit"] * (1.0 - means)
            + SCORE_WEIGHTS["std"] * stds
            + SCORE_WEIGHTS["explore"] * explore
            + SCORE_WEIGHTS["groupdro"] * K * self.group_weights
            + SCORE_WEIGHTS["vrex"] * vrex
        )
        blended = (1 - self.beta) / K + self.beta * softmax(scores / self.temperature)
        self.probs = with_floor(blended, min(self.min_prob, 1.0 / K))

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "windows": [list(w) for w in self.windows],
            "counts": self.counts.tolist(),
            "group_weights": self.group_weights.tolist(),
            "probs": self.probs.tolist(),
            "last_recompute": self.last_recompute,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.windows = [deque(w, maxlen=self.window_size) for w in state["windows"]]
        self.counts = np.array(state["counts"], dtype=np.int64)
        self.group_weights = np.array(state["group_weights"])
        self.probs = np.array(state["probs"])
        self.last_recompute = state["last_recompute"]
