"""What a task is: rows of (question, answer, level, source, extra columns) with stable prompt ids.

Prompt ids encode (level, index) so a prompt keeps its id across runs, shards and stages; the
training split uses indices below ``EVAL_OFFSET`` and held-out evaluation the ones above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

LEVEL_STRIDE = 1_000_000
EVAL_OFFSET = 500_000
TRAIN_LEVELS = (0, 1, 2, 3)
HELDOUT_LEVEL = 4


def prompt_id_of(level: int, index: int) -> int:
    return level * LEVEL_STRIDE + index


@dataclass
class ProceduralTask:
    """A generator with difficulty levels; subclasses implement ``make_row(level, index)``."""

    name: str
    default_rewards: dict[str, float]
    levels: Sequence[int] = field(default=(*TRAIN_LEVELS, HELDOUT_LEVEL))
    seed: int = 0

    def make_row(self, level: int, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def rows(self, level: int, start: int, count: int) -> list[dict[str, Any]]:
        if level not in self.levels:
            raise ValueError(f"level {level} not in {list(self.levels)}")
        out = []
        for index in range(start, start + count):
            row = self.make_row(level, index)
            out.append({"prompt_id": prompt_id_of(level, index), "level": level, "source": self.name,
                        "task_name": self.name, "complexity": float(level), **row})
        return out


def spread_over_levels(task: ProceduralTask, num_prompts: int, levels: Sequence[int], start: int = 0) -> list[dict]:
    """Round-robin ``num_prompts`` over ``levels`` so every level gets its share in order."""
    rows = []
    for i in range(num_prompts):
        level = levels[i % len(levels)]
        rows.extend(task.rows(level, start + i // len(levels), 1))
    return rows
