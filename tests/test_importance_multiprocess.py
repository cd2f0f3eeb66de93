"""Stage 2 on two CPU processes (DDP over gloo): each pair's frozen features are computed once, on one rank,
and validation counts every pair exactly once (no sampler padding duplicates)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.importance.data import PairDataModule
from pipeline.importance.sampling import ShardSampler
from pipeline.importance.train import default_run_dir
from pipeline.models import load_tokenizer
from tests.synthetic_dump import write_synthetic_dump

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max_epochs", "3", "--patience", "0", "--val_fraction", "0.3", "--report_examples", "0"]


def _train(dump: Path, out: Path, devices: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train_importance_net.py"), "--rollouts", str(dump), *ARGS,
           "--out_dir", str(out), "--run_name", "r", "--devices", str(devices), "--accelerator", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((default_run_dir(dump, "r", out) / "metadata.json").read_text())


@pytest.mark.slow  # two fresh interpreters with torch + lightning, plus one: ~1-2 min on a shared 2-core machine
def test_two_ranks_compute_each_feature_once_and_count_validation_once(tiny_model_dir, tmp_path):
    dump = write_synthetic_dump(tmp_path / "rollouts_m" / "part-00000.parquet", load_tokenizer(str(tiny_model_dir)),
                                str(tiny_model_dir), n_prompts=13, groups_per_prompt=2)
    one, two = _train(dump, tmp_path / "one", 1), _train(dump, tmp_path / "two", 2)
    dm = PairDataModule(dump, val_fraction=0.3)
    dm.setup()
    # the default context head reads every pair, t = 0 included (its row holds the prompt), once over all epochs
    assert one["features_computed_rank0"] == len(dm.train) + len(dm.val)
    # rank 0 computed its own shards only
    mine = (len(set(ShardSampler(len(dm.train), 0, 2, seed=0).shard))
            + len(set(ShardSampler(len(dm.val), 0, 2, shuffle=False).shard)))
    assert two["features_computed_rank0"] == int(mine) < 0.6 * one["features_computed_rank0"]
    # validation over both ranks: every pair once, so the constant baseline's loss is the one-process value
    assert two["final"]["pairs"] == one["final"]["pairs"] == len(dm.val)
    assert two["final"]["prompts"] == one["final"]["prompts"] == len(np.unique(dm.val.prompt_id))
    assert two["final"]["baseline_loss"] == pytest.approx(one["final"]["baseline_loss"], abs=1e-9)
    assert sum(row["count"] for row in two["final"]["f_by_position"]) == len(dm.val)
