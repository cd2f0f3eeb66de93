import math

import pytest
import torch
from trl.trainer.utils import nanstd

from pipeline.grpo.advantages import group_advantages, zero_std_fraction


def trl_advantages(
    rewards: torch.Tensor, num_generations: int, scale_rewards: str
) -> tuple[torch.Tensor, float]:
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize branch, verbatim."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero.float().mean().item()


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 8])
def test_matches_trl_on_random_rewards(scale_rewards: str, group_size: int) -> None:
    gen = torch.Generator().manual_seed(group_size)
    rewards = torch.rand(6 * group_size, generator=gen)  # float32 as in TRL, whose Bessel factor is float32
    rewards[:group_size] = 0.5  # one zero-variance group
    if group_size > 1:
        rewards[group_size : 2 * group_size] = torch.randint(0, 2, (group_size,), generator=gen).float()
    expected, frac_zero = trl_advantages(rewards, group_size, scale_rewards)
    torch.testing.assert_close(
        group_advantages(rewards, group_size, scale_rewards), expected, rtol=1e-6, atol=1e-6
    )
    if scale_rewards != "batch":
        assert zero_std_fraction(rewards, group_size) == pytest.approx(frac_zero)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_matches_trl_with_unscorable_rows(scale_rewards: str, group_size: int) -> None:
    """NaN rewards (every reward function gave None): left out of mean and std, advantage 0."""
    gen = torch.Generator().manual_seed(10 + group_size)
    rewards = torch.rand(8 * group_size, generator=gen)
    rewards[torch.rand(rewards.shape, generator=gen) < 0.3] = torch.nan
    rewards[:group_size] = torch.nan  # a group with no reward at all
    if group_size > 1:
        rewards[group_size : 2 * group_size - 1] = torch.nan  # a group with one reward left: no std
    expected, frac_zero = trl_advantages(rewards, group_size, scale_rewards)
    ours = group_advantages(rewards, group_size, scale_rewards)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert (ours[rewards.isnan()] == 0).all() and ours.isfinite().all()
    if scale_rewards != "batch":
        assert zero_std_fraction(rewards, group_size) == pytest.approx(frac_zero)


def test_hand_computed_values_with_a_nan_row() -> None:
    rewards = torch.tensor([1.0, 0.0, math.nan, 1.0, math.nan, math.nan, math.nan, 2.0], dtype=torch.float64)
    mean, std = 2 / 3, math.sqrt(1 / 3)  # of {1, 0, 1}, ddof=1
    a, b = (1 - mean) / (std + 1e-4), (0 - mean) / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4, "group"),
                               torch.tensor([a, b, 0, a, 0, 0, 0, 0], dtype=torch.float64))


def test_hand_computed_values() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    std = math.sqrt(0.5)  # unbiased std of {1, 0}
    a = 0.5 / (std + 1e-4)
    torch.testing.assert_close(
        group_advantages(rewards, 2, "group"), torch.tensor([a, -a, 0, 0, 0, 0, a, -a], dtype=torch.float64)
    )
    torch.testing.assert_close(
        group_advantages(rewards, 2, "none"),
        torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5], dtype=torch.float64),
    )
    batch_std = math.sqrt(2.0 / 7.0)  # 4 ones, 4 zeros: sum of squares 8 * 0.25 over n - 1 = 7
    torch.testing.assert_close(
        group_advantages(rewards, 2, "batch")[:2],
        torch.tensor([0.5, -0.5], dtype=torch.float64) / (batch_std + 1e-4),
    )
    assert zero_std_fraction(rewards, 2) == 0.5


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(7), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 2, "prompt")
