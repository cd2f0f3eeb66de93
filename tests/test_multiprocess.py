"""Stage 3 on two CPU processes (DDP, and FSDP per decoder layer, over gloo) equals one process with the
same global batch: rewards, samples, evaluation, losses, token metrics and the trained policy."""

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
ARGS = ["--task_name", "arithmetic", "--levels", "0,1,2,3", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "8",
        "--eval_prompts", "1", "--num_train_prompts", "16", "--lr", "1e-3", "--rewards", "completion_chars=1",
        "--eval_every", "100", "--sampler", "variance_regularized", "--sampler_params",
        "{warmup_steps: 0, update_period: 1}", "--loss_type", "dapo", "--run_name", "r"]
# entropy: the kept tokens are the top 20% of both ranks together. Two steps: a 0/1 mask at a
# quantile flips on float-level entropy differences once the runs' weights have drifted by ~1e-6.
DDP = ("--max_steps", "2", "--save_every", "2", "--softmask", "entropy")
FSDP = ("--max_steps", "3", "--save_every", "1")  # three saves: the third prunes the first
CLOSE = ["loss", "entropy", "weights/mean", "weights/max", "weights/top20_mass", "grad_norm"]


def _run(model_dir: Path, out: Path, devices: int, strategy: str, *extra: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tests" / "grpo_launcher.py"), "--model_name", str(model_dir), *ARGS,
           "--out_dir", str(out), "--devices", str(devices), "--strategy", strategy, *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / "arithmetic" / "tiny-llama" / "grpo" / "r"


def assert_same_run(single: Path, double: Path, base_model: Path, steps: int) -> None:
    m1, m2 = pd.read_csv(single / "metrics.csv"), pd.read_csv(double / "metrics.csv")
    pd.testing.assert_series_equal(m1["reward_mean"], m2["reward_mean"])
    for column in CLOSE:  # global values, not rank 0's share
        pd.testing.assert_series_equal(m1[column], m2[column], atol=1e-5, rtol=1e-5)
    # the same sampler state after every step (and, checked in the loop, on every rank)
    assert m1["sampler_sha"].tolist() == m2["sampler_sha"].tolist()
    s1, s2 = pd.read_parquet(single / "samples.parquet"), pd.read_parquet(double / "samples.parquet")
    assert len(s2) == steps * 4 * 4, "every rank's completions, not rank 0's"
    same = ["step", "prompt_id", "completion", "reward"]
    pd.testing.assert_frame_equal(s1[same], s2[same])
    pd.testing.assert_frame_equal(pd.read_csv(single / "eval.csv"), pd.read_csv(double / "eval.csv"))
    w1, w2 = load_file(single / "policy" / "model.safetensors"), load_file(double / "policy" / "model.safetensors")
    base = load_file(base_model / "model.safetensors")
    assert w1.keys() == w2.keys() == base.keys()
    assert all(w2[k].shape == base[k].shape for k in base), "full tensors, not FSDP shards"
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5
    assert any(not torch.equal(w1[k], base[k]) for k in w1)


@pytest.fixture(scope="module")
def ddp_single(tiny_model_dir, tmp_path_factory) -> Path:
    return _run(tiny_model_dir, tmp_path_factory.mktemp("one"), 1, "auto", *DDP)


@pytest.mark.parametrize("extra", [(), ("--per_device_train_batch_size", "3")], ids=["one-batch", "micro-batches"])
def test_two_ranks_match_one_process(tiny_model_dir, ddp_single, tmp_path, extra):
    """With micro-batches of 3 (8 completions per rank: 3 + 3 + 2), DDP syncs only the last backward."""
    assert_same_run(ddp_single, _run(tiny_model_dir, tmp_path, 2, "ddp", *DDP, *extra), tiny_model_dir, steps=2)


def test_fsdp_matches_one_process(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    single = _run(tiny_model_dir, tmp_path / "one", 1, "auto", *FSDP)
    run = _run(tiny_model_dir, tmp_path / "two", 2, "fsdp", *FSDP)
    assert_same_run(single, run, tiny_model_dir, steps=3)
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000002.ckpt", "step-000003.ckpt"], "older ones pruned"
    assert all(p.is_dir() and (p / "meta.pt").is_file() for p in checkpoints), "FSDP checkpoints are shard dirs"
    policy = AutoModelForCausalLM.from_pretrained(run / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert [(n, p.shape) for n, p in policy.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]
    trained = load_file(run / "policy" / "model.safetensors")
    _run(tiny_model_dir, tmp_path / "two", 2, "fsdp", *FSDP, "--resume")  # loads the step-3 shards; nothing to train
    restored = load_file(run / "policy" / "model.safetensors")
    assert all(torch.equal(trained[k], restored[k]) for k in trained)


def test_online_importance_on_two_ranks_shares_one_buffer_and_one_head(tiny_model_dir, tmp_path):
    """--importance online under DDP: each rank's pairs reach every rank's buffer (8 pairs a step: 4 prompts x
    2 pairs over both ranks), and the run's own check finds the same head and fallback on both ranks each step."""
    run = _run(tiny_model_dir, tmp_path, 2, "ddp", "--max_steps", "3", "--save_every", "3", "--softmask", "delta",
               "--importance", "online", "--online_heldout_fraction", "0.5")
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["online/buffer_pairs"].tolist() == [8.0, 16.0, 24.0]
    assert (metrics["online/train_pairs"] + metrics["online/heldout_pairs"] <= metrics["online/buffer_pairs"]).all()
    state = torch.load(sorted((run / "checkpoints").glob("*.ckpt"))[-1], weights_only=True)["online"]
    assert len(state["buffer"]["states"]) == 24 and sorted(set(state["buffer"]["meta"]["step"].tolist())) == [1, 2, 3]
