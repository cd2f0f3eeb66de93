"""The vLLM sampler/trainer importance-sampling correction against TRL 1.16's formula and hand values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.generation.base import Completion
from pipeline.grpo.is_correction import (
    IS_MODES,
    correction_metrics,
    importance_sampling_ratio,
    sampling_logprobs,
    with_ratio,
)
from pipeline.grpo.losses import compute_policy_loss


def trl_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the vllm_importance_sampling block, verbatim."""
    per_token_logps_diff = (old - sampling) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True) if sequence_level_is else per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


@pytest.fixture
def fake_logprobs():
    torch.manual_seed(0)
    old = -torch.rand(6, 5) * 3
    sampling = old + torch.randn(6, 5) * 0.6  # a bf16 engine's numbers, some far off
    sampling[1, 2] = float("nan")  # vLLM could not score this token
    mask = torch.ones(6, 5)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    return old, sampling, mask


@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("clip_min, clip_max", [(None, 3.0), (0.5, 2.0), (0.8, None)])
def test_ratio_is_trls(mode, clip_min, clip_max, fake_logprobs):
    old, sampling, mask = fake_logprobs
    got = importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max)
    want = trl_ratio(old, sampling, mask, mode, clip_min, clip_max)
    assert got.shape == ((6, 1) if mode.startswith("sequence") else (6, 5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ratio_on_hand_computed_values():
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    sampling = torch.tensor([[-1.5, -1.0, -9.0]])  # diffs 0.5, -1.0, 6.0 (masked out)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    token = importance_sampling_ratio(old, sampling, mask, "token_truncate", None, 1.5)
    torch.testing.assert_close(token, torch.tensor([[1.5, math.exp(-1.0), 1.0]]))  # e^0.5 = 1.65 capped
    seq = importance_sampling_ratio(old, sampling, mask, "sequence_mask", None, 3.0)
    torch.testing.assert_close(seq, torch.tensor([[math.exp(-0.5)]]))
    assert importance_sampling_ratio(old, sampling - 5, mask, "sequence_mask", None, 3.0).item() == 0.0


def test_the_ratio_multiplies_the_policy_term_not_the_kl(fake_logprobs):
    """TRL: per_token_loss * importance_sampling_ratio, then + beta * kl; soft-mask weights multiply alongside."""
    old, sampling, mask = fake_logprobs
    logps = (old + 0.05 * torch.randn_like(old)).requires_grad_(True)
    ref = old - 0.1
    advantages = torch.randn(6)
    weights = torch.rand(6, 5) + 0.5
    ratio = importance_sampling_ratio(old, sampling, mask, "token_truncate", None, 3.0)
    loss, _ = compute_policy_loss("dapo", logps, old, advantages, mask, with_ratio(weights, ratio), ref_logps=ref,
                                  beta=0.04)
    r = torch.exp(logps - old)
    a = advantages.unsqueeze(1)
    policy = -torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a) * weights * ratio
    kl = (torch.exp(ref - logps) - (ref - logps) - 1) * r
    want = ((policy + 0.04 * kl) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    assert with_ratio(None, ratio) is ratio and with_ratio(weights, None) is weights


def test_engine_logprobs_are_padded_and_required_from_every_completion():
    completions = [Completion([4, 5], "stop", [-0.5, -1.0]), Completion([6], "length", [-2.0])]
    torch.testing.assert_close(sampling_logprobs(completions, 3), torch.tensor([[-0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]]))
    assert sampling_logprobs([completions[0], Completion([7], "stop")], 3) is None  # the hf backend gives none


def test_metrics_follow_trl(fake_logprobs):
    old, sampling, mask = fake_logprobs
    ratio = importance_sampling_ratio(old, sampling, mask, "token_truncate", None, 3.0)
    metrics = correction_metrics(old, sampling, mask, ratio)
    delta = (old - sampling).abs()[mask.bool() & ~torch.isnan(old - sampling)]
    assert metrics["sampling/sampling_logp_difference/max"] == delta.max()
    torch.testing.assert_close(metrics["sampling/importance_sampling_ratio/mean"], ratio[mask.bool()].mean())
    seq = importance_sampling_ratio(old, sampling, mask, "sequence_truncate", None, 3.0)
    assert correction_metrics(old, sampling, mask, seq)["sampling/importance_sampling_ratio/min"] == seq.min()
