"""multi_source: mix data sources with fixed weights, or adaptive ones that favour the sources the
policy currently does worst on. The curriculum samplers in complexity.py build on this class.

Fixed: w_s = source_weights[s] (sampling_strategy="weighted", equal when not given) or
w_s ~ number of rows of s ("proportional"), normalised.
Adaptive (adaptive_weights=True): every source keeps a reward EMA r_s <- (1 - alpha) r_s +
alpha * (mean reward of s in the batch), the first batch setting it; a source not seen yet counts
as the mean of the seen ones. Every `update_frequency` update calls

    w_s ~ base_s exp(-r_s / temperature)            (softmax of negative reward, times the fixed weight)
    w_s <- max(w_s, max_t w_t / max_source_ratio)   then normalised, so max/min <= max_source_ratio

Sources with base weight 0 stay at 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LOG, GroupSampler, softmax

STRATEGIES = ("weighted", "proportional")


def bound_ratio(weights: np.ndarray, max_ratio: float) -> np.ndarray:
    """Raise the small positive weights to max/max_ratio and normalise: max/min <= max_ratio."""
    out = weights.copy()
    positive = out > 0
    out[positive] = np.maximum(out[positive], out.max() / max_ratio)
    return out / out.sum()


class MultiSourceSampler(GroupSampler):
    name = "multi_source"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        sampling_strategy: str = "weighted",
        source_weights: Mapping[str, float] | None = None,
        adaptive_weights: bool = False,
        alpha: float = 0.1,
        temperature: float = 1.0,
        update_frequency: int = 5,
        max_source_ratio: float = 3.0,
    ):
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed)
        if not 0 < alpha <= 1 or temperature <= 0 or update_frequency < 1 or max_source_ratio < 1:
            raise ValueError(
                "multi-source samplers need 0 < alpha <= 1, temperature > 0, update_frequency >= 1, "
                f"max_source_ratio >= 1; got {alpha}, {temperature}, {update_frequency}, {max_source_ratio}"
            )
        self.adaptive, self.alpha, self.temperature = adaptive_weights, alpha, temperature
        self.update_frequency, self.max_source_ratio = update_frequency, max_source_ratio
        self.base_weights = self._base_weights(sampling_strategy, source_weights)
        self.weights = (
            bound_ratio(self.base_weights, max_source_ratio) if self.adaptive else self.base_weights
        )
        self.reward_ema = np.full(len(self.table.source_names), np.nan)
        self.n_updates = 0
        self._set_groups(*self._groups())
        sizes = np.bincount(self.table.source, minlength=len(self.weights))
        LOG.info(
            "[%s] %s, %s weights, %d sources, batch %d: %s",
            type(self).__name__,
            sampling_strategy,
            "adaptive" if self.adaptive else "fixed",
            len(self.weights),
            batch_size,
            ", ".join(
                f"{s} {n} rows w={w:.3f}"
                for s, n, w in zip(self.table.source_names, sizes, self.weights, strict=True)
            ),
        )
        if self.adaptive:
            LOG.info(
                "[%s] adaptive: alpha=%g, update every %d batches, temperature=%g, max/min weight <= %g",
                type(self).__name__,
                alpha,
                update_frequency,
                temperature,
                max_source_ratio,
            )

    def _base_weights(self, strategy: str, source_weights: Mapping[str, float] | None) -> np.ndarray:
        names = self.table.source_names
        if strategy not in STRATEGIES:
            raise ValueError(f"sampling_strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "proportional":
            if source_weights:
                raise ValueError("source_weights is only used with sampling_strategy='weighted'")
            weights = np.bincount(self.table.source, minlength=len(names)).astype(float)
        elif source_weights:
            unknown = sorted(set(source_weights) - set(names))
            missing = [s for s in names if s not in source_weights]
            if unknown or missing:
                raise ValueError(
                    f"source_weights must name every source exactly: sources are {names}; "
                    f"unknown {unknown}, missing {missing}"
                )
            weights = np.array([float(source_weights[s]) for s in names])
        else:
            weights = np.ones(len(names))
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"source weights must be >= 0 with a positive sum, got {weights.tolist()}")
        return weights / weights.sum()

    def _groups(self) -> tuple[list[str], list[np.ndarray]]:
        """One group per source (the curriculum samplers restrict or split the complexity source)."""
        members = [np.flatnonzero(self.table.source == s) for s in range(len(self.table.source_names))]
        return self.table.source_keys, members

    def _group_probs(self) -> np.ndarray:
        return self.weights

    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        self.n_updates += 1
        if not self.adaptive:
            return
        sources = self.table.source[indices]
        for s in np.unique(sources):
            mean = rewards[sources == s].mean()
            old = self.reward_ema[s]
            self.reward_ema[s] = mean if np.isnan(old) else (1 - self.alpha) * old + self.alpha * mean
        if self.n_updates % self.update_frequency == 0 and not np.all(np.isnan(self.reward_ema)):
            self._adapt()

    def _adapt(self) -> None:
        ema = np.where(np.isnan(self.reward_ema), np.nanmean(self.reward_ema), self.reward_ema)
        used = self.base_weights > 0
        weights = np.zeros_like(self.base_weights)
        weights[used] = softmax(np.log(self.base_weights[used]) - ema[used] / self.temperature)
        self.weights = bound_ratio(weights, self.max_source_ratio)
        positive = self.weights[used]
        LOG.info(
            "[%s] batch %d weights: %s (max/min %.2fx)",
            type(self).__name__,
            self.n_updates,
            ", ".join(
                f"{s} reward_ema={e:.3f} w={w:.3f}"
                for s, e, w in zip(self.table.source_names, ema, self.weights, strict=True)
            ),
            positive.max() / positive.min(),
        )

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "weights": self.weights.tolist(),
            "reward_ema": [None if np.isnan(e) else float(e) for e in self.reward_ema],
            "n_updates": self.n_updates,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.weights = np.array(state["weights"])
        self.reward_ema = np.array([np.nan if e is None else e for e in state["reward_ema"]], dtype=float)
        self.n_updates = int(state["n_updates"])
