"""Stage-3 checkpoints, for every Fabric strategy.

A checkpoint is ``checkpoints/step-NNNNNN.ckpt``: one file (single process, DDP) or, under FSDP, a
directory of per-rank shards plus ``meta.pt``. Both are written under a hidden temporary name and
renamed by rank 0, so a crash never leaves a half-written newest checkpoint; the oldest beyond the
newest ``keep`` (``--save_total_limit``) are removed, files and directories alike.

``--save_only_model`` (transformers' ``save_only_model``) keeps only the policy, the step and the
arguments (``MODEL_ONLY_KEYS``), marked ``model_only``: a fraction of the size (no AdamW moments),
but such a checkpoint cannot be resumed, and ``check_resumable`` refuses it.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError

CKPT_GLOB = "step-*.ckpt"
KEEP_CHECKPOINTS = 2
MODEL_ONLY_KEYS = ("policy", "step", "args")
MODEL_ONLY = "model_only"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob(CKPT_GLOB))
    return found[-1] if found else None


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's entries, tensors memory-mapped (a sharded checkpoint: its ``meta.pt``, every entry
    but the sharded model and optimizer)."""
    file = path / "meta.pt" if path.is_dir() else path
    return torch.load(file, map_location="cpu", weights_only=True, mmap=not path.is_dir())


def model_only(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as ``--save_only_model`` saves it: the ``MODEL_ONLY_KEYS`` entries, marked ``model_only``."""
    return {**{key: state[key] for key in MODEL_ONLY_KEYS}, MODEL_ONLY: True}


def check_resumable(path: Path) -> None:
    """Refuse to resume from a ``--save_only_model`` checkpoint: it has no optimizer state."""
    if checkpoint_metadata(path).get(MODEL_ONLY, False):
        raise UserError(f"--resume: checkpoint '{path}' was saved with --save_only_model and has no optimizer, "
                        "scheduler, sampler or RNG state to resume from: pass a new --run_name (drop "
                        "--save_only_model to write resumable checkpoints)")


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
                    before_publish: Callable[[], None] = lambda: None, only_model: bool = False) -> Path:
    """Write ``state`` as the checkpoint of ``step`` (all ranks call: FSDP ranks write their shards).

    ``before_publish`` runs on rank 0 once every shard is written, before the checkpoint takes its name.
    ``only_model``: write ``model_only(state)`` (``--save_only_model``).
    """
    path = folder / f"step-{step:06d}.ckpt"
    tmp = folder / f".{path.name}.tmp"
    fabric.save(tmp, model_only(state) if only_model else state)
    fabric.barrier()
    if fabric.is_global_zero:
        before_publish()
        remove(path)  # a second save of the same step (a preemption right after a scheduled save)
        tmp.replace(path)
        prune(folder, keep)
    fabric.barrier()
    return path
