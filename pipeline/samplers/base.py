"""What every sampler shares: the row table, the shuffled per-group row pools, the step counter,
the seeded RNG and a JSON-serialisable state.

A *group* is the unit a mixture is defined over (a level, a source, an interval of a source).
Each batch slot draws a group from the mixture, then the next row of that group's shuffled
pool; a pool that runs out is reshuffled, so no row repeats within one pass over its group.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

LOG = logging.getLogger("pipeline.samplers")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def with_floor(probs: np.ndarray, floor: float) -> np.ndarray:
    """p_i = floor + (1 - K floor) q_i: every entry >= floor and the sum stays 1 (needs K floor <= 1)."""
    if len(probs) * floor > 1 + 1e-12:
        raise ValueError(f"a floor of {floor} on {len(probs)} groups exceeds total probability 1")
    return floor + (1.0 - len(probs) * floor) * probs


def percentile_count(n: int, percentile: float) -> int:
    """How many of n rows (sorted easiest first) make up `percentile` percent; at least one."""
    return max(1, min(n, math.ceil(n * percentile / 100.0 - 1e-9)))


class RowTable:
    """The per-row fields the samplers read, as arrays; groups are indexed 0..K-1 in sorted order."""

    def __init__(self, rows: Sequence[dict[str, Any]]):
        if len(rows) == 0:
            raise ValueError("rows is empty: a sampler needs at least one dataset row")
        levels, sources, complexity = [], [], []
        for i, row in enumerate(rows):
            level, source = row.get("level"), row.get("source")
            if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
                raise ValueError(f"row {i} needs an int 'level', got {level!r}")
            if not isinstance(source, str):
                raise ValueError(f"row {i} needs a str 'source', got {source!r}")
            levels.append(int(level))
            sources.append(source)
            c = row.get("complexity")
            complexity.append(float(level if c is None else c))
        self.n = len(rows)
        self.level_values, self.level = np.unique(np.array(levels), return_inverse=True)
        self.source_names, self.source = np.unique(np.array(sources), return_inverse=True)
        self.source_names = [str(s) for s in self.source_names]
        self.complexity = np.array(complexity)

    @property
    def level_keys(self) -> list[str]:
        return [f"level_{v}" for v in self.level_values]

    @property
    def source_keys(self) -> list[str]:
        return [f"source_{s}" for s in self.source_names]


class RowPool:
    """Row indices of one group, served in shuffled passes."""

    def __init__(self, rows: np.ndarray, rng: np.random.Generator):
        self.order = rng.permutation(np.asarray(rows, dtype=np.int64))
        self.pos = 0

    def __len__(self) -> int:
        return len(self.order)

    def take(self, rng: np.random.Generator) -> int:
        if self.pos == len(self.order):
            self.order = rng.permutation(self.order)
            self.pos = 0
        self.pos += 1
        return int(self.order[self.pos - 1])

    def extend(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        """Add rows to the unserved part of the current pass, so the pass still has no repeats."""
        rest = np.concatenate([self.order[self.pos :], np.asarray(rows, dtype=np.int64)])
        self.order = np.concatenate([self.order[: self.pos], rng.permutation(rest)])

    def state(self) -> dict[str, Any]:
        return {"order": self.order.tolist(), "pos": self.pos}

    def load(self, state: dict[str, Any]) -> None:
        self.order = np.array(state["order"], dtype=np.int64)
        self.pos = int(state["pos"])


class Sampler(ABC):
    """The interface: next_batch / update / probabilities / state_dict / load_state_dict."""

    name: ClassVar[str]

    def __init__(self, rows: Sequence[dict[str, Any]], *, batch_size: int, total_steps: int, seed: int = 0):
        if batch_size < 1 or total_steps < 1:
            raise ValueError(f"batch_size and total_steps must be >= 1, got {batch_size} and {total_steps}")
        self.table = RowTable(rows)
        self.batch_size = int(batch_size)
        self.total_steps = int(total_steps)
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def next_batch(self) -> list[int]:
        """Row indices for the current step; advances the step."""
        batch = self._draw(self.batch_size)
        self.step += 1
        return [int(i) for i in batch]

    def update(self, indices: Sequence[int], rewards: Sequence[float]) -> None:
        """Feed back the mean reward of each sampled prompt (same order as indices)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rew = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if len(idx) != len(rew):
            raise ValueError(f"update got {len(idx)} indices but {len(rew)} rewards")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.table.n):
            raise ValueError(f"update got a row index outside [0, {self.table.n})")
        if not np.all(np.isfinite(rew)):
            raise ValueError("update got a non-finite reward")
        self._observe(idx, rew)

    @abstractmethod
    def probabilities(self) -> dict[str, float]:
        """The mixture the next batch is drawn from, e.g. {"level_0": 0.7, "level_1": 0.3}."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "sampler": self.name,
            "n_rows": self.table.n,
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            **self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sampler") != self.name or state.get("n_rows") != self.table.n:
            raise ValueError(
                f"state is for sampler {state.get('sampler')!r} over {state.get('n_rows')} rows, "
                f"not {self.name!r} over {self.table.n} rows"
            )
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]
        self._load_state(state)

    @abstractmethod
    def _observe(self, indices: np.ndarray, rewards: np.ndarray) -> None:
        """Take in one batch of (already validated) per-prompt rewards."""

    @abstractmethod
    def _draw(self, n: int) -> list[int]: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...


class GroupSampler(Sampler):
    """A sampler whose mixture is over groups of rows; subclasses call _set_groups and give _group_probs."""

    def _set_groups(self, keys: list[str], members: list[np.ndarray]) -> None:
        self.group_keys = keys
        self.pools = [RowPool(m, self.rng) for m in members]

    @abstractmethod
    def _group_probs(self) -> np.ndarray:
        """Probability of each group (aligned with group_keys) for the current step."""

    def probabilities(self) -> dict[str, float]:
        return dict(zip(self.group_keys, self._group_probs().tolist(), strict=True))

    def _draw(self, n: int) -> list[int]:
        probs = self._group_probs()
        groups = self.rng.choice(len(probs), size=n, p=probs / probs.sum())
        return [self.pools[g].take(self.rng) for g in groups]

    def _state(self) -> dict[str, Any]:
        return {"pools": [pool.state() for pool in self.pools]}

    def _load_state(self, state: dict[str, Any]) -> None:
        for pool, pool_state in zip(self.pools, state["pools"], strict=True):
            pool.load(pool_state)


class LevelSampler(GroupSampler):
    """Groups are the difficulty levels (sorted, keyed "level_<value>")."""

    def __init__(self, rows: Sequence[dict[str, Any]], *, batch_size: int, total_steps: int, seed: int = 0):
        super().__init__(rows, batch_size=batch_size, total_steps=total_steps, seed=seed)
        self.n_levels = len(self.table.level_values)
        members = [np.flatnonzero(self.table.level == k) for k in range(self.n_levels)]
        self._set_groups(self.table.level_keys, members)
