"""Stage-3 checkpoints, for every Fabric strategy.

A checkpoint is ``checkpoints/step-NNNNNN.ckpt``: one file (single process, DDP) or, under FSDP, a
directory of per-rank shards plus ``meta.pt``. Both are written under a hidden temporary name and
renamed by rank 0, so a crash never leaves a half-written newest checkpoint; the oldest beyond the
newest ``keep`` (``--save_total_limit``) are removed, files and directories alike.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_GLOB = "step-*.ckpt"
KEEP_CHECKPOINTS = 2


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob(CKPT_GLOB))
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Plain tensors, lists and ints only: checkpoints load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


def remove(path: Path) -> None:
    """Delete a checkpoint, file or directory of shards."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prune(folder: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    for old in sorted(folder.glob(CKPT_GLOB))[:-keep]:
        remove(old)


def save_checkpoint(fabric, folder: Path, step: int, state: dict[str, Any], keep: int = KEEP_CHECKPOINTS,
                    before_publish: Callable[[], None] = lambda: None) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (all ranks call: FSDP ranks write their shards).

    ``before_publish`` runs on rank 0 once every shard is written, before the checkpoint takes its name.
    """
    path = folder / f"step-{step:06d}.ckpt"
    tmp = folder / f".{path.name}.tmp"
    fabric.save(tmp, state)
    fabric.barrier()
    if fabric.is_global_zero:
        before_publish()
        remove(path)  # a second save of the same step (a preemption right after a scheduled save)
        tmp.replace(path)
        prune(folder, keep)
    fabric.barrier()
    return path
