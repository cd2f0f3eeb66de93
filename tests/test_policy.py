"""The policy at scale: LoRA (reference = adapters off, adapter-only checkpoints, exact resume, merged policy/),
gradient checkpointing, precision (bf16-true refused, rotary buffers in fp32, KL 0 at step 0)."""

from __future__ import annotations

import json

import lightning as L
import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rewards
from pipeline.errors import UserError
from pipeline.grpo.config import GRPOArgs, check_precision
from pipeline.grpo.logprobs import completion_logprobs
from pipeline.grpo.policy import build_policy, reference_model, setup
from pipeline.grpo.train import Trainer
from tests.grpo_launcher import completion_chars
from tests.scale_batch import naive_logprobs, random_batch

LORA = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": "q_proj,v_proj"}


def tiny_args(model_dir, out_dir, **extra) -> GRPOArgs:
    settings = {"model_name": str(model_dir), "task_name": "arithmetic", "prompts_per_step": 2, "group_size": 4,
                "max_new_tokens": 10, "eval_prompts": 1, "num_train_prompts": 16, "lr": 1e-2, "max_steps": 2,
                "rewards": {"completion_chars": 1.0}, "sampler": "gaussian", "out_dir": str(out_dir),
                "eval_every": 100, "save_every": 1, "run_name": "r"}
    return GRPOArgs(**{**settings, **extra})


@pytest.fixture(autouse=True)
def chars_reward(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "completion_chars", completion_chars)


def test_bf16_true_is_refused_unless_lora():
    with pytest.raises(UserError, match="AdamW"):
        check_precision("bf16-true", use_peft=False)
    check_precision("bf16-true", use_peft=True)
    check_precision("bf16-mixed", use_peft=False)


def test_unknown_lora_targets_are_a_user_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--use_peft: Target modules {'no_such_proj'} not found"):
        build_policy(tiny_args(tiny_model_dir, tmp_path, **{**LORA, "lora_target_modules": "no_such_proj"}))


@pytest.mark.parametrize("precision, extra", [("32-true", {}), ("bf16-mixed", {}), ("bf16-mixed", LORA),
                                              ("bf16-true", LORA)])
def test_rotary_frequencies_stay_fp32(tiny_model_dir, tmp_path, precision, extra):
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.rotary_emb.inv_freq
    args = tiny_args(tiny_model_dir, tmp_path, precision=precision, **extra)
    policy = build_policy(args)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    setup(fabric, policy, torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad]))
    buffers = {name: b for name, b in policy.named_buffers() if name.endswith("inv_freq")}
    assert len(buffers) == 2
    for buffer in buffers.values():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, expected)
    if precision == "bf16-true":
        assert next(policy.parameters()).dtype == torch.bfloat16, "Fabric did convert the rest"


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path):
    input_ids, attention, mask = random_batch(300)
    grads = []
    for checkpointing in (False, True):
        policy = build_policy(tiny_args(tiny_model_dir, tmp_path, gradient_checkpointing=checkpointing)).double()
        assert policy.training and policy.is_activation_checkpointing == checkpointing
        logps, _ = completion_logprobs(policy, input_ids, attention, mask.size(1), chunk_size=7)
        (logps * mask).sum().backward()
        grads.append({name: p.grad for name, p in policy.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-10, msg=name)


def test_lora_run(tiny_model_dir, tmp_path):
    """KL exactly 0 at step 0; the reference is the base model; only the adapter trains and is checkpointed."""
    trainer = Trainer(tiny_args(tiny_model_dir, tmp_path, beta=0.1, **LORA))
    assert trainer.reference is None and isinstance(trainer.backend.model, PeftModel), "HF samples the adapted model"
    trainer.fit()
    metrics = pd.read_csv(trainer.run_dir / "metrics.csv")
    assert metrics["kl"].iloc[0] == 0.0 and metrics["kl"].iloc[1] > 0, "the adapter starts at 0, then moves"

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    input_ids, attention, mask = random_batch(base.config.vocab_size)
    with torch.no_grad():
        with reference_model(trainer.model, None) as reference:
            ref, _ = completion_logprobs(reference, input_ids, attention, mask.size(1))
        policy, _ = completion_logprobs(trainer.model, input_ids, attention, mask.size(1))
        expected, _ = naive_logprobs(base, input_ids, attention, mask.size(1))
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
    assert (policy - ref).abs().max() > 1e-3, "outside the context the adapter is on again"

    checkpoint = torch.load(sorted((trainer.run_dir / "checkpoints").glob("*.ckpt"))[-1], weights_only=True)
    adapter = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert set(checkpoint["policy"]) == adapter and all(".lora_" in n for n in adapter)
    assert len(checkpoint["optimizer"]["state"]) == len(adapter)

    saved = trainer.run_dir / "policy"
    merged = AutoModelForCausalLM.from_pretrained(saved)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), saved / "adapter")
    assert set(load_file(saved / "model.safetensors")) == set(load_file(tiny_model_dir / "model.safetensors"))
    with torch.no_grad():
        expected, _ = completion_logprobs(trainer.model, input_ids, attention, mask.size(1))
        for model in (merged, adapted):
            got, _ = completion_logprobs(model, input_ids, attention, mask.size(1))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert json.loads((saved / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_lora_resume_is_exact(tiny_model_dir, tmp_path):
    straight = Trainer(tiny_args(tiny_model_dir, tmp_path / "a", max_steps=4, **LORA))
    straight.fit()
    cut = Trainer(tiny_args(tiny_model_dir, tmp_path / "b", max_steps=4, **LORA))
    step = cut.training_step

    def crash_after_two(indices):
        if cut.step == 2:
            raise KeyboardInterrupt("preempted")
        return step(indices)

    cut.training_step = crash_after_two
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    resumed = Trainer(tiny_args(tiny_model_dir, tmp_path / "b", max_steps=4, resume=True, **LORA))
    resumed.fit()
    weights = [{n: p for n, p in t.policy.named_parameters() if p.requires_grad} for t in (straight, resumed)]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    cols = ["step", "loss", "reward_mean", "grad_norm", "entropy"]
    pd.testing.assert_frame_equal(*(pd.read_csv(t.run_dir / "metrics.csv")[cols] for t in (straight, resumed)))


@pytest.mark.parametrize("extra", [{}, LORA])
def test_bf16_mixed_kl_is_zero_at_step_zero(tiny_model_dir, tmp_path, extra):
    """The reference runs under the policy's autocast: at step 0 both give the same log-probs."""
    trainer = Trainer(tiny_args(tiny_model_dir, tmp_path, beta=0.1, precision="bf16-mixed", max_steps=1,
                                per_device_train_batch_size=3, gradient_checkpointing=True, **extra))
    assert (trainer.reference is None) == bool(extra)
    metrics = trainer.training_step(trainer.sampler.next_batch())["metrics"]
    assert metrics["kl"] == 0.0 and metrics["loss"] != 0.0
