"""Online importance: paired groups in one decode pass, the policy's own states, the head's refit and fallback."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rewards
from pipeline.generation import Completion, HFBackend, Request, SamplingParams
from pipeline.grpo.logprobs import completion_logprobs, completion_outputs, position_ids_for
from pipeline.grpo.microbatch import PolicyBatch, accumulate
from pipeline.grpo.online_importance import (
    OnlineImportance,
    OnlineOptions,
    PairBuffer,
    heldout_prompts,
    pooled_targets,
)
from pipeline.grpo.paired_rollout import Pairing
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.rollouts import PairingConfig, Prompt, sample_pairs
from pipeline.study.config import load_study
from pipeline.study.grid import build_plan
from tests.grpo_launcher import DECIDING, deciding_token
from tests.scale_batch import random_batch
from train_grpo_softmask import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), batch_size=4)


def test_sisters_in_one_pass_equal_the_two_round_continuation(backend):
    """B shares exactly A[:t], then is what a request for prompt + A[:t] with B's seed samples."""
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    a = [Request(p, 10, seed=100 + i) for i, p in enumerate(prompts * 2)]
    b = [Request(r.prompt_ids, 10, seed=200 + i) for i, r in enumerate(a)]
    shared = [0, 1, 3, 5, 9, 10]
    sisters_a, sisters_b = backend.generate_pairs(a, b, shared, params)
    assert [c.token_ids for c in sisters_a] == [c.token_ids for c in backend.generate(a, params)]
    for ra, rb, t, sa, sb in zip(a, b, shared, sisters_a, sisters_b, strict=True):
        assert sb.token_ids[:t] == sa.token_ids[:t]
        if t >= len(sa.token_ids):
            assert sb.token_ids == sa.token_ids  # A stopped by t: B copied its stop token too
            continue
        (cont,) = backend.generate([Request(ra.prompt_ids + sa.token_ids[:t], 10 - t, rb.seed)], params)
        assert sb.token_ids == sa.token_ids[:t] + cont.token_ids and sb.finish_reason == cont.finish_reason
    assert any(sb.token_ids != sa.token_ids for sa, sb in zip(sisters_a, sisters_b, strict=True))


def test_fixed_split_limit_takes_the_one_pass_path_with_the_same_splits(backend):
    """sample_pairs with a fixed t_max: the same t as the two-round path, sisters from one generate_pairs call."""
    prompts = [Prompt(i, {"prompt_id": i}, f"p{i}", [5 + i, 6, 7]) for i in range(3)]
    cfg, params = PairingConfig(group_size=4, max_split_tokens=6), SamplingParams(max_new_tokens=8)
    one_pass = sample_pairs(backend, prompts, params, cfg, seed=3, rng=np.random.default_rng(0))

    class TwoRounds:  # the same engine without generate_pairs
        generate = backend.generate

    two_rounds = sample_pairs(TwoRounds(), prompts, params, cfg, seed=3, rng=np.random.default_rng(0))
    assert [r["split_token_idx"] for r in one_pass] == [r["split_token_idx"] for r in two_rounds]
    assert [r["completion"].token_ids for r in one_pass] == [r["completion"].token_ids for r in two_rounds]
    assert [r["degenerate"] for r in one_pass] == [r["degenerate"] for r in two_rounds]


def test_two_round_sister_b_carries_the_engines_log_probs_for_the_is_correction():
    """vLLM's path: B's sampled-token log-probs are A's over the shared prefix, then its continuation's."""

    class Engine:  # a vLLM stand-in: each token's log-prob is a function of the token
        def generate(self, requests, params):
            out = []
            for r in requests:
                tokens = [(r.seed + 3 * k) % 50 for k in range(r.max_new_tokens)]
                out.append(Completion(tokens, "length", [-token / 100 for token in tokens]))
            return out

    prompts = [Prompt(i, {"prompt_id": i}, f"p{i}", [5 + i, 6, 7]) for i in range(3)]
    cfg, params = PairingConfig(group_size=4), SamplingParams(max_new_tokens=8)
    records = sample_pairs(Engine(), prompts, params, cfg, seed=3, rng=np.random.default_rng(0))
    shared = [a["split_token_idx"] for a in records[::2] if not a["degenerate"]]
    assert shared and any(t > 0 for t in shared)
    for record in records:
        completion = record["completion"]
        assert completion.logprobs == [-token / 100 for token in completion.token_ids]


def test_states_come_from_the_log_prob_forward(tiny_model_dir):
    """Entry t of the states is the decoder's last hidden state at the last token of prompt + completion[:t]."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids, attention, mask = random_batch(model.config.vocab_size)
    width = mask.size(1)
    logps, entropy, states = completion_outputs(model, input_ids, attention, width, 0.8, True, 5, states="completion")
    expected_logps, expected_entropy = completion_logprobs(model, input_ids, attention, width, 0.8, True, 5)
    assert torch.equal(logps, expected_logps) and torch.equal(entropy, expected_entropy)
    hidden = model.model(input_ids=input_ids, attention_mask=attention,
                         position_ids=position_ids_for(attention)).last_hidden_state
    torch.testing.assert_close(states, hidden[:, -width - 1:], rtol=0, atol=1e-5)
    assert not states.requires_grad


def test_pooled_targets_follow_stage_2s_prompt_rule():
    rng = np.random.default_rng(0)
    n = 40
    meta = {"prompt_id": torch.tensor(rng.integers(0, 6, n)), "r1": torch.tensor(rng.integers(0, 2, n) * 1.0),
            "r2": torch.tensor(rng.normal(size=n)), "split": torch.tensor(rng.integers(0, 5, n)),
            "degenerate": torch.tensor(rng.random(n) < 0.2)}
    meta["r2"][3] = float("nan")
    meta["r1"][meta["prompt_id"] == 5] = meta["r2"][meta["prompt_id"] == 5] = 0.5  # a zero-variance prompt
    targets, informative = pooled_targets(meta)
    frame = pd.DataFrame({"p": np.r_[meta["prompt_id"], meta["prompt_id"]], "r": np.r_[meta["r1"], meta["r2"]]})
    m = frame.groupby("p")["r"].mean()[meta["prompt_id"].numpy()].to_numpy()  # pandas skips NaN, var has ddof=1
    v = frame.groupby("p")["r"].var()[meta["prompt_id"].numpy()].to_numpy()
    keep = informative.numpy()
    np.testing.assert_allclose(targets["z1"].numpy()[keep], ((meta["r1"].numpy() - m) / np.sqrt(v))[keep])
    np.testing.assert_allclose(targets["p"].numpy(), m)
    expected = ~meta["degenerate"].numpy() & np.isfinite(meta["r2"].numpy()) & (v > 1e-10)
    np.testing.assert_array_equal(keep, expected)
    assert not keep[meta["prompt_id"].numpy() == 5].any() and not keep[3]


def test_heldout_prompts_are_a_fixed_draw_per_prompt():
    ids = torch.tensor([3, 7, 3, 11, 7, 3] * 50 + list(range(1000)))
    held = heldout_prompts(ids, seed=1, fraction=0.25)
    for p in (3, 7, 11):
        assert held[ids == p].all() or not held[ids == p].any()
    assert torch.equal(held[-1000:], heldout_prompts(torch.arange(1000), seed=1, fraction=0.25))
    assert 0.2 < held[-1000:].float().mean() < 0.3
    assert not torch.equal(held[-1000:], heldout_prompts(torch.arange(1000), seed=2, fraction=0.25))


def test_buffer_keeps_the_most_recent_pairs():
    buffer = PairBuffer(capacity=5)
    for step in range(3):
        meta = {"prompt_id": torch.arange(3), "r1": torch.zeros(3), "r2": torch.ones(3), "split": torch.ones(3),
                "length": torch.full((3,), 4), "degenerate": torch.zeros(3, dtype=torch.bool),
                "step": torch.full((3,), step)}
        buffer.add(meta, [torch.full((1, 2), float(step * 3 + i)) for i in range(3)])
    assert len(buffer) == 5 and buffer.meta["step"].tolist() == [1, 1, 2, 2, 2]
    assert [float(s[0, 0]) for s in buffer.states] == [4, 5, 6, 7, 8]
    copy = PairBuffer(capacity=5)
    copy.load_state_dict(buffer.state_dict())
    assert all(torch.equal(copy.meta[k], buffer.meta[k]) for k in buffer.meta) and len(copy) == 5


def _loss_and_grads(fabric, model, batch, hook):
    model.zero_grad(set_to_none=True)
    options = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.28, "max_completion_length": batch.completion_len,
               "num_items_in_batch": batch.completion_mask.sum()}
    result = accumulate(fabric, model, batch, "dapo", options, 4, 1.0, weights_from_states=hook)
    return result, {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fallback_gives_exactly_the_plain_loss(tiny_model_dir):
    """While the head has not beaten the constant, the online mask is the plain GRPO loss, bit for bit."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(AutoModelForCausalLM.from_pretrained(tiny_model_dir).train())
    input_ids, attention, mask = random_batch(model.config.vocab_size, rows=8)
    batch = PolicyBatch(input_ids, attention, mask, advantages=torch.linspace(-1, 1, 8))
    online = OnlineImportance(model.config.hidden_size, OnlineOptions(), "cpu")
    pairing = Pairing(split=torch.tensor([2, 2, 0, 0, 5, 5, 1, 1]), degenerate=torch.zeros(8, dtype=torch.bool))
    torch.nn.init.normal_(online.head.head.weight)  # a head that would concentrate the weights
    assert online.fallback
    hook = online.weights_hook("delta", 1.0, mask, mask.sum(1).long(), pairing)
    plain, plain_grads = _loss_and_grads(fabric, model, batch, None)
    masked, masked_grads = _loss_and_grads(fabric, model, batch, hook)
    assert torch.equal(masked.loss, plain.loss)
    assert all(torch.equal(masked_grads[k], plain_grads[k]) for k in plain_grads)
    assert torch.equal(masked.weights, mask)
    online.fallback = False
    _, used_grads = _loss_and_grads(fabric, model, batch, online.weights_hook("delta", 1.0, mask, mask.sum(1).long(),
                                                                               pairing))
    assert not all(torch.equal(used_grads[k], plain_grads[k]) for k in plain_grads), "the head's weights steer"


def _synthetic_step(online: OnlineImportance, step: int, rng: np.random.Generator, deciding: int, width: int):
    """One step of 6 prompts x 2 pairs whose reward is a coin flipped at completion token ``deciding``.

    Sisters share that coin when the split comes after it (t > deciding), else flip their own, so the
    truth is f(t) = 0 for t <= deciding and 1 after. The "policy" states are one-hot positions: state u
    tells the head where it is, nothing else.
    """
    prompts = rng.choice(24, size=6, replace=False)
    rows = 4 * len(prompts)
    split = np.repeat(rng.integers(0, width, size=rows // 2), 2)
    coins = rng.integers(0, 2, size=rows).astype(float)
    shared = split[0::2] > deciding
    coins[1::2] = np.where(shared, coins[0::2], coins[1::2])
    states = torch.eye(width + 1).expand(rows, -1, -1)
    mask = torch.ones(rows, width)
    pairing = Pairing(torch.as_tensor(split), torch.zeros(rows, dtype=torch.bool))
    hook = online.weights_hook("delta", 1.0, mask, torch.full((rows,), width), pairing)
    weights = torch.cat([hook(states[:8], slice(0, 8)), hook(states[8:], slice(8, rows))])
    metrics = online.end_step(step, np.repeat(prompts, 4).tolist(), coins, pairing, mask)
    return weights, metrics


def test_the_head_finds_the_deciding_token_and_leaves_the_fallback():
    width, deciding = 8, 3
    online = OnlineImportance(width + 1, OnlineOptions(heldout_fraction=0.25, refit_iters=20, lr=0.05), "cpu")
    rng = np.random.default_rng(0)
    history = [_synthetic_step(online, step, rng, deciding, width) for step in range(1, 31)]
    weights, metrics = history[-1]
    # 0.15: f stays <= F_MAX = 0.99, so a perfect f gains a little less than it did at the former 1 - 1e-4 (0.20)
    assert metrics["online/gain"] > 0.15 and metrics["online/gain_lo"] > 0 and metrics["online/fallback"] == 0
    f = online.head.curve(torch.eye(width + 1).unsqueeze(0), torch.tensor([width]), width)[0]
    assert f[1:deciding + 1].max() < 0.2 and f[deciding + 1:].min() > 0.8
    assert int(weights[0].argmax()) == deciding and weights[0, deciding] > 0.6 * width  # most of the credit
    first_off = next(i for i, (_, m) in enumerate(history) if m["online/fallback"] == 0)
    assert all(torch.equal(w, torch.ones_like(w)) for w, _ in history[:first_off + 1]), "uniform until it wins"


def test_the_context_heads_buffer_gives_the_f_its_weights_were_made_of(tiny_model_dir):
    """The context head keeps prompt + A[:t] per pair, from the forward of each micro-batch: refit and judge
    read f(t) from it, and it equals the curve that made the step's weights, at the split."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids, attention, mask = random_batch(model.config.vocab_size, rows=8, completion_lens=(2, 7, 9, 4))
    online = OnlineImportance(model.config.hidden_size, OnlineOptions(features="context", refit_every=1000), "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in online.head.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator))
    split = torch.tensor([1, 1, 3, 3, 1, 1, 6, 6])  # sister As (rows 0, 2, 4, 6) have 2, 9, 2 and 9 tokens
    pairing = Pairing(split=split, degenerate=torch.zeros(8, dtype=torch.bool))
    lengths = mask.sum(1).long()
    hook = online.weights_hook("delta", 1.0, mask, lengths, pairing)
    assert online.state_kind == "context"
    with torch.no_grad():
        for rows in (slice(0, 3), slice(3, 8)):  # micro-batches that cut a pair: each keeps its own rows
            hook(completion_outputs(model, input_ids[rows], attention[rows], mask.shape[1], states="context")[2], rows)
        whole = completion_outputs(model, input_ids, attention, mask.shape[1], states="context")[2]
        curve = online.head.curve(whole, lengths, mask.shape[1])
    online.end_step(1, [0, 0, 1, 1, 2, 2, 3, 3], np.array([1, 0, 0, 1, 1, 0, 0.5, 1.0]), pairing, mask)
    assert [len(s) for s in online.buffer.states] == [int(attention[r, :-mask.shape[1]].sum() + split[r])
                                                      for r in (0, 2, 4, 6)]
    batch = online._batch(torch.ones(4, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(online._pair_f(batch), curve[[0, 2, 4, 6], split[[0, 2, 4, 6]]], rtol=0, atol=1e-5)


def test_refit_every_0_keeps_the_warm_start_and_judges_it():
    """--online_refit_every 0: the warm-started head is never refit, but judged every step and used once it wins."""
    width, deciding = 8, 3
    trained = OnlineImportance(width + 1, OnlineOptions(heldout_fraction=0.25, refit_iters=20, lr=0.05), "cpu")
    rng = np.random.default_rng(0)
    for step in range(1, 31):
        _synthetic_step(trained, step, rng, deciding, width)
    weights = {k: v.clone() for k, v in trained.head.head.state_dict().items()}
    frozen = OnlineImportance(width + 1, OnlineOptions(heldout_fraction=0.25, refit_every=0), "cpu",
                              trained.head.config, weights)
    rng = np.random.default_rng(1)
    history = [_synthetic_step(frozen, step, rng, deciding, width)[1] for step in range(1, 21)]
    assert all(torch.equal(frozen.head.head.state_dict()[k], v) for k, v in weights.items())
    assert history[-1]["online/gain_lo"] > 0 and history[-1]["online/fallback"] == 0


def _refit_gradient_norms(max_grad_norm: float) -> list[float]:
    """The head's gradient norm at each AdamW step of 3 synthetic steps' refits."""
    width, deciding, norms = 8, 3, []
    online = OnlineImportance(width + 1, OnlineOptions(heldout_fraction=0.25, max_grad_norm=max_grad_norm), "cpu")
    online.optimizer.register_step_pre_hook(lambda *_: norms.append(float(torch.cat(
        [p.grad.flatten() for p in online.head.parameters()]).norm())))
    rng = np.random.default_rng(0)
    for step in range(1, 4):
        _synthetic_step(online, step, rng, deciding, width)
    return norms


def test_each_refit_step_clips_the_heads_gradient():
    """Stage 2's --max_grad_norm holds for the refit: no AdamW step of the head sees a larger gradient norm."""
    clipped, unclipped = _refit_gradient_norms(0.005), _refit_gradient_norms(0.0)
    assert clipped and max(clipped) <= 0.005 + 1e-7
    assert max(unclipped) > 0.005, "the unclipped gradient is larger: the clip acts"


# ---- stage 3 end to end on the tiny model, reward decided by completion token DECIDING -----------------------
ONLINE = ["--task_name", "arithmetic", "--prompts_per_step", "4", "--group_size", "4", "--max_new_tokens", "8",
          "--eval_prompts", "1", "--num_train_prompts", "32", "--lr", "1e-5", "--rewards", "deciding_token=1",
          "--softmask", "delta", "--importance", "online", "--online_heldout_fraction", "0.25", "--eval_every", "1000",
          "--run_name", "online"]


def _launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "grpo_launcher.py"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _online_state(run: Path) -> dict:
    (last,) = sorted((run / "checkpoints").glob("*.ckpt"))[-1:]
    return torch.load(last, weights_only=True)["online"]


@pytest.mark.parametrize("features", ["state+position", "context"])
def test_resume_is_exact_with_the_head_and_the_buffer(tiny_model_dir, tmp_path, features):
    """SIGKILL after step 3 of 6 and --resume: the same policy, metrics, head, head optimizer and buffer."""
    base = ["--model_name", str(tiny_model_dir), *ONLINE, "--max_steps", "6", "--save_every", "1",
            "--online_features", features]
    straight = _launch(base + ["--out_dir", str(tmp_path / "straight")])
    cut = _launch(base + ["--out_dir", str(tmp_path / "cut")])
    run = tmp_path / "cut" / "arithmetic" / "tiny-llama" / "grpo" / "online"
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "step-000003.ckpt").exists():
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait(timeout=60)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    assert 3 <= max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("*.ckpt")) < 6
    resumed = _launch(base + ["--out_dir", str(tmp_path / "cut"), "--resume"])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    whole = tmp_path / "straight" / "arithmetic" / "tiny-llama" / "grpo" / "online"
    w1, w2 = (load_file(r / "policy" / "model.safetensors") for r in (whole, run))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    m1, m2 = (pd.read_csv(r / "metrics.csv") for r in (whole, run))
    cols = ["step", "loss", "reward_mean", "grad_norm"] + [c for c in m1.columns if c.startswith("online/")]
    pd.testing.assert_frame_equal(m1[cols], m2[cols])
    assert m1["online/buffer_pairs"].tolist() == [8.0 * s for s in range(1, 7)]
    s1, s2 = _online_state(whole), _online_state(run)
    assert all(torch.equal(s1["head"][k], s2["head"][k]) for k in s1["head"])
    assert all(torch.equal(s1["buffer"]["meta"][k], s2["buffer"]["meta"][k]) for k in s1["buffer"]["meta"])
    assert all(torch.equal(a, b) for a, b in zip(s1["buffer"]["states"], s2["buffer"]["states"], strict=True))
    assert s1["optimizer"]["state"][0]["step"] == s2["optimizer"]["state"][0]["step"] > 0


@pytest.mark.slow
def test_the_online_head_finds_the_deciding_token_of_a_real_run(tiny_model_dir, tmp_path, monkeypatch):
    """30 steps of stage 3: f(t) jumps after completion token DECIDING and beats the constant on held-out prompts."""
    monkeypatch.setitem(rewards.REWARDS, "deciding_token", deciding_token)
    result = CliRunner().invoke(main, ["--model_name", str(tiny_model_dir), *ONLINE, "--max_steps", "30",
                                       "--save_every", "30", "--out_dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = tmp_path / "arithmetic" / "tiny-llama" / "grpo" / "online"
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["online/gain"].iloc[-5:].gt(0).all()
    state = _online_state(run)
    online = OnlineImportance(state["buffer"]["states"][0].shape[-1], OnlineOptions(), "cpu")
    online.load_state_dict(state)
    _, informative = pooled_targets(online.buffer.meta)
    batch = online._batch(informative)
    with torch.no_grad():
        f = online._pair_f(batch)
    by_t = [float(f[batch["split"] == t].mean()) for t in range(1, 8)]
    assert max(by_t[:DECIDING]) < 0.6 and min(by_t[DECIDING:]) > 0.95, by_t  # f(t) for t = 1..DECIDING, then after


# ---- what pairing does to GRPO's group statistics (docs/online_importance.md) -----------------------------------
def test_group_statistics_of_paired_groups_match_the_docs():
    """Binary rewards, sisters correlated rho: Var(mean) = s2 (1 + rho) / G, E[group var] = s2 (1 - rho / (G - 1)),
    and P(all G equal) = (p^2 + rho pq)^(G/2) + (q^2 + rho pq)^(G/2)."""
    rng = np.random.default_rng(0)
    G, p, rho, n = 8, 0.3, 0.5, 400_000
    a = rng.random((n, G // 2)) < p
    b = np.where(rng.random((n, G // 2)) < rho, a, rng.random((n, G // 2)) < p)  # shares A's reward w.p. rho
    rewards = np.concatenate([a, b], axis=1).astype(float)
    s2 = p * (1 - p)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] == pytest.approx(rho, abs=0.01)
    assert rewards.mean(1).var() == pytest.approx(s2 * (1 + rho) / G, rel=0.02)
    assert rewards.var(1, ddof=1).mean() == pytest.approx(s2 * (1 - rho / (G - 1)), rel=0.01)
    same = (p * p + rho * s2) ** (G // 2) + ((1 - p) ** 2 + rho * s2) ** (G // 2)
    assert (rewards.std(1) == 0).mean() == pytest.approx(same, rel=0.03)


def test_pairing_shrinks_the_shared_prefix_gradient_by_g_minus_2_over_g_minus_1():
    """Exact expectation on a two-token policy, G = 4 (two pairs), t uniform on 0..2: the mean-centred GRPO
    term of completion i is sum_k g_k ((G - 1) / G - P(t > k) / G), g_k the policy gradient of token k."""
    theta = np.array([0.3, -0.8])
    prob = 1 / (1 + np.exp(-theta))  # each token is 1 with this probability, independently
    def reward(y):
        return y[0] + 2 * y[0] * y[1] - y[1]
    def pi(y):
        return np.prod(np.where(np.array(y) == 1, prob, 1 - prob))
    def score(y):
        return np.array(y) - prob  # d log pi / d theta_k
    seqs = [(a, b) for a in (0, 1) for b in (0, 1)]
    g = sum(pi(y) * reward(y) * score(y) for y in seqs)
    # one pair: A ~ pi, t uniform on {0, 1, 2}, B = A[:t] + its own continuation
    pairs = []
    for y_a in seqs:
        for t in (0, 1, 2):
            for y_b in seqs:
                if y_b[:t] == y_a[:t]:  # B's own tokens after the split have their policy probabilities
                    own = np.prod([prob[k] if y_b[k] else 1 - prob[k] for k in range(t, 2)])
                    pairs.append((pi(y_a) / 3 * own, y_a, y_b))
    assert sum(w for w, _, _ in pairs) == pytest.approx(1.0)
    G = 4
    expected = np.zeros(2)
    for w1, a1, b1 in pairs:
        for w2, a2, b2 in pairs:
            rewards = [reward(y) for y in (a1, b1, a2, b2)]
            expected += w1 * w2 * (rewards[0] - np.mean(rewards)) * score(a1)
    p_after = np.array([2 / 3, 1 / 3])  # P(t > k) for k = 0, 1
    np.testing.assert_allclose(expected, g * ((G - 1) / G - p_after / G), atol=1e-12)
    assert not np.allclose(expected, g * (G - 1) / G), "unpaired groups would give (G - 1) / G"


def test_gathered_pairs_keep_their_states_in_rank_order():
    """Every rank's pairs, states padded for the gather and cut back: two ranks (here the same data twice)."""
    from pipeline.grpo.online_importance import _gathered

    meta = {"prompt_id": torch.tensor([4, 9]), "degenerate": torch.tensor([False, True]), "r1": torch.tensor([1.0, 0.0])}
    states = [torch.arange(6.0).view(3, 2), torch.empty(0, 2)]
    merged, out = _gathered(meta, states, 2, torch.device("cpu"), lambda t: torch.cat([t, t]))
    assert merged["prompt_id"].tolist() == [4, 9, 4, 9] and merged["degenerate"].tolist() == [0, 1, 0, 1]
    assert [len(s) for s in out] == [3, 0, 3, 0] and torch.equal(out[2], states[0])
    buffer = PairBuffer(capacity=10)
    buffer.add({**{k: torch.zeros(4) for k in ("r2", "split", "length", "step")}, **merged}, out)
    assert buffer.meta["degenerate"].dtype == torch.bool and buffer.meta["degenerate"].tolist() == [False, True] * 2


def test_ranks_whose_heads_differ_fail_loudly():
    """end_step's gather also compares every rank's head, fallback switch and buffer size."""
    online = OnlineImportance(4, OnlineOptions(), "cpu")
    online._check_agreement(1, torch.device("cpu"), lambda t: torch.cat([t, t]))  # the same on both ranks
    with pytest.raises(RuntimeError, match="diverged across ranks at step 2"):
        online._check_agreement(2, torch.device("cpu"), lambda t: torch.cat([t, t + torch.tensor([[1e-9, 0, 0]])]))


@pytest.mark.parametrize("study_file", ["cpu_arithmetic.yaml", "gpu_countdown.yaml"])
def test_shipped_studies_have_an_online_arm_beside_the_controls(study_file, tmp_path):
    """Each shipped study plans an ``online`` arm (delta on the online head, warm-started by the study's
    stage-2 export) next to none, delta, shuffled and entropy; planning validates every run's options."""
    study = dataclasses.replace(load_study(ROOT / "studies" / study_file), out_dir=str(tmp_path))
    plan = build_plan(study)
    assert {"none", "delta", "shuffled", "entropy", "online"} <= set(study.arms)
    online = [run for run in plan.runs if run.arm == "online"]
    assert len(online) == len(study.seeds)
    for run in online:
        assert run.options["softmask"] == "delta" and run.options["importance"] == "online"
        assert run.options["importance_net"] == str(plan.export)
    assert not any(tmp_path.iterdir()), "planning writes nothing"
