"""Complexity curricula on one source of a multi-source mixture (the other sources are untouched).

The rows of `complexity_source` are sorted by their `complexity` (their `level` when a row has
none), easiest first; "the easiest X%" is the first ceil(n X / 100) of them.

- time_curriculum: only the easiest P(t)% are served, P(t) rising linearly from
  initial_complexity_percentile to final_complexity_percentile over complexity_warmup_steps
  steps (batches drawn). Newly admitted rows join the current shuffled pass.
- reward_curriculum: the easiest initial% form interval 0; the rows up to final% are cut into
  num_intervals more intervals of equal size. Interval L+1 unlocks when the reward EMA of the
  complexity source (reward_alpha; the first batch sets it) is >= reward_threshold, checked
  after exactly min_batches_per_level update calls at the current level and then every
  check_frequency calls. Within the source, unlocked intervals are sampled in proportion to
  their size (uniform over the unlocked rows) or, with focus_new_intervals, with weight
  interval_decay^(L - j) for interval j (decay 0.5, 3 unlocked: 57% / 29% / 14%).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.samplers.base import LOG, percentile_count
from pipeline.samplers.sources import MultiSourceSampler


class ComplexityCurriculum(MultiSourceSampler):
    """Shared part: which source carries the curriculum and its rows sorted easiest first."""

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        complexity_source: str | None = None,
        initial_complexity_percentile: float = 30.0,
        final_complexity_percentile: float = 100.0,
        **source_params: Any,
    ):
        if not 0 < initial_complexity_percentile <= final_complexity_percentile <= 100:
            raise ValueError(
                "need 0 < initial_complexity_percentile <= final_complexity_percentile <= 100, got "
                f"{initial_complexity_percentile} and {final_complexity_percentile}"
            )
        self.complexity_source = complexity_source
        self.initial_pct, self.final_pct = initial_complexity_percentile, final_complexity_percentile
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed, **source_params)

    def _groups(self) -> tuple[list[str], list[np.ndarray]]:
        names = self.table.source_names
        if self.complexity_source is None and len(names) == 1:
            self.complexity_source = names[0]
        if self.complexity_source not in names:
            raise ValueError(
                f"complexity_source must be one of the sources {names}, got {self.complexity_source!r}"
            )
        self.cs = names.index(self.complexity_source)
        rows = np.flatnonzero(self.table.source == self.cs)
        self.cs_order = rows[np.argsort(self.table.complexity[rows], kind="stable")]
        return super()._groups()

    def _max_complexity(self, count: int) -> float:
        return float(self.table.complexity[self.cs_order[count - 1]])


class TimeCurriculumSampler(ComplexityCurriculum):
    name = "time_curriculum"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        complexity_warmup_steps: int = 100,
        **curriculum_params: Any,
    ):
        if complexity_warmup_steps < 0:
            raise ValueError(f"complexity_warmup_steps must be >= 0, got {complexity_warmup_steps}")
        self.warmup = complexity_warmup_steps
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed, **curriculum_params)
        LOG.info(
            "[TimeCurriculumSampler] complexity curriculum on '%s': %g%% -> %g%% of %d rows over %d steps",
            self.complexity_source,
            self.initial_pct,
            self.final_pct,
            len(self.cs_order),
            self.warmup,
        )

    def percentile(self, step: int) -> float:
        """P(t): the share (in %) of the complexity source that step t may draw from."""
        progress = 1.0 if self.warmup == 0 else min(1.0, step / self.warmup)
        return self.initial_pct + (self.final_pct - self.initial_pct) * progress

    def _eligible(self, step: int) -> int:
        return percentile_count(len(self.cs_order), self.percentile(step))

    def _groups(self) -> tuple[list[str], list[np.ndarray]]:
        keys, members = super()._groups()
        members[self.cs] = self.cs_order[: self._eligible(0)]
        return keys, members

    def next_batch(self) -> list[int]:
        self._admit()
        return super().next_batch()

    def _admit(self) -> None:
        """Grow the complexity source's pool to the rows this step may draw from."""
        pool, count = self.pools[self.cs], self._eligible(self.step)
        if count <= len(pool):
            return
        pool.extend(self.cs_order[len(pool) : count], self.rng)
        pct = self.percentile(self.step)
        if pct // 10 > self.percentile(self.step - 1) // 10:
            LOG.info(
                "[TimeCurriculumSampler] step %d: complexity %.0f%% of '%s' (%d/%d rows, complexity <= %.3f)",
                self.step,
                pct,
                self.complexity_source,
                count,
                len(self.cs_order),
                self._max_complexity(count),
            )


class RewardCurriculumSampler(ComplexityCurriculum):
    name = "reward_curriculum"

    def __init__(
        self,
        rows: Sequence[dict[str, Any]],
        *,
        batch_size: int,
        total_steps: int,
        seed: int = 0,
        reward_threshold: float,
        num_intervals: int = 10,
        reward_alpha: float = 0.1,
        min_batches_per_level: int = 10,
        check_frequency: int = 3,
        focus_new_intervals: bool = False,
        interval_decay: float = 0.5,
        **curriculum_params: Any,
    ):
        if num_intervals < 0 or not 0 < reward_alpha <= 1 or min_batches_per_level < 0 or check_frequency < 1:
            raise ValueError(
                "reward_curriculum needs num_intervals >= 0, 0 < reward_alpha <= 1, min_batches_per_level >= 0, "
                f"check_frequency >= 1; got {num_intervals}, {reward_alpha}, {min_batches_per_level}, {check_frequency}"
            )
        if not 0 < interval_decay <= 1:
            raise ValueError(f"interval_decay must be in (0, 1], got {interval_decay}")
        self.reward_threshold, self.reward_alpha = reward_threshold, reward_alpha
        self.num_intervals = num_intervals
        self.min_batches, self.check_frequency = min_batches_per_level, check_frequency
        self.focus, self.decay = focus_new_intervals, interval_decay
        self.level, self.batches_at_level = 0, 0
        self.curriculum_ema: float | None = None
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed, **curriculum_params)
        self._log_intervals()

    def _groups(self) -> tuple[list[str], list[np.ndarray]]:
        keys, members = super()._groups()
        n = len(self.cs_order)
        first, last = percentile_count(n, self.initial_pct), percentile_count(n, self.final_pct)
        cuts = np.concatenate([[0], np.linspace(first, last, self.num_intervals + 1).round().astype(int)])
        self.interval_bounds = cuts
        intervals = [self.cs_order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        others = [s for s in range(len(keys)) if s != self.cs]
        cs_key = keys[self.cs]
        return (
            [keys[s] for s in others] + [f"{cs_key}/interval_{j}" for j in range(len(intervals))],
            [members[s] for s in others] + intervals,
        )

    def interval_shares(self) -> np.ndarray:
        """How the complexity source's weight splits over its intervals (locked ones get 0)."""
        sizes = np.diff(self.interval_bounds).astype(float)
        unlocked = np.arange(len(sizes)) <= self.level
        raw = np.where(unlocked, sizes, 0.0)
        if self.focus:
            raw = np.where(raw > 0, self.decay ** (self.level - np.arange(len(sizes))), 0.0)
        return raw / raw.sum()

    def _group_probs(self) -> np.ndarray:
        others = np.delete(self.weights, self.cs)
        return np.concatenate([others, self.weights[self.cs] * self.interval_shares()])

    def unlocked_rows(self) -> int:
        return int(self.interval_bounds[self.level + 1])

    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        super()._observe(indices, rewards)
        mine = self.table.source[indices] == self.cs
        if mine.any():
            mean = float(rewards[mine].mean())
            ema, a = self.curriculum_ema, self.reward_alpha
            self.curriculum_ema = mean if ema is None else (1 - a) * ema + a * mean
        self.batches_at_level += 1
        due = (
            self.batches_at_level >= self.min_batches
            and (self.batches_at_level - self.min_batches) % self.check_frequency == 0
        )
        ready = self.curriculum_ema is not None and self.curriculum_ema >= self.reward_threshold
        if due and ready and self.level < self.num_intervals:
            before = self.unlocked_rows()
            self.level += 1
            self.batches_at_level = 0
            LOG.info(
                "[RewardCurriculumSampler] LEVEL UP %d -> %d at batch %d: reward EMA %.3f >= %g; "
                "'%s' rows %d -> %d (complexity <= %.3f)",
                self.level - 1,
                self.level,
                self.n_updates,
                self.curriculum_ema,
                self.reward_threshold,
                self.complexity_source,
                before,
                self.unlocked_rows(),
                self._max_complexity(self.unlocked_rows()),
            )

    def _log_intervals(self) -> None:
        LOG.info(
            "[RewardCurriculumSampler] complexity source '%s': initial %g%%, final %g%%, %d intervals "
            "(1 initial + %d progressive), unlock at reward EMA >= %g",
            self.complexity_source,
            self.initial_pct,
            self.final_pct,
            self.num_intervals + 1,
            self.num_intervals,
            self.reward_threshold,
        )
        for j, (a, b) in enumerate(zip(self.interval_bounds[:-1], self.interval_bounds[1:], strict=True)):
            if b > a:
                low, high = self.table.complexity[self.cs_order[[a, b - 1]]]
                LOG.info("  interval %d: %d rows, complexity [%.3f, %.3f]", j, b - a, low, high)
            else:
                LOG.info("  interval %d: empty (too few rows for %d intervals)", j, self.num_intervals)

    def _state(self) -> dict[str, Any]:
        return {
            **super()._state(),
            "level": self.level,
            "batches_at_level": self.batches_at_level,
            "curriculum_ema": self.curriculum_ema,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.level = int(state["level"])
        self.batches_at_level = int(state["batches_at_level"])
        self.curriculum_ema = state["curriculum_ema"]
