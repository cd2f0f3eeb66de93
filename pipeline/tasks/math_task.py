"""Math word problems, checked with math-verify: a file of problems, or reasoning-gym's GSM-Symbolic.

``math`` reads a JSONL/parquet file (``question``, ``answer``, optional int ``level`` 0..4): the
bundled sample by default, a user's GSM8K/MATH-style file with ``math:PATH``. Gold answers may be
plain numbers, LaTeX/``\\boxed{}`` solutions, or GSM8K solutions ending in ``#### 72``.
``math_procedural`` draws GSM-Symbolic problems; a level is the number of calculation steps in the
template's worked solution (2, 3, 4, 5 for levels 0-3; 6+ for held-out level 4).
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import reasoning_gym
from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok as GSM_TEMPLATES

from pipeline.errors import UserError
from pipeline.tasks.base import EVAL_OFFSET, HELDOUT_LEVEL, ProceduralTask
from pipeline.tasks.user_dataset import load_user_dataset

log = logging.getLogger(__name__)
BUNDLED = Path(__file__).parent / "data" / "math_sample.jsonl"
INSTRUCTION = (" Show brief reasoning, then give only the final answer inside <answer></answer>, "
               "for example <answer>42</answer>.")
EVAL_EVERY = 4  # every 4th problem of a level in a file is kept for evaluation


def final_answer(gold: str) -> str:
    """GSM8K golds end in '#### 72': keep 72 (readable in the dump); math-verify reads the rest as is."""
    return gold.rsplit("####", 1)[-1].strip()


@cache
def _file_pools(path: str) -> dict[tuple[int, bool], list[dict[str, Any]]]:
    """(level, is_eval) -> problems in file order."""
    pools: dict[tuple[int, bool], list[dict[str, Any]]] = defaultdict(list)
    position: dict[int, int] = defaultdict(int)
    for row in load_user_dataset(path):
        level = int(row["level"])
        pools[level, position[level] % EVAL_EVERY == EVAL_EVERY - 1].append(row)
        position[level] += 1
    return dict(pools)


@dataclass
class MathFileTask(ProceduralTask):
    """Problems of one file; index i of a level is its i-th training (or, past EVAL_OFFSET, eval) problem."""

    path: str = str(BUNDLED)

    def make_row(self, level: int, index: int) -> dict[str, Any]:
        is_eval = index >= EVAL_OFFSET
        row = _file_pools(self.path)[level, is_eval][index - EVAL_OFFSET if is_eval else index]
        return {"question": str(row["question"]) + INSTRUCTION, "answer": final_answer(str(row["answer"]))}

    def select(self, num_prompts: int, levels: Sequence[int], split: str) -> list[dict[str, Any]]:
        """Round-robin over levels like a procedural task, but a file runs out: take what there is."""
        is_eval = split == "eval"
        sizes = {level: len(_file_pools(self.path).get((level, is_eval), [])) for level in levels}
        rows: list[dict[str, Any]] = []
        for position in range(max(sizes.values(), default=0)):
            for level in levels:
                if position < sizes[level] and len(rows) < num_prompts:
                    rows.extend(self.rows(level, position + (EVAL_OFFSET if is_eval else 0), 1))
        if not rows:
            raise UserError(f"math data '{self.path}' has no {split} problems at levels {list(levels)}: check --levels")
        if len(rows) < num_prompts:
            log.warning("math data '%s' has %d %s problems at levels %s (asked for %d)", self.path, len(rows),
                        split, list(levels), num_prompts)
        return rows


def solution_steps(cot: str) -> int:
    """Calculation steps of a GSM-Symbolic worked solution: one '=' per step."""
    return cot.count("=")


@cache
def _gsm_generators() -> dict[int, Any]:
    return reasoning_gym.create_dataset("gsm_symbolic", seed=0, size=1).generators


@cache
def _templates_by_level() -> dict[int, list[tuple[int, int]]]:
    """level -> (template id, steps); a template's step count is the same for every draw."""
    levels: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for template in GSM_TEMPLATES:
        steps = solution_steps(_gsm_generators()[template](random.Random(0), 1.0)["metadata"]["answer_cot"])
        levels[min(max(steps - 2, 0), HELDOUT_LEVEL)].append((template, steps))
    return dict(levels)


@dataclass
class MathProceduralTask(ProceduralTask):
    def make_row(self, level: int, index: int) -> dict[str, Any]:
        rng = random.Random(f"{self.seed}/{level}/{index}")
        template, steps = rng.choice(_templates_by_level()[level])
        item = _gsm_generators()[template](rng, 1.0)
        return {"question": item["question"] + INSTRUCTION, "answer": str(item["answer"]),
                "complexity": float(steps)}
