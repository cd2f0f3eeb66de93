"""Task registry: procedural tasks by name, or a path to a user JSONL/parquet dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.tasks.base import EVAL_OFFSET, HELDOUT_LEVEL, TRAIN_LEVELS, ProceduralTask, spread_over_levels
from pipeline.tasks.reasoning_gym_tasks import ArithmeticTask, CountdownTask
from pipeline.tasks.user_dataset import load_user_dataset

TASKS: dict[str, type[ProceduralTask]] = {"countdown": CountdownTask, "arithmetic": ArithmeticTask}
DEFAULT_REWARDS: dict[str, dict[str, float]] = {
    "countdown": {"correct": 1.0, "format": 0.1, "valid_expression": 0.0, "uses_numbers": 0.0},
    "arithmetic": {"correct": 1.0, "format": 0.1},
}
USER_DATASET_REWARDS = {"correct": 1.0, "format": 0.1}


def is_user_dataset(task_name: str) -> bool:
    return Path(task_name).suffix in (".jsonl", ".json", ".parquet")


def task_slug(task_name: str) -> str:
    return Path(task_name).stem if is_user_dataset(task_name) else task_name


def get_task(task_name: str, seed: int = 0) -> ProceduralTask:
    if task_name not in TASKS:
        raise UserError(f"unknown task '{task_name}': choose one of {', '.join(TASKS)} or a .jsonl/.parquet path")
    return TASKS[task_name](name=task_name, default_rewards=DEFAULT_REWARDS[task_name], seed=seed)


def default_rewards(task_name: str) -> dict[str, float]:
    return USER_DATASET_REWARDS if is_user_dataset(task_name) else get_task(task_name).default_rewards


def build_rows(task_name: str, num_prompts: int, levels: Sequence[int], split: str = "train",
               data_seed: int = 0) -> list[dict[str, Any]]:
    """The prompts of a run: procedural rows spread over levels, or a user file filtered by level."""
    if is_user_dataset(task_name):
        rows = [r for r in load_user_dataset(task_name) if r["level"] in levels]
        if not rows:
            raise UserError(f"dataset '{task_name}' has no rows at levels {list(levels)}: check --levels")
        return rows[:num_prompts]
    task = get_task(task_name, seed=data_seed)
    bad = [lv for lv in levels if lv not in task.levels]
    if bad:
        raise UserError(f"task '{task_name}' has no level(s) {bad}: choose from {list(task.levels)}")
    return spread_over_levels(task, num_prompts, levels, start=EVAL_OFFSET if split == "eval" else 0)


__all__ = ["TASKS", "TRAIN_LEVELS", "HELDOUT_LEVEL", "build_rows", "default_rewards", "get_task", "task_slug"]
