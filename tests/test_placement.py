"""Where each model runs: CUDA when it is there, ``--device`` (stage 1) / ``--accelerator`` (stage 3) to choose.

No GPU here: ``fake_cuda`` makes CUDA look available and records every ``Module.to`` aimed at it
instead of doing it, so the models stay on the CPU and the runs complete.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import rewards
from pipeline import hybrid_reward
from pipeline.errors import UserError
from pipeline.generation.base import Completion
from pipeline.models import resolve_device
from tests.grpo_launcher import completion_chars
from tests.test_hybrid_reward import reward_model_dir  # noqa: F401  (fixture)
from tests.test_stage3 import make_export

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda(monkeypatch):
    moves: list[tuple[str, torch.device, torch.dtype | None]] = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type == "cuda":
            moves.append((type(self).__name__, device, dtype))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(hybrid_reward, "_active", None)
    return moves


def test_device_choice(fake_cuda, monkeypatch):
    assert resolve_device("auto") == CUDA and resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(UserError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device is visible"):
        resolve_device("cuda")


def test_stage1_puts_the_hf_model_and_the_reward_model_on_the_gpu(fake_cuda, tiny_model_dir, reward_model_dir,  # noqa: F811
                                                                   tmp_path):
    from generate_paired_rollouts import main

    result = CliRunner().invoke(main, [
        "--model_name", str(tiny_model_dir), "--task_name", "arithmetic", "--group_size", "2", "--num_prompts", "2",
        "--max_new_tokens", "4", "--rewards", "correct=1,hybrid=1", "--reward_model", str(reward_model_dir),
        "--rm_calibration_prompts", "2", "--out_dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert ("LlamaForCausalLM", CUDA, None) in fake_cuda
    assert ("LlamaForSequenceClassification", CUDA, None) in fake_cuda


def test_stage3_models_follow_the_accelerator(fake_cuda, monkeypatch, tiny_model_dir, reward_model_dir,  # noqa: F811
                                              tmp_path):
    """CUDA 'available' but --accelerator cpu: the policy, reference, importance net and reward model stay on CPU."""
    from pipeline.grpo.config import GRPOArgs
    from pipeline.grpo.train import Trainer

    monkeypatch.setitem(rewards.REWARDS, "completion_chars", completion_chars)
    export = make_export(tiny_model_dir, tmp_path / "export")
    trainer = Trainer(GRPOArgs(
        model_name=str(tiny_model_dir), task_name="arithmetic", importance_net=str(export), softmask="delta",
        rewards={"completion_chars": 1.0, "hybrid": 1.0}, reward_model=str(reward_model_dir),
        rm_calibration_prompts=2, beta=0.04, max_new_tokens=4, num_train_prompts=4, eval_prompts=1,
        out_dir=str(tmp_path), accelerator="cpu", max_steps=1))
    trainer.fit()  # the reward model loads for its calibration as the run starts
    assert trainer.fabric.device == torch.device("cpu")
    assert fake_cuda == [], "nothing went to the GPU the run was told not to use"
    assert hybrid_reward.active_hybrid().model.device == torch.device("cpu")


def test_the_engine_is_built_before_the_reward_model(monkeypatch, tmp_path):
    """vLLM sizes its memory share from what is free: the reward model must load after it."""
    order = []

    class Engine:
        def generate(self, requests, params):
            return [Completion([5, 6], "stop") for _ in requests]

    class Tokenizer:
        def batch_decode(self, ids, skip_special_tokens):
            return ["x" for _ in ids]

    def engine():
        order.append("engine")
        return Engine()

    class RM:
        calibration = {"min": 0.0, "max": 1.0}

        def metadata(self):
            return {}

    monkeypatch.setattr(hybrid_reward, "configure_hybrid", lambda *a, **k: order.append("reward model") or RM())
    from pipeline.generation.base import SamplingParams

    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    hybrid_reward.prepare_hybrid({"hybrid": 1.0}, str(tmp_path / "rm"), tmp_path / "c.json", engine, Tokenizer(),
                                 [("p", [1])], ["q"], 1, SamplingParams(), 0)
    assert order == ["engine", "reward model"]
