"""Stage 3 on two CPU processes (DDP over gloo) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# lr 1e-3: Adam turns float-level gradient differences on near-zero gradients into steps of order lr
ARGS = ["--task_name", "arithmetic", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "8",
        "--eval_prompts", "1", "--num_train_prompts", "16", "--lr", "1e-3", "--rewards", "completion_chars=1",
        "--max_steps", "2", "--save_every", "2", "--eval_every", "100", "--sampler", "variance_regularized",
        "--sampler_params", "{warmup_steps: 0, update_period: 1}", "--loss_type", "dapo", "--run_name", "r",
        "--softmask", "entropy"]  # entropy: the kept tokens are the top 20% of both ranks together


def _run(model_dir: Path, out: Path, devices: int, extra: tuple[str, ...] = ()) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tests" / "grpo_launcher.py"), "--model_name", str(model_dir), *ARGS,
           "--out_dir", str(out), "--devices", str(devices), "--strategy", "ddp" if devices > 1 else "auto", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "arithmetic" / "tiny-llama" / "grpo" / "r"


@pytest.mark.parametrize("extra", [(), ("--per_device_train_batch_size", "3")], ids=["one-batch", "micro-batches"])
def test_two_ranks_match_one_process(tiny_model_dir, tmp_path, extra):
    """With micro-batches of 3 (8 completions per rank: 3 + 3 + 2), DDP syncs only the last backward."""
    single = _run(tiny_model_dir, tmp_path / "one", 1)
    double = _run(tiny_model_dir, tmp_path / "two", 2, extra)
    m1, m2 = pd.read_csv(single / "metrics.csv"), pd.read_csv(double / "metrics.csv")
    pd.testing.assert_series_equal(m1["reward_mean"], m2["reward_mean"])
    pd.testing.assert_series_equal(m1["loss"], m2["loss"], atol=1e-5, rtol=0)
    # the same sampler state after every step (and, checked in the loop, on every rank)
    assert m1["sampler_sha"].tolist() == m2["sampler_sha"].tolist()
    w1, w2 = load_file(single / "policy" / "model.safetensors"), load_file(double / "policy" / "model.safetensors")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert any(not torch.equal(w1[k], load_file(tiny_model_dir / "model.safetensors")[k]) for k in w1)
