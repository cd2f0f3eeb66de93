"""Mixtures (``--task_name countdown+arithmetic+blocksworld``): one dataset, one ``source`` per task.

Rows keep their own ``task_name``, which routes each row to its task's checker in rewards.py, and
the ``source`` column names the task, which the multi-source and curriculum samplers mix over.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from itertools import zip_longest
from typing import Any

from pipeline.errors import UserError

SEPARATOR = "+"
SOURCE_STRIDE = 10**7  # above every single-task prompt id (level 4 eval ids stay below 5 * 10**6)
SOURCE_SLOTS = 10_000


def source_offset(source: str) -> int:
    """A prompt-id offset that depends on the task's name only, so ids stay the same in any mixture."""
    return (zlib.crc32(source.encode()) % SOURCE_SLOTS + 1) * SOURCE_STRIDE


def shares(num_prompts: int, parts: int) -> list[int]:
    """Prompts per part: as equal as possible, the first parts taking the remainder."""
    return [num_prompts // parts + (k < num_prompts % parts) for k in range(parts)]


def mix_rows(per_source: Mapping[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Interleave the sources' rows round-robin, with offset prompt ids and every row holding every column."""
    offsets = {source: source_offset(source) for source in per_source}
    if len(set(offsets.values())) < len(offsets):
        raise UserError(f"tasks {list(per_source)} share a prompt-id offset: list each task once")
    columns = list(dict.fromkeys(key for rows in per_source.values() for row in rows for key in row))
    mixed = []
    for batch in zip_longest(*per_source.values()):
        for source, row in zip(per_source, batch, strict=True):
            if row is not None:
                mixed.append({key: row.get(key) for key in columns}
                             | {"prompt_id": offsets[source] + int(row["prompt_id"]), "source": source})
    return mixed


def union_rewards(defaults: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Every part's default rewards; a reward several parts use keeps its largest weight."""
    weights: dict[str, float] = {}
    for part in defaults:
        for name, weight in part.items():
            weights[name] = max(weight, weights.get(name, weight))
    return weights
