"""Stage 3 through its CLI on a tiny random model: soft-mask modes, samplers, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import get_scheduler

import rewards
from pipeline import samplers
from pipeline.dump import tokenizer_fingerprint
from pipeline.grpo import microbatch, train
from pipeline.grpo.config import GRPOArgs
from pipeline.importance.export import save_export
from pipeline.importance.model import ImportanceNet, NetConfig
from pipeline.models import load_tokenizer
from tests.grpo_launcher import completion_chars
from train_grpo_softmask import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--task_name", "arithmetic", "--prompts_per_step", "2", "--group_size", "4", "--max_new_tokens", "10",
        "--eval_prompts", "1", "--num_train_prompts", "16", "--lr", "1e-2", "--rewards", "completion_chars=1"]


def make_export(backbone: Path, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = ImportanceNet(NetConfig(backbone=str(backbone), head_hidden=0, features="state+position"))  # a random linear head
    torch.nn.init.normal_(net.head.weight, std=1.0)
    return save_export(net, path, tokenizer=tokenizer_fingerprint(load_tokenizer(str(backbone))),
                       reward_key="reward", group_stats="group", baseline_f=0.3)


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory):
    return make_export(tiny_model_dir, tmp_path_factory.mktemp("imp") / "export")


@pytest.fixture
def spy_updates(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "completion_chars", completion_chars)
    calls = []
    real_build = samplers.build

    def build(*args, **kwargs):
        sampler = real_build(*args, **kwargs)
        update = sampler.update
        sampler.update = lambda idx, r: (calls.append((list(idx), list(r))), update(idx, r))[1]
        return sampler

    monkeypatch.setattr(samplers, "build", build)
    return calls


@pytest.mark.parametrize("softmask, sampler", [("none", "balanced"), ("delta", "gaussian"),
                                                ("variance", "variance_regularized"), ("entropy", "step")])
def test_short_run_trains_and_writes_everything(softmask, sampler, tiny_model_dir, export_dir, spy_updates, tmp_path):
    args = ["--model_name", str(tiny_model_dir), *FAST, "--softmask", softmask, "--sampler", sampler,
            "--max_steps", "2", "--save_every", "1", "--eval_every", "2", "--out_dir", str(tmp_path)]
    if softmask in ("delta", "variance"):
        args += ["--importance_net", str(export_dir)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (run,) = tmp_path.glob("arithmetic/tiny-llama/grpo/*")
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "policy" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "most parameter tensors must move"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["step"].tolist() == [1, 2]
    assert metrics["reward_std"].gt(0).all() and metrics["loss"].ne(0).any()
    if softmask == "entropy":  # TRL's rule: the top 20% of the step's tokens by entropy, weights 0/1 as they are
        assert metrics["weights/mean"].sub(0.2).abs().le(0.05).all() and metrics["weights/max"].eq(1).all()
    else:
        assert metrics["weights/mean"].sub(1).abs().lt(1e-5).all()
    if softmask != "none":
        assert metrics["weights/top20_mass"].gt(0.2 + 1e-3).all(), "a real mask concentrates weight"
    assert len(spy_updates) == 2 and all(len(i) == len(r) == 2 for i, r in spy_updates)
    evals = pd.read_csv(run / "eval.csv")
    assert sorted(evals["level"].unique()) == [0, 1, 4] and sorted(evals["step"].unique()) == [0, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step-000001.ckpt", "step-000002.ckpt"]
    samples = pd.read_parquet(run / "samples.parquet")
    assert len(samples) == 2 * 2 * 4 and {"advantage", "reward", "completion"} <= set(samples.columns)
    for png in ("learning_curve.png", "curriculum.png"):
        assert (run / png).stat().st_size > 1000
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["steps"] == 2 and meta["arguments"]["softmask"] == softmask


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "grpo_launcher.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _final_state(run: Path) -> tuple[dict, pd.DataFrame]:
    return load_file(run / "policy" / "model.safetensors"), pd.read_csv(run / "metrics.csv")


RESUME_STEPS = 6  # the signal goes out once step 2's checkpoint exists: steps 3-6 leave it room to land mid-run


def _resume_args(model_dir: Path) -> list[str]:
    return ["--model_name", str(model_dir), *FAST, "--max_steps", str(RESUME_STEPS), "--save_every", "1",
            "--eval_every", "100", "--sampler", "gaussian", "--softmask", "entropy", "--run_name", "r"]


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    straight = _launch(_resume_args(tiny_model_dir) + ["--out_dir", str(out)])
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    return out / "arithmetic" / "tiny-llama" / "grpo" / "r"


@pytest.mark.parametrize("interrupt", ["SIGKILL", "SIGUSR1"])
def test_resume_matches_uninterrupted_run(interrupt, tiny_model_dir, uninterrupted_run, tmp_path):
    base = _resume_args(tiny_model_dir)
    out = tmp_path / "cut"
    proc = _launch(base + ["--out_dir", str(out)])
    ckpts = out / "arithmetic" / "tiny-llama" / "grpo" / "r" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpts.glob("step-000002.ckpt")):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, interrupt))
    code = proc.wait(timeout=120)
    if interrupt == "SIGUSR1":
        assert code == 0, "a preempted run exits cleanly after checkpointing"
        assert not (ckpts.parent / "policy").exists()
        for png in ("learning_curve.png", "curriculum.png"):  # drawn at evaluation, not only at the end
            assert (ckpts.parent / png).stat().st_size > 1000
    steps_done = max(int(p.stem.split("-")[1]) for p in ckpts.glob("*.ckpt"))
    assert 2 <= steps_done < RESUME_STEPS, "the interruption must land mid-run"
    resumed = _launch(base + ["--out_dir", str(out), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    (w1, m1), (w2, m2) = _final_state(uninterrupted_run), _final_state(ckpts.parent)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    cols = ["step", "loss", "reward_mean", "grad_norm", "entropy"]
    pd.testing.assert_frame_equal(m1[cols], m2[cols])


@pytest.mark.parametrize("extra, message", [
    (["--softmask", "delta"], "needs --importance_net"),
    (["--sampler", "no_such_sampler"], "no_such_sampler"),
    (["--group_size", "1"], "'--group_size': 1 is not in the range x>=2"),
    (["--softmask", "delta", "--importance_net", "/no/such/export"], "not an importance-net export"),
    (["--precision", "bf16-true"], "AdamW"),
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size"),
])
def test_bad_input_exits_2_with_one_line(extra, message, tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), *FAST, "--out_dir", str(tmp_path), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


def _trl_style(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """A run spelled with TRL's option names where ours have another."""
    return ["--model_name", str(model_dir), "--task_name", "arithmetic", "--prompts_per_step", "2",
            "--num_generations", "4", "--max_completion_length", "10", "--eval_prompts", "1",
            "--num_train_prompts", "16", "--learning_rate", "1e-2", "--rewards", "completion_chars=1",
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.25", "--max_steps", "4", "--logging_steps", "2",
            "--save_every", "1", "--save_total_limit", "1", "--importance_sampling_level", "sequence",
            "--softmask", "entropy", "--top_entropy_quantile", "0.5", "--eval_every", "100", "--report_to", "csv",
            "--out_dir", str(out), "--run_name", "trl", *extra]


def _transformers_lrs(name: str, lr: float, warmup: int, steps: int) -> list[float]:
    """The learning rate after each of ``steps`` scheduler steps, from transformers itself."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    lrs = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_trl_names_lr_schedule_gspo_and_checkpoint_limit(tiny_model_dir, spy_updates, tmp_path, monkeypatch):
    levels = []
    real_loss = microbatch.compute_policy_loss

    def spy_loss(*args, **kwargs):
        levels.append(kwargs["importance_sampling_level"])
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(microbatch, "compute_policy_loss", spy_loss)
    result = CliRunner().invoke(main, _trl_style(tiny_model_dir, tmp_path), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "arithmetic" / "tiny-llama" / "grpo" / "trl"
    args = json.loads((run / "metadata.json").read_text())["arguments"]
    assert (args["group_size"], args["max_new_tokens"], args["lr"], args["entropy_quantile"]) == (4, 10, 1e-2, 0.5)
    assert args["report_to"] == ["csv"] and levels == ["sequence"] * 4
    assert [p.name for p in (run / "checkpoints").glob("*.ckpt")] == ["step-000004.ckpt"]
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["step"].tolist() == [2, 4], "one row per --logging_steps steps"
    lrs = _transformers_lrs("cosine", 1e-2, warmup=1, steps=4)  # ceil(0.25 * 4) warm-up steps
    np.testing.assert_allclose(metrics["lr"], [(lrs[0] + lrs[1]) / 2, (lrs[2] + lrs[3]) / 2], rtol=1e-12)

    resumed = CliRunner().invoke(main, _trl_style(tiny_model_dir, tmp_path, "--max_steps", "5", "--logging_steps", "1",
                                                  "--save_total_limit", "2", "--resume"), catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert pd.read_csv(run / "metrics.csv")["step"].tolist() == [2, 4, 5], "--max_steps and logging may change"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.ckpt")) == ["step-000004.ckpt", "step-000005.ckpt"]


@pytest.mark.parametrize("name", ["linear", "constant_with_warmup", "constant"])
def test_scheduler_is_transformers_schedule(name, tiny_model_dir, tmp_path):
    """The run's scheduler, stepped as the loop steps it, gives transformers' values (no training needed)."""
    warmup = 0 if name == "constant" else 2
    args = GRPOArgs(model_name=str(tiny_model_dir), lr=3e-3, lr_scheduler_type=name, warmup_steps=warmup,
                    max_steps=6)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = train.make_scheduler(args, optimizer)
    used = []
    for _ in range(args.max_steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    reference = get_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr),
                              num_warmup_steps=warmup, num_training_steps=args.max_steps)
    np.testing.assert_allclose(used, [args.lr * reference.lr_lambdas[0](k) for k in range(6)], rtol=1e-12)
    if name == "linear":
        assert used[0] == 0 and used[2] == args.lr and used[-1] < used[3], "warm-up from 0, then linear decay"


def test_importance_net_of_another_tokenizer_is_refused(tiny_model_dir, other_tokenizer_model_dir, tmp_path):
    export = make_export(other_tokenizer_model_dir, tmp_path / "other_export")
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), *FAST, "--out_dir", str(tmp_path),
                                       "--softmask", "variance", "--importance_net", str(export)])
    assert result.exit_code == 2 and "another tokenizer" in result.stderr
