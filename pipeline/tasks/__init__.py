"""Task registry: procedural tasks by name, a user JSONL/parquet dataset, ``math:PATH``, or a
mixture of any of these joined with ``+`` (``countdown+arithmetic+blocksworld``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.tasks.base import EVAL_OFFSET, HELDOUT_LEVEL, TRAIN_LEVELS, ProceduralTask, spread_over_levels
from pipeline.tasks.blocksworld import BlocksWorldTask
from pipeline.tasks.coding import CodingTask
from pipeline.tasks.credit import CreditTask
from pipeline.tasks.math_task import MathFileTask, MathProceduralTask
from pipeline.tasks.mixed import SEPARATOR, mix_rows, shares, union_rewards
from pipeline.tasks.reasoning_gym_tasks import ArithmeticTask, CountdownTask
from pipeline.tasks.user_dataset import load_user_dataset

TASKS: dict[str, type[ProceduralTask]] = {
    "countdown": CountdownTask,
    "arithmetic": ArithmeticTask,
    "blocksworld": BlocksWorldTask,
    "math": MathFileTask,
    "math_procedural": MathProceduralTask,
    "coding": CodingTask,
    "credit": CreditTask,
}
DEFAULT_REWARDS: dict[str, dict[str, float]] = {
    "countdown": {"correct": 1.0, "format": 0.1, "valid_expression": 0.0, "uses_numbers": 0.0},
    "arithmetic": {"correct": 1.0, "format": 0.1},
    "blocksworld": {"correct": 1.0, "format": 0.1, "valid_moves": 0.0, "optimality": 0.0},
    "math": {"correct": 1.0, "format": 0.1},
    "math_procedural": {"correct": 1.0, "format": 0.1},
    "coding": {"tests_passed": 1.0, "code_format": 0.1},
    "credit": {"credit": 1.0},
}
USER_DATASET_REWARDS = {"correct": 1.0, "format": 0.1}
MATH_FILE_PREFIX = "math:"  # math:PATH = the math task on a user's GSM8K/MATH-style file


def is_user_dataset(task_name: str) -> bool:
    return not task_name.startswith(MATH_FILE_PREFIX) and Path(task_name).suffix in (".jsonl", ".json", ".parquet")


def mixture_parts(task_name: str) -> list[str]:
    """The tasks of a mixture; a single task (or an existing file whose name has a '+') is one part."""
    if SEPARATOR not in task_name or Path(task_name.removeprefix(MATH_FILE_PREFIX)).is_file():
        return [task_name]
    return [part.strip() for part in task_name.split(SEPARATOR)]


def task_slug(task_name: str) -> str:
    parts = mixture_parts(task_name)
    if len(parts) > 1:
        return SEPARATOR.join(task_slug(part) for part in parts)
    if task_name.startswith(MATH_FILE_PREFIX):
        return f"math-{Path(task_name.removeprefix(MATH_FILE_PREFIX)).stem}"
    return Path(task_name).stem if is_user_dataset(task_name) else task_name


def get_task(task_name: str, seed: int = 0) -> ProceduralTask:
    if task_name.startswith(MATH_FILE_PREFIX):
        return MathFileTask(name="math", default_rewards=DEFAULT_REWARDS["math"], seed=seed,
                            path=task_name.removeprefix(MATH_FILE_PREFIX))
    if task_name not in TASKS:
        raise UserError(f"unknown task '{task_name}': choose one of {', '.join(TASKS)}, math:PATH, "
                        "a .jsonl/.parquet path, or several joined with '+'")
    return TASKS[task_name](name=task_name, default_rewards=DEFAULT_REWARDS[task_name], seed=seed)


def default_rewards(task_name: str) -> dict[str, float]:
    """A task's default reward weights; a mixture's are the union of its parts'."""
    parts = mixture_parts(task_name)
    if len(parts) > 1:
        return union_rewards([default_rewards(part) for part in parts])
    return USER_DATASET_REWARDS if is_user_dataset(task_name) else get_task(task_name).default_rewards


def _single_task_rows(task_name: str, num_prompts: int, levels: Sequence[int], split: str,
                      data_seed: int) -> list[dict[str, Any]]:
    if is_user_dataset(task_name):
        rows = [r for r in load_user_dataset(task_name) if r["level"] in levels]
        if not rows:
            raise UserError(f"dataset '{task_name}' has no rows at levels {list(levels)}: check --levels")
        return rows[:num_prompts]
    task = get_task(task_name, seed=data_seed)
    bad = [lv for lv in levels if lv not in task.levels]
    if bad:
        raise UserError(f"task '{task_name}' has no level(s) {bad}: choose from {list(task.levels)}")
    if isinstance(task, MathFileTask):
        return task.select(num_prompts, levels, split)
    return spread_over_levels(task, num_prompts, levels, start=EVAL_OFFSET if split == "eval" else 0)


def build_rows(task_name: str, num_prompts: int, levels: Sequence[int], split: str = "train",
               data_seed: int = 0) -> list[dict[str, Any]]:
    """The prompts of a run: procedural rows spread over levels, a file filtered by level, or a
    mixture whose parts share ``num_prompts`` and alternate row by row."""
    parts = mixture_parts(task_name)
    if len(parts) == 1:
        return _single_task_rows(task_name, num_prompts, levels, split, data_seed)
    sources = [task_slug(part) for part in parts]
    if len(set(sources)) < len(sources) or "" in parts:
        raise UserError(f"--task_name '{task_name}': list each task once, joined with '+'")
    return mix_rows({source: _single_task_rows(part, share, levels, split, data_seed)
                     for source, part, share in zip(sources, parts, shares(num_prompts, len(parts)), strict=True)
                     if share})


__all__ = ["TASKS", "TRAIN_LEVELS", "HELDOUT_LEVEL", "build_rows", "default_rewards", "get_task", "is_user_dataset",
           "mixture_parts", "task_slug"]
