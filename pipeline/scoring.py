"""Apply named, weighted reward functions to a batch; a failing function never crashes the run."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import UserError

log = logging.getLogger(__name__)
RewardFn = Callable[..., list[float]]


def reward_registry() -> dict[str, RewardFn]:
    import rewards  # the user-editable module at the repository root

    return rewards.REWARDS


def parse_reward_weights(spec: str | Mapping[str, float] | None, default: Mapping[str, float]) -> dict[str, float]:
    """``"correct=1,format=0.1"`` (or a mapping, or None for the task default) -> validated weights."""
    if spec is None or spec == "":
        weights = dict(default)
    elif isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    else:
        weights = {}
        for part in spec.split(","):
            name, _, value = part.partition("=")
            try:
                weights[name.strip()] = float(value) if value else 1.0
            except ValueError as err:
                raise UserError(f"--rewards: '{part}' is not name=weight (e.g. correct=1,format=0.1)") from err
    known = reward_registry()
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise UserError(f"--rewards: unknown reward(s) {', '.join(unknown)}; rewards.py has {', '.join(known)}")
    return weights


@dataclass
class RewardBatch:
    per_function: dict[str, np.ndarray]
    total: np.ndarray
    failures: dict[str, int] = field(default_factory=dict)


def _call_rowwise(name: str, fn: RewardFn, prompts, completions, columns) -> tuple[list[float], int]:
    values, failed = [], 0
    for i in range(len(completions)):
        try:
            value = float(fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})[0])
        except Exception as err:  # noqa: BLE001 - user code; recorded, not fatal
            log.warning("reward '%s' raised %s on row %d: %s", name, type(err).__name__, i, err)
            value = math.nan
        failed += not math.isfinite(value)
        values.append(value)
    return values, failed


def score(weights: Mapping[str, float], prompts: Sequence[str], completions: Sequence[str],
          columns: Mapping[str, Sequence[Any]]) -> RewardBatch:
    """Score a batch; rows where a function raises or returns NaN get NaN there and are counted."""
    registry = reward_registry()
    per_function, failures = {}, {}
    for name in weights:
        try:
            values = [float(v) for v in registry[name](list(prompts), list(completions), **columns)]
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
            failed = sum(not math.isfinite(v) for v in values)
        except Exception:  # noqa: BLE001 - retry row by row to isolate the failing rows
            values, failed = _call_rowwise(name, registry[name], prompts, completions, columns)
        if failed:
            failures[name] = failed
            log.warning("reward '%s' failed on %d of %d completions (recorded as NaN)", name, failed, len(values))
        per_function[name] = np.asarray(values, dtype=np.float64)
    total = sum((w * per_function[n] for n, w in weights.items()), np.zeros(len(completions)))
    return RewardBatch(per_function, total, failures)
